"""Learning from feedback on HDFS dev (issue #17): false positives fed back stop being flagged, and so do
other normal sessions of their kind that were not fed back, while recall holds.

Examples:

    python benchmarks/feedback.py                                  # ../shared/data/hdfs, held-out event 2
    python benchmarks/feedback.py --output-dir outputs/feedback --held-out-event 3
    python benchmarks/feedback.py --skip-training                  # reuse OUTPUT_DIR/baseline

Steps (everything with the project's own train.py; the recipe is config.yaml with only the data paths
changed, as benchmarks/hdfs.py runs it):
  1. a kind of normal session is held out of training: every hdfs_train session holding event KEY
     (--held-out-event); train.py trains the baseline on the rest (and calibrates it, as always);
  2. the baseline flags the dev-normal sessions of that kind: every other one of them (in file order) is
     fed back as detect.py output lines (verdict "abnormal" with its event_ids), with early-alert lines
     among them, which the update skips;
  3. train.py --update BASELINE --feedback THAT_FILE: the updated model, recalibrated;
  4. both models score: the fed-back sessions, the held-out sessions of the same kind that were not fed
     back, all 1,000 dev normal sessions and the 5,051 dev abnormal ones (recall), each under its stored
     calibration and default rule, as detection would;
  5. the real one: the dev-normal session ending in an event that no training session has (20) stays a
     false positive of every model trained on hdfs_train; a second update feeds back that session alone.
Training and update times are their loops' epoch times (training_history.json: the epochs and their
validation loss; not the start-up, the first pass nor the evaluation after), and the wall time of each
train.py process.

Measured 2026-12-01 (`python benchmarks/feedback.py --output-dir /tmp/fb/bench`; 2 cores shared with
another job, so the times are long; the update is 48 optimizer steps against training's 590, 8.1%):

  model                                fed  held  real  dev normal  recall   stated   loop (share)   wall
  baseline (trained without the kind)   60    59     1         122  0.9996   0.177%  126.3 s         138.0 s
  after --update, half the kind fed      0     1     1           2  0.9994   0.175%    6.2 s (4.9%)   12.8 s
  after --update, the real one fed      60    59     0         121  0.9881   0.219%    5.9 s (4.7%)   12.1 s

(false positives among the 60 fed-back sessions of the kind, the 59 of the kind not fed back, the real one
and all 1,000 dev normal; recall on the 5,051 dev abnormal; the stated FPR of the default rule; the loop
times and their share of the baseline's; the wall time of each train.py.)

The one held-out session still flagged is the dev set's other known false positive (line 797: replication
then deletion, a set of event types that neither training nor the fed-back half has), by the event-set
rule alone; the other of the 2 left on dev normal is the real one. The real one: feeding it
back fixes it, but 57 dev abnormal sessions have exactly its set of event types ({3, 4, 5, 9, 11, 20, 21,
22, 23, 26}); once that set and event 20 are normal, neither the event-set rule nor the LSTM flags them:
recall falls by 0.0115. That session is better left a false positive (the update's log names the event
types new to the model, [20], for that judgement).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
HDFS = REPO.parent / "shared" / "data" / "hdfs"
sys.path.insert(0, str(REPO))


def read_sessions(path: Path) -> list[list[int]]:
    return [list(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]


def write_text(path: Path, sessions: list[list[int]]) -> None:
    path.write_text("".join(" ".join(map(str, s)) + "\n" for s in sessions))


MILESTONES = ("| WARNING |", "| ERROR |", "Update finished", "Training finished", "Fine-tuning:",
              "Records joined", "skipped:")


def run(command: list[str]) -> float:
    """Run a stage (its output into OUTPUT_DIR's logs, its warnings and errors shown); its wall time."""
    print("$", " ".join(map(str, command)), flush=True)
    started = time.time()
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in result.stdout.splitlines():
        if any(marker in line for marker in MILESTONES):
            print("  " + line.split(" | ", 2)[-1][:300])
    if result.returncode != 0:
        sys.exit(f"error: {command[1]} exited with {result.returncode}: {result.stderr.strip()[-500:]}")
    return time.time() - started


def loop_seconds(run_dir: Path) -> float:
    """The epochs' time (training_history.json): the training or update loop, validation loss included."""
    return sum(json.loads((run_dir / "training_history.json").read_text())["epoch_time"])


def detect_lines(sessions: list[list[int]], first_line: int) -> str:
    """The sessions as detect.py writes flagged ones, with an early alert before every fourth."""
    lines = []
    for number, session in enumerate(sessions):
        session_id = f"hdfs_dev_normal:{first_line + number}"
        if number % 4 == 0:
            lines.append({"session_id": session_id, "alert": "early", "score": 0.5, "rule": "combined",
                          "misses": []})
        lines.append({"session_id": session_id, "score": 0.05, "verdict": "abnormal", "rule": "combined",
                      "min_probability": 0.0, "novel_event_set": True, "novel_event_pairs": [], "misses": [],
                      "event_ids": session})
    return "".join(json.dumps(line) + "\n" for line in lines)


def measure(checkpoint: Path, groups: dict[str, list]) -> dict:
    """Per group: how many sessions the checkpoint flags; and its stated false-positive rate."""
    import feedback
    counts, calibration = {}, None
    for name, sessions in groups.items():
        flags, calibration = feedback.flagged_sessions(checkpoint, sessions)
        counts[name] = int(flags.sum())
    counts["stated_fpr"] = (calibration["expected_fpr"] or {}).get("combined")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HDFS), help="folder of hdfs_train, hdfs_dev_normal, "
                                                          "hdfs_dev_abnormal")
    parser.add_argument("--output-dir", default="outputs/feedback", help="where the runs and files go")
    parser.add_argument("--config", default=str(REPO / "config.yaml"), help="base config (the recipe)")
    parser.add_argument("--held-out-event", type=int, default=2, help="the kind held out of training: the "
                        "sessions holding this event key")
    parser.add_argument("--skip-training", action="store_true", help="reuse OUTPUT_DIR/baseline")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.output_dir).resolve()
    for name in ("hdfs_train", "hdfs_dev_normal", "hdfs_dev_abnormal"):
        if not (data / name).is_file():
            sys.exit(f"error: {data / name}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    key = args.held_out_event
    train = read_sessions(data / "hdfs_train")
    dev_normal = read_sessions(data / "hdfs_dev_normal")
    dev_abnormal = read_sessions(data / "hdfs_dev_abnormal")
    kept = [s for s in train if key not in s]
    write_text(out / "train_without_kind", kept)
    kind = [(number, s) for number, s in enumerate(dev_normal, start=1) if key in s]
    fed, held_out = [s for _, s in kind[0::2]], [s for _, s in kind[1::2]]
    (out / "feedback.jsonl").write_text("".join(detect_lines([s], n) for n, s in kind[0::2]))
    trained_events = {e for s in train for e in s}
    real = [s for s in dev_normal if set(s) - trained_events]
    write_text(out / "feedback_real.txt", real)
    print(f"held out of training: {len(train) - len(kept)} of {len(train)} "
          f"sessions (event {key}); dev normal of that kind: {len(kind)} = {len(fed)} fed back + "
          f"{len(held_out)} held out; the real one(s): {real}")

    baseline = out / "baseline"
    recipe = yaml.safe_load(Path(args.config).read_text())
    recipe["data"].update(preprocessed_dir=str(out / "train_without_kind"), abnormal_dir=None)
    recipe["training"]["output_dir"] = str(baseline)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    train_wall = None
    if not args.skip_training:
        train_wall = run([sys.executable, "train.py", "--config", out / "recipe.yaml", "--overwrite"])
    parent = baseline / "checkpoints" / "best_model.pt"
    parent_bytes = parent.read_bytes()
    walls = {}
    for name, feedback_file in (("updated", out / "feedback.jsonl"), ("real", out / "feedback_real.txt")):
        walls[name] = run([sys.executable, "train.py", "--update", parent, "--feedback", feedback_file,
                           "--output-dir", out / name])
    assert parent.read_bytes() == parent_bytes, "the parent checkpoint changed"

    groups = {"fed": fed, "held_out": held_out, "real": real, "dev_normal": dev_normal,
              "dev_abnormal": dev_abnormal}
    rows = {name: measure(path, groups) for name, path in
            (("baseline", parent), ("updated", out / "updated" / "checkpoints" / "best_model.pt"),
             ("real", out / "real" / "checkpoints" / "best_model.pt"))}
    times = {"baseline": (loop_seconds(baseline), train_wall), "updated": (loop_seconds(out / "updated"),
                                                                           walls["updated"]),
             "real": (loop_seconds(out / "real"), walls["real"])}
    print_table(rows, times, len(fed), len(held_out), len(real), len(dev_normal), len(dev_abnormal))
    (out / "figures.json").write_text(json.dumps({"rows": rows, "times": times}, indent=2) + "\n")
    return 0


def print_table(rows: dict, times: dict, fed: int, held_out: int, real: int, normal: int,
                abnormal: int) -> None:
    names = {"baseline": "baseline (trained without the kind)", "updated": "after --update (half fed back)",
             "real": "after --update (the real one fed back)"}
    print(f"\n| model | FP fed back (of {fed}) | FP held out, same kind (of {held_out}) | FP the real one "
          f"(of {real}) | FP all dev normal (of {normal}) | recall dev abnormal (of {abnormal}) | stated FPR "
          f"| loop time | wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_loop = times["baseline"][0]
    for name, row in rows.items():
        loop, wall = times[name]
        share = "" if name == "baseline" else f" ({loop / base_loop:.1%} of training)"
        print(f"| {names[name]} | {row['fed']} | {row['held_out']} | {row['real']} | {row['dev_normal']} | "
              f"{row['dev_abnormal'] / abnormal:.4f} | "
              f"{'-' if row['stated_fpr'] is None else format(row['stated_fpr'], '.3%')} | "
              f"{loop:.1f} s{share} | {'-' if wall is None else format(wall, '.1f') + ' s'} |")


if __name__ == "__main__":
    sys.exit(main())
