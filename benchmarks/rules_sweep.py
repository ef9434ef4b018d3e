"""How the probability margin trades false positives for recall: the sweep behind evaluation.probability_margin.

Examples:

    python benchmarks/hdfs.py --output-dir outputs/hdfs            # first, for a trained, calibrated model
    python benchmarks/rules_sweep.py --checkpoint outputs/hdfs/checkpoints/best_model.pt

For each margin, the probability bound is margin x the least likely actual event of the checkpoint's
calibration sessions (the thresholds are never refitted on the data scored here); prints FP on the
normal set and recall on the abnormal set for the probability rule alone and for combined
(probability or event_set).
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

HDFS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hdfs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/hdfs/checkpoints/best_model.pt", help="calibrated model")
    parser.add_argument("--eval-normal", default=str(HDFS / "hdfs_dev_normal"), help="normal sessions")
    parser.add_argument("--eval-abnormal", default=str(HDFS / "hdfs_dev_abnormal"), help="abnormal sessions")
    parser.add_argument("--margins", type=float, nargs="+", default=[1, 0.1, 0.01, 0.001, 0.0001],
                        help="probability margins to try")
    args = parser.parse_args()
    model, checkpoint = evaluate.load_model(args.checkpoint, torch.device("cpu"))
    calibration, event_sets = dict(checkpoint["calibration"]), evaluate.known_event_sets(checkpoint)
    normal = Counter(tuple(s) for c in evaluate.file_chunks(args.eval_normal, {}, abnormal=False) for s in c)
    abnormal = Counter(tuple(s) for c in evaluate.file_chunks(args.eval_abnormal, {}) for s in c)
    scored = []
    for sessions in (normal, abnormal):
        weights = np.array(list(sessions.values()), dtype=np.float64)
        scored.append((evaluate.score_sessions(model, list(sessions), [calibration["top_k"]], 256,
                                               event_sets=event_sets), weights))
    (normal_scores, normal_w), (abnormal_scores, abnormal_w) = scored
    least = calibration["least_likely_normal_log_prob"]
    print(f"least likely calibration event: p = {math.exp(least):.3g}; event_set alone: FP "
          f"{normal_w[evaluate.verdicts(normal_scores, calibration, 'event_set')].sum():.0f}, recall "
          f"{abnormal_w[evaluate.verdicts(abnormal_scores, calibration, 'event_set')].sum() / abnormal_w.sum():.4f}")
    print(f"{'margin':>8} {'bound p':>10} {'probability FP':>15} {'recall':>8} {'combined FP':>12} {'recall':>8}")
    for margin in args.margins:
        calibration["probability_bound"] = least + math.log(margin)
        row = [f"{margin:>8g}", f"{math.exp(calibration['probability_bound']):>10.3g}"]
        for rule in ("probability", "combined"):
            fp = normal_w[evaluate.verdicts(normal_scores, calibration, rule)].sum()
            recall = abnormal_w[evaluate.verdicts(abnormal_scores, calibration, rule)].sum() / abnormal_w.sum()
            row += [f"{fp:>{15 if rule == 'probability' else 12}.0f}", f"{recall:>8.4f}"]
        print(" ".join(row))


if __name__ == "__main__":
    main()
