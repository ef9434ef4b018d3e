"""How evaluation.target_fpr trades false positives for recall: the sweep behind its default.

Examples:

    python benchmarks/hdfs.py --output-dir outputs/hdfs            # first, for a trained model
    python benchmarks/rules_sweep.py --checkpoint outputs/hdfs/checkpoints/best_model.pt
    python benchmarks/rules_sweep.py --checkpoint outputs/hdfs/checkpoints/best_model.pt --targets 0.002 0.001
    python benchmarks/rules_sweep.py --checkpoint outputs/hdfs/checkpoints/best_model.pt --no-event-sets

For each target false-positive rate, the thresholds are refitted (evaluate.fit_calibration: the event and
end-of-session bounds) on the checkpoint's own calibration sessions (the calibration half of its training
data's validation split, never the data scored here); prints both bounds, the rate flagged on calibration,
and FP on the normal set and recall on the abnormal set for the probability rule alone and for combined
(probability, event_set or event_pair). --no-event-sets leaves out the record of event-type sets (as beyond
their cap).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import scoring  # noqa: E402
from checkpoint import co_occurrence_of, load_trained  # noqa: E402
from config import config_from_dict, reader_options  # noqa: E402

HDFS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hdfs"


def scored(model, sessions: Counter, top_k: int, co_occurrence) -> tuple[dict, np.ndarray]:
    weights = np.array(list(sessions.values()), dtype=np.float64)
    return scoring.score_sessions(model, list(sessions), [top_k], 256, co_occurrence=co_occurrence), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/hdfs/checkpoints/best_model.pt",
                        help="trained model")
    parser.add_argument("--eval-normal", default=str(HDFS / "hdfs_dev_normal"), help="normal sessions")
    parser.add_argument("--eval-abnormal", default=str(HDFS / "hdfs_dev_abnormal"), help="abnormal sessions")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.005, 0.002, 0.001, 0.0005, 0.0002],
                        help="target false-positive rates to try")
    parser.add_argument("--no-event-sets", action="store_true", help="ignore the record of event-type sets")
    args = parser.parse_args()
    model, checkpoint = load_trained(args.checkpoint, torch.device("cpu"))
    config = config_from_dict(checkpoint["config"])
    co_occurrence = co_occurrence_of(checkpoint)
    if args.no_event_sets:
        co_occurrence.sets = None
    calibration_chunks, _, _ = evaluate.validation_sessions(config, reader_options(config))
    calibration_set = Counter(tuple(s) for chunk in calibration_chunks for s in chunk)
    normal = Counter(tuple(s) for c in scoring.file_chunks(args.eval_normal, {}, abnormal=False) for s in c)
    abnormal = Counter(tuple(s) for c in scoring.file_chunks(args.eval_abnormal, {}) for s in c)
    top_k = config.evaluation.top_k
    (normal_scores, normal_w), (abnormal_scores, abnormal_w) = (
        scored(model, sessions, top_k, co_occurrence) for sessions in (normal, abnormal))
    print(f"{calibration_set.total()} calibration sessions")
    for rule in ("event_set", "event_pair"):
        fp = normal_w[evaluate.verdicts(normal_scores, {}, rule)].sum()
        recall = abnormal_w[evaluate.verdicts(abnormal_scores, {}, rule)].sum() / abnormal_w.sum()
        print(f"{rule} alone: FP {fp:.0f}, recall {recall:.4f}")
    print(f"{'target':>8} {'event p':>9} {'end p':>9} {'calib':>7} {'probability FP':>15} {'recall':>8} "
          f"{'combined FP':>12} {'recall':>8}")
    for target in args.targets:
        calibration = evaluate.fit_calibration(model, [list(calibration_set.elements())], top_k,
                                               config.evaluation.top_g, target, "sweep", "combined",
                                               co_occurrence=co_occurrence)
        row = [f"{target:>8g}", f"{math.exp(calibration['log_probability_bound']):>9.3g}",
               f"{math.exp(calibration['log_end_probability_bound']):>9.3g}",
               f"{calibration['flagged_on_calibration']['probability']:>7.2%}"]
        for rule in ("probability", "combined"):
            fp = normal_w[evaluate.verdicts(normal_scores, calibration, rule)].sum()
            recall = (abnormal_w[evaluate.verdicts(abnormal_scores, calibration, rule)].sum()
                      / abnormal_w.sum())
            row += [f"{fp:>{15 if rule == 'probability' else 12}.0f}", f"{recall:>8.4f}"]
        print(" ".join(row))
        print(f"{'':>9}events: {calibration['probability_bound_method']}; end: "
              f"{calibration['end_probability_bound_method']}")

if __name__ == "__main__":
    main()
