"""Reproduce the DeepLog HDFS experiment end to end with the project's own train.py and evaluate.py.

Examples:

    python benchmarks/hdfs.py                                   # ../shared/data/hdfs, default recipe
    python benchmarks/hdfs.py --output-dir runs/hdfs --epochs 20
    python benchmarks/hdfs.py --output-dir runs/hdfs-pairs --no-event-sets  # as beyond the event-set cap
    python benchmarks/hdfs.py --output-dir runs/hdfs-lstm --lstm-only       # no record of co-occurrence
    python benchmarks/hdfs.py --train /data/hdfs_train --eval-normal /data/test_normal \\
        --eval-abnormal /data/test_abnormal --calibrate /data/quiet_normal

Steps: train.py on --train (which calibrates the thresholds on its validation split, or on --calibrate
when given, never on the evaluation sets), then evaluate.py on --eval-normal + --eval-abnormal. Prints
recall, FPR, precision and F1 for every rule and the default one, top-k accuracies and wall times;
everything else is in OUTPUT_DIR (training.log, evaluation_results_*.json, evaluation_report_*.txt).
The recipe is config.yaml with only the data paths changed, plus --epochs/--seed when given.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=str(HDFS / "hdfs_train"), help="normal training sessions")
    parser.add_argument("--calibrate", help="normal sessions to fit thresholds on (default: the training "
                        "data's validation split); never the evaluation sets")
    parser.add_argument("--eval-normal", default=str(HDFS / "hdfs_dev_normal"), help="normal evaluation "
                                                                                     "sessions")
    parser.add_argument("--eval-abnormal", default=str(HDFS / "hdfs_dev_abnormal"),
                        help="abnormal evaluation sessions")
    parser.add_argument("--output-dir", default="outputs/hdfs", help="where the run and reports go")
    parser.add_argument("--config", default=str(REPO / "config.yaml"), help="base config (the recipe)")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument("--seed", type=int, help="override training.seed")
    parser.add_argument("--no-event-sets", action="store_true", help="run as if the record of event-type "
                                                                     "sets "
                        "were unavailable (as on data with more than 10,000 distinct sets): "
                        "evaluation.event_set_rule false, so the default rule is the LSTM's probability rule "
                        "or a novel pair of event types")
    parser.add_argument("--lstm-only", action="store_true", help="no record of which event types occur "
                                                                 "together "
                        "(evaluation.event_set_rule and event_pair_rule false): the default rule is the "
                        "LSTM's alone")
    args = parser.parse_args()

    for name in ("train", "eval_normal", "eval_abnormal") + (("calibrate",) if args.calibrate else ()):
        if not Path(getattr(args, name)).exists():
            sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)}: no such file or directory")
    if args.calibrate and Path(args.calibrate).resolve() in {Path(args.eval_normal).resolve(),
                                                             Path(args.eval_abnormal).resolve()}:
        sys.exit("error: --calibrate must not be an evaluation set: thresholds are never fitted on scored "
                 "data")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(Path(args.config).read_text())
    config["data"].update(preprocessed_dir=args.train, abnormal_dir=None)
    config["training"]["output_dir"] = str(output_dir)
    if args.epochs:
        config["training"]["epochs"] = args.epochs
    if args.seed is not None:
        config["training"]["seed"] = args.seed
    if args.no_event_sets or args.lstm_only:
        config["evaluation"]["event_set_rule"] = False
    if args.lstm_only:
        config["evaluation"]["event_pair_rule"] = False
    (output_dir / "recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    started = time.time()
    run([sys.executable, "train.py", "--config", str(output_dir / "recipe.yaml")])
    train_seconds = time.time() - started
    checkpoint = output_dir / "checkpoints" / "best_model.pt"
    evaluate = [sys.executable, "evaluate.py", "--checkpoint", str(checkpoint),
                "--data-dir", args.eval_normal, "--abnormal-dir", args.eval_abnormal,
                "--output-dir", str(output_dir), "--tag", "hdfs"]
    if args.calibrate:
        evaluate += ["--calibrate-on", args.calibrate]
    started = time.time()
    run(evaluate)
    evaluate_seconds = time.time() - started

    result_file = max(output_dir.glob("evaluation_results_*_hdfs*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(result_file.read_text())
    print_summary(results, train_seconds, evaluate_seconds, result_file)
    return 0


MILESTONES = ("| Epoch ", "Token cache", "Training finished", "Evaluation results", "| WARNING |",
              "| ERROR |")


def run(command: list[str], progress_every_s: float = 30.0) -> None:
    """Run a stage; its epoch, warning and result lines are passed on as they come, and a step line at most
    every progress_every_s, so that a run under nohup or CI is never silent for long, even within a long
    epoch (the full logs are in the output directory)."""
    print("$", " ".join(command), flush=True)
    last_shown = time.monotonic()
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        for line in process.stdout:
            is_step = "| [Step " in line and time.monotonic() - last_shown >= progress_every_s
            if is_step or any(marker in line for marker in MILESTONES):
                print("  " + line.split(" | ", 2)[-1].rstrip(), flush=True)
                last_shown = time.monotonic()
    if process.returncode != 0:
        sys.exit(f"error: {command[1]} exited with {process.returncode}")


def print_summary(results: dict, train_seconds: float, evaluate_seconds: float, result_file: Path) -> None:
    timing, next_event = results["timing"], results["next_event"]
    print(f"\nHDFS benchmark ({result_file})")
    print(f"normal {results['normal_scores']['count']} sessions, abnormal "
          f"{results['abnormal_sessions']['count']}; thresholds from: {results['calibration']['source']}")
    print("next-event accuracy on normal: " + ", ".join(
        f"top-{k} {next_event[f'top{k}_accuracy']:.4f}" for k in (1, 5, 10, 20))
          + f", loss {next_event['loss']:.4f}")
    print(f"\n{'rule':<13}{'recall':>9}{'FPR':>9}{'precision':>11}{'F1':>8}{'FP':>6}{'FN':>6}")
    for rule, m in results["rules"].items():
        mark = "  <- default" if rule == results["default"]["rule"] else ""
        print(f"{rule:<13}{m['recall']:>9.4f}{m['fpr']:>9.2%}{m['precision']:>11.4f}{m['f1']:>8.4f}"
              f"{m['fp']:>6}{m['fn']:>6}{mark}")
    print(f"\nwall time: training {train_seconds:.0f}s (train.py, including its evaluation of the validation "
          f"split), evaluate.py {evaluate_seconds:.1f}s, of which scoring {timing['scoring_seconds']:.2f}s "
          f"= {timing['sessions_per_second']:.0f} sessions/s ({timing['distinct_sessions']} distinct of "
          f"{timing['sessions']})")


if __name__ == "__main__":
    sys.exit(main())
