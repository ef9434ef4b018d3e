"""Scoring speed: sessions per second of scoring.py's batched scorer, with and without de-duplication.

Examples:

    python benchmarks/hdfs.py --output-dir outputs/hdfs          # first, for a trained checkpoint
    python benchmarks/scoring.py --checkpoint outputs/hdfs/checkpoints/best_model.pt
    python benchmarks/scoring.py --checkpoint ... --data ../shared/data/hdfs/hdfs_dev_abnormal --repeat 5
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import scoring  # noqa: E402  (the repository's scoring.py, first on the path: not this file)
from checkpoint import load_trained  # noqa: E402
from dataset import iter_sessions  # noqa: E402

HDFS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hdfs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/hdfs/checkpoints/best_model.pt",
                        help="trained model")
    parser.add_argument("--data", nargs="+",
                        default=[str(HDFS / "hdfs_dev_normal"), str(HDFS / "hdfs_dev_abnormal")],
                        help="session files to score")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    parser.add_argument("--batch-size", type=int, default=256, help="sessions per LSTM batch")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model, checkpoint = load_trained(args.checkpoint, torch.device("cpu"))
    sessions = [tuple(r.event_ids) for path in args.data for r in iter_sessions(path)]
    distinct = Counter(sessions)
    print(f"{len(sessions)} sessions ({len(distinct)} distinct), {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch_size}, torch {torch.__version__}")
    for label, batch in (("de-duplicated (what evaluate.py does)", list(distinct)),
                         ("every session", sessions)):
        best = min(timed(model, batch, args.batch_size) for _ in range(args.repeat))
        print(f"{label:<40} {best:6.2f}s  {len(sessions) / best:8.0f} sessions/s")


def timed(model, sessions, batch_size) -> float:
    started = time.perf_counter()
    scoring.score_sessions(model, sessions, [1, 5, 10, 20], batch_size)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
