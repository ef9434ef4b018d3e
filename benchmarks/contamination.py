"""Training on logs that are not clean: unlabelled abnormal sessions mixed into the training data.

Examples:

    python benchmarks/contamination.py                          # HDFS and openstack_kalaki, ~20 runs
    python benchmarks/contamination.py --only hdfs --shares 0.01 0.03
    python benchmarks/contamination.py --only openstack_kalaki --json

HDFS (../shared/data/hdfs): hdfs_train plus a share of abnormal sessions drawn (seeded) from one half of
hdfs_dev_abnormal (even lines), shuffled in without labels; scored on hdfs_dev_normal and the other half (odd
lines). openstack_kalaki (../shared/data/sequences): its 50 training sessions plus 1, 2 or 5 abnormal dev
sessions without labels; scored on the dev normal sessions and the other abnormal ones. Each mix is trained
twice with config.yaml's recipe: the default (the sweep of the training data, sweep.py) and
data.assume_clean true (the behaviour before the sweep). Prints recall, FPR, F1, the stated false-positive
rate of the default rule, the sweep's estimate of the abnormal share of the training data, and what it
listed in suspicious_sessions.jsonl: how many of the mixed-in sessions, and how many normal ones.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
HDFS_SHARES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)
OPENSTACK_COUNTS = (0, 1, 2, 5)


def run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} failed with exit code {done.returncode}:\n"
                 f"{done.stderr[-3000:]}")


def hdfs_mixes(shares, work: Path, seed: int) -> list[dict]:
    """Per share: the training file, the evaluation files, how many abnormal sessions were mixed in."""
    hdfs = SHARED / "hdfs"
    train = (hdfs / "hdfs_train").read_text().splitlines()
    abnormal = (hdfs / "hdfs_dev_abnormal").read_text().splitlines()
    pool, held = abnormal[0::2], abnormal[1::2]
    held_path = work / "hdfs_held_abnormal"
    held_path.write_text("\n".join(held) + "\n")
    mixes = []
    for share in shares:
        rng = random.Random(seed)
        mixed_in = rng.sample(pool, round(len(train) * share))
        sessions = [(s, False) for s in train] + [(s, True) for s in mixed_in]
        rng.shuffle(sessions)
        path = work / f"hdfs_{share}" / "hdfs_train"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(s for s, _ in sessions) + "\n")
        mixes.append({"data": "hdfs", "mixed_in": len(mixed_in), "share": len(mixed_in) / len(sessions),
                      "train": path, "normal": hdfs / "hdfs_dev_normal", "abnormal": held_path, "vocab": 29,
                      "abnormal_records": {i + 1 for i, (_, bad) in enumerate(sessions) if bad}})
    return mixes


def openstack_mixes(counts, work: Path, seed: int) -> list[dict]:
    base = SHARED / "sequences" / "openstack_kalaki"
    read, abnormal, normal = ([json.loads(line) for line in (base / name).read_text().splitlines()
                               if line.strip()] for name in ("train.jsonl", "dev_abnormal.jsonl",
                                                             "dev_normal.jsonl"))
    vocab = max(max(s["event_ids"]) for s in read + abnormal + normal if s["event_ids"]) + 1
    mixes = []
    for count in counts:
        rng = random.Random(seed)
        chosen = set(rng.sample(range(len(abnormal)), count))
        mixed_in = [{**abnormal[i], "label": 0} for i in sorted(chosen)]   # unlabelled, as a user has them
        sessions = [(s, False) for s in read] + [(s, True) for s in mixed_in]
        rng.shuffle(sessions)
        folder = work / f"openstack_{count}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s, _ in sessions))
        (folder / "held_abnormal.jsonl").write_text("".join(
            json.dumps(s) + "\n" for i, s in enumerate(abnormal) if i not in chosen))
        mixes.append({"data": "openstack_kalaki", "mixed_in": count, "share": count / len(sessions),
                      "train": folder / "train.jsonl", "normal": base / "dev_normal.jsonl",
                      "abnormal": folder / "held_abnormal.jsonl", "vocab": vocab,
                      "abnormal_records": {i + 1 for i, (_, bad) in enumerate(sessions) if bad}})
    return mixes


def train_and_score(mix: dict, assume_clean: bool, work: Path, epochs: int | None) -> dict:
    """train.py (its evaluation after training included), then evaluate.py on the held-out sessions."""
    name = f"{Path(mix['train']).parent.name}_{'clean' if assume_clean else 'sweep'}"
    run_dir = work / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["model"]["vocab_size"] = mix["vocab"]
    config["data"].update(preprocessed_dir=str(mix["train"]), abnormal_dir=None, assume_clean=assume_clean)
    config["training"]["output_dir"] = str(run_dir)
    config["lazy_loading"]["cache_dir"] = str(work / "cache")
    if epochs:
        config["training"]["epochs"] = epochs
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    run([sys.executable, "train.py", "--config", str(run_dir / "recipe.yaml"), "--overwrite"])
    run([sys.executable, "evaluate.py", "--checkpoint", str(run_dir / "checkpoints" / "best_model.pt"),
         "--data-dir", str(mix["normal"]), "--abnormal-dir", str(mix["abnormal"]),
         "--output-dir", str(run_dir / "dev"), "--tag", "dev"])
    results = json.loads(sorted((run_dir / "dev").glob("evaluation_results_*_dev*.json"))[-1].read_text())
    calibration, default = results["calibration"], results["default"]["rule"]
    m = results["rules"][default]
    swept = calibration.get("training_sweep")
    listed = run_dir / "suspicious_sessions.jsonl"
    records = [json.loads(line)["record"] for line in listed.read_text().splitlines()] \
        if listed.exists() else []
    caught = sum(record in mix["abnormal_records"] for record in records)
    return {"data": mix["data"], "mixed_in": mix["mixed_in"], "share": mix["share"],
            "swept": f"{caught} + {len(records) - caught} normal" if swept else "",
            "behaviour": "assume_clean (before)" if assume_clean else "sweep (default)",
            "recall": m["recall"], "fpr": m["fpr"], "f1": m["f1"], "fp": m["fp"], "fn": m["fn"],
            "stated_fpr": (calibration.get("expected_fpr") or {}).get(default),
            "estimated": swept["share"] if swept else None, "seconds": time.time() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("hdfs", "openstack_kalaki"), help="one data set")
    parser.add_argument("--shares", type=float, nargs="+", default=HDFS_SHARES,
                        help="HDFS: abnormal shares of the training data")
    parser.add_argument("--counts", type=int, nargs="+", default=OPENSTACK_COUNTS,
                        help="openstack_kalaki: abnormal sessions mixed into its 50 training sessions")
    parser.add_argument("--output-dir", default="outputs/contamination", help="data, runs and caches")
    parser.add_argument("--epochs", type=int, help="override training.epochs of the recipe")
    parser.add_argument("--seed", type=int, default=1, help="seed of the draws of abnormal sessions")
    parser.add_argument("--json", action="store_true", help="also print every row as one JSON line")
    args = parser.parse_args()
    if not SHARED.exists():
        sys.exit(f"error: {SHARED}: no such directory (the shared benchmark data)")
    work = Path(args.output_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mixes = []
    if args.only in (None, "hdfs"):
        mixes += hdfs_mixes(args.shares, work, args.seed)
    if args.only in (None, "openstack_kalaki"):
        mixes += openstack_mixes(args.counts, work, args.seed)
    print("| data | mixed in | share | behaviour | recall | FPR | F1 | FP | stated FPR | estimated | swept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for mix in mixes:
        for assume_clean in (False, True):
            row = train_and_score(mix, assume_clean, work, args.epochs)
            rows.append(row)
            stated = "" if row["stated_fpr"] is None else f"{row['stated_fpr']:.2%}"
            estimated = "" if row["estimated"] is None else f"{row['estimated']:.2%}"
            print(f"| {row['data']} | {row['mixed_in']} | {row['share']:.2%} | {row['behaviour']} | "
                  f"{row['recall']:.4f} | {row['fpr']:.2%} | {row['f1']:.3f} | {row['fp']} | {stated} | "
                  f"{estimated} | {row['swept']} |", flush=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
