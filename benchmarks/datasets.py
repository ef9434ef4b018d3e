r"""The default recipe on every labelled data set at hand, beside the simple detectors of the critical review.

Examples:

    # HDFS dev and every set under ../shared/data/sequences
    python benchmarks/datasets.py
    python benchmarks/datasets.py --only openstack_kalaki --epochs 5
    python benchmarks/datasets.py --skip-hdfs --json --output-dir /tmp/datasets

For each data set: train.py with config.yaml's recipe (only the data path, output_dir and vocab_size, the
largest ID in its files + 1, changed)
on its training sessions, which calibrates on their validation split as any run does; then evaluate.py on
its dev_normal + dev_abnormal sessions. Printed per data set, for the default rule (`combined`) and for the
LSTM's probability rule alone: F1, precision, recall, the observed false-positive rate on the dev normal
sessions and the false-positive rate the run stated (expected_fpr of its calibration, a 95% bound).

Next to them, the simple detectors of Landauer, Skopik, Wurzenberger, "A critical review of common log data
sets used for evaluation of sequence-based anomaly detection techniques" (FSE 2024), computed in the same
run from the same training file (all of it, validation split included) on the same dev sessions:
- new event type: how many of a session's event types no training session has;
- sequence length: how far a session's length is from the nearest training session's length;
- nearest count vector: L1 distance of its event counts to the nearest training session's;
- nearest edit distance: Levenshtein distance to the nearest training sequence.
Each with two thresholds: calibrated on normal data only (flag a score above every training session's
leave-one-out score, as the count_vector rule does), and the threshold that maximises F1 on the dev labels
("test-optimal", as the review reports them: optimistic, it uses the labels being scored).
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
HDFS = SHARED / "hdfs"
SEQUENCES = SHARED / "sequences"


# ----------------------------------------------------------------------------- data
def read_sessions(path: Path) -> list[list[int]]:
    """Event-ID lists of a JSONL file (event_ids) or a DeepLog text file (one session per line)."""
    with open(path) as handle:
        if path.suffix == ".jsonl":
            return [json.loads(line)["event_ids"] for line in handle if line.strip()]
        return [[int(x) for x in line.split()] for line in handle if line.strip()]


def data_sets(only: str | None, skip_hdfs: bool) -> dict[str, dict[str, Path]]:
    sets = {}
    if not skip_hdfs and (HDFS / "hdfs_train").exists():
        sets["hdfs"] = {"train": HDFS / "hdfs_train", "normal": HDFS / "hdfs_dev_normal",
                        "abnormal": HDFS / "hdfs_dev_abnormal"}
    for folder in sorted(SEQUENCES.glob("*/")) if SEQUENCES.exists() else []:
        if (folder / "train.jsonl").exists():
            sets[folder.name] = {"train": folder / "train.jsonl", "normal": folder / "dev_normal.jsonl",
                                 "abnormal": folder / "dev_abnormal.jsonl"}
    return {name: paths for name, paths in sets.items() if only in (None, name)}


# ----------------------------------------------------------------------------- the review's detectors
def levenshtein(a: list[int], b: list[int]) -> int:
    """Edit distance, bit-parallel (Myers 1999, Hyyro 2001): one step of integer operations per event of `b`
    on integers of len(a) bits."""
    if not a or not b:
        return len(a) + len(b)
    m, mask = len(a), (1 << len(a)) - 1
    high = 1 << (m - 1)
    equal: dict[int, int] = {}
    for i, event in enumerate(a):
        equal[event] = equal.get(event, 0) | (1 << i)
    plus, minus, score = mask, 0, m
    for event in b:
        eq = equal.get(event, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        horizontal_plus = (minus | ~(xh | plus)) & mask
        horizontal_minus = plus & xh
        if horizontal_plus & high:
            score += 1
        elif horizontal_minus & high:
            score -= 1
        horizontal_plus = ((horizontal_plus << 1) | 1) & mask
        horizontal_minus = (horizontal_minus << 1) & mask
        plus = (horizontal_minus | ~(xv | horizontal_plus)) & mask
        minus = horizontal_plus & xv
    return score


def nearest_edit_distance(session: list[int], references: list[list[int]], skip: int | None = None) -> float:
    """The edit distance to the nearest reference (not the one at index `skip`): references are tried
    by length difference, which bounds the distance from below, so most are never computed."""
    best = float("inf")
    order = sorted(range(len(references)), key=lambda i: abs(len(references[i]) - len(session)))
    for i in order:
        if abs(len(references[i]) - len(session)) >= best:
            break
        if i != skip:
            best = min(best, levenshtein(references[i], session))
    return best


def count_matrix(sessions: list[list[int]], width: int) -> np.ndarray:
    matrix = np.zeros((len(sessions), width), dtype=np.int64)
    for row, events in enumerate(sessions):
        np.add.at(matrix[row], np.minimum(events, width - 1), 1)
    return matrix


def review_scores(train: list[list[int]], scored: list[list[int]],
                  leave_one_out: bool) -> dict[str, np.ndarray]:
    """The four scores of `scored` sessions against the training sessions (leave_one_out: `scored` is
    `train`, each compared with the others)."""
    width = max(max((max(s) for s in train + scored if s), default=0) + 2, 2)
    train_counts, counts = count_matrix(train, width), count_matrix(scored, width)
    sessions_with = (train_counts > 0).sum(0)
    lengths = np.array([len(s) for s in train])
    multiplicity = collections.Counter(map(tuple, train))   # identical sequences: one reference
    references = [list(s) for s in multiplicity]
    reference_of = {s: i for i, s in enumerate(multiplicity)}
    scores = {name: np.zeros(len(scored)) for name in ("new event type", "sequence length",
                                                       "nearest count vector", "nearest edit distance")}
    for row, events in enumerate(scored):
        others = sessions_with - (counts[row] > 0) if leave_one_out else sessions_with
        scores["new event type"][row] = int(((counts[row] > 0) & (others == 0)).sum())
        length_gaps = np.abs(lengths - len(events)).astype(float)
        distances = np.abs(train_counts - counts[row]).sum(1).astype(float)
        if leave_one_out:
            length_gaps[row] = distances[row] = np.inf
        scores["sequence length"][row] = length_gaps.min() if len(length_gaps) else np.inf
        scores["nearest count vector"][row] = distances.min() if len(distances) else np.inf
        twin = leave_one_out and multiplicity[tuple(events)] > 1   # another training session is identical
        skip = reference_of[tuple(events)] if leave_one_out else None
        scores["nearest edit distance"][row] = (0.0 if twin
                                                else nearest_edit_distance(events, references, skip))
    return scores


def metrics(normal_flags: np.ndarray, abnormal_flags: np.ndarray) -> dict:
    tp, fp = int(abnormal_flags.sum()), int(normal_flags.sum())
    fn = len(abnormal_flags) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "precision": precision, "recall": recall, "fpr": fp / len(normal_flags), "fp": fp, "tp": tp}


def test_optimal(normal: np.ndarray, abnormal: np.ndarray) -> dict:
    """The threshold (flag score > t, or everything) that maximises F1 on the dev labels."""
    candidates = np.concatenate([[-np.inf], np.unique(np.concatenate([normal, abnormal]))])
    best = max((metrics(normal > t, abnormal > t) for t in candidates), key=lambda m: m["f1"])
    return best


def baselines(paths: dict[str, Path]) -> dict[str, dict]:
    train = read_sessions(paths["train"])
    normal, abnormal = read_sessions(paths["normal"]), read_sessions(paths["abnormal"])
    started = time.time()
    on_train = review_scores(train, train, leave_one_out=True)
    on_normal, on_abnormal = review_scores(train, normal, False), review_scores(train, abnormal, False)
    results = {}
    for name in on_train:
        threshold = float(np.max(on_train[name][np.isfinite(on_train[name])], initial=0.0))
        calibrated = metrics(on_normal[name] > threshold, on_abnormal[name] > threshold)
        results[name] = {"calibrated": {**calibrated, "stated_fpr": 1 / (len(train) + 1),
                                        "threshold": threshold},
                         "test_optimal": test_optimal(on_normal[name], on_abnormal[name])}
    results["_seconds"] = time.time() - started
    return results


# ----------------------------------------------------------------------------- the default recipe
def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} failed with exit code {done.returncode}:\n"
                 f"{done.stderr[-3000:]}")


def recipe(name: str, paths: dict[str, Path], output_dir: Path, epochs: int | None) -> dict:
    """train.py then evaluate.py with the default recipe; the evaluation's results."""
    run_dir = output_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    # the data set's ID range (as its documentation gives it: every file's IDs; no labels are used), so that
    # HDFS gets config.yaml's 29 as benchmarks/hdfs.py does; IDs absent from training are unknown events
    vocab_size = max(max(s) for name in ("train", "normal", "abnormal")
                     for s in read_sessions(paths[name]) if s) + 1
    config["model"]["vocab_size"] = vocab_size
    config["data"].update(preprocessed_dir=str(paths["train"]), abnormal_dir=None)
    config["training"]["output_dir"] = str(run_dir)
    config["lazy_loading"]["cache_dir"] = str(output_dir / "cache")
    if epochs:
        config["training"]["epochs"] = epochs
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    run([sys.executable, "train.py", "--config", str(run_dir / "recipe.yaml")])
    run([sys.executable, "evaluate.py", "--checkpoint", str(run_dir / "checkpoints" / "best_model.pt"),
         "--data-dir", str(paths["normal"]), "--abnormal-dir", str(paths["abnormal"]), "--output-dir",
         str(run_dir / "dev"), "--tag", "dev"])
    report = sorted((run_dir / "dev").glob("evaluation_results_*_dev*.json"))[-1]
    results = json.loads(report.read_text())
    results["_seconds"] = time.time() - started
    return results


def rows_of(name: str, results: dict, review: dict) -> list[tuple]:
    calibration = results["calibration"]
    stated = calibration.get("expected_fpr", {})
    rows = []
    for label, rule in (("default (combined)", "combined"), ("LSTM probability rule", "probability")):
        m = results["rules"][rule]
        rows.append((name, label, m["f1"], m["precision"], m["recall"], m["fpr"], stated.get(rule)))
    for detector, both in review.items():
        if detector.startswith("_"):
            continue
        c, t = both["calibrated"], both["test_optimal"]
        rows.append((name, f"{detector} (normal-calibrated)", c["f1"], c["precision"], c["recall"], c["fpr"],
                     c["stated_fpr"]))
        rows.append((name, f"{detector} (test-optimal)", t["f1"], t["precision"], t["recall"], t["fpr"],
                     None))
    return rows


def print_table(rows: list[tuple]) -> None:
    print("\n| data set | detector | F1 | precision | recall | FPR | stated FPR "
          "|\n|---|---|---|---|---|---|---|")
    for name, label, f1, precision, recall, fpr, stated in rows:
        stated_text = "" if stated is None else f"{stated:.2%}"
        print(f"| {name} | {label} | {f1:.3f} | {precision:.3f} | {recall:.3f} | {fpr:.2%} | {stated_text} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/datasets", help="runs, caches and reports go here")
    parser.add_argument("--only", help="one data set by name (hdfs, openstack_kalaki, openstack_du, hadoop, "
                                       "...)")
    parser.add_argument("--skip-hdfs", action="store_true", help="only the sets under "
                                                                 "../shared/data/sequences")
    parser.add_argument("--epochs", type=int, help="override training.epochs of the recipe")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON line")
    args = parser.parse_args()
    sets = data_sets(args.only, args.skip_hdfs)
    if not sets:
        sys.exit("error: no data set found (../shared/data/hdfs, ../shared/data/sequences/*/train.jsonl)")
    output_dir = Path(args.output_dir).resolve()
    rows, everything = [], {}
    for name, paths in sets.items():
        results, review = recipe(name, paths, output_dir, args.epochs), baselines(paths)
        calibration = results["calibration"]
        print(f"{name}: recipe {results['_seconds']:.0f} s, review's detectors {review['_seconds']:.1f} s; "
              f"combined = {' | '.join(calibration.get('combined_rules', []))}; calibrated on "
              f"{calibration['sessions']} sessions", flush=True)
        rows += rows_of(name, results, review)
        everything[name] = {"rules": results["rules"], "expected_fpr": calibration.get("expected_fpr"),
                            "combined_rules": calibration.get("combined_rules"), "review": review}
    print_table(rows)
    if args.json:
        print(json.dumps(everything))
    return 0


if __name__ == "__main__":
    sys.exit(main())
