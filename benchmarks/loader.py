"""Data-loading speed: one streamed epoch (parse, shuffle, pad) by batch size and reader processes.

Examples:

    python benchmarks/loader.py                              # 4 JSONL files x 50,000 sessions
    python benchmarks/loader.py --files 16 --sessions 20000 --workers 0 4 8 --batch-sizes 256 1024

Writes random sessions (5-39 events) to temporary JSONL files, then times SessionDataset.batches()
over the training split for each (batch size, lazy_loading.num_workers) pair. No model is involved:
this is the rate at which the loader can feed a GPU.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset import SessionDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4, help="number of data files")
    parser.add_argument("--sessions", type=int, default=50000, help="sessions per file")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024], help="batch sizes")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for f in range(args.files):
            with open(Path(tmp) / f"part{f:03d}.jsonl", "w") as handle:
                for _ in range(args.sessions):
                    events = [rng.randrange(29) for _ in range(rng.randrange(5, 40))]
                    handle.write(json.dumps({"event_ids": events}) + "\n")
        print(f"{args.files} files x {args.sessions} sessions")
        print(f"{'batch':>6} {'workers':>8} {'seconds':>8} {'windows/s':>10}")
        for batch_size in args.batch_sizes:
            for workers in args.workers:
                dataset = SessionDataset(tmp, 29, split="train", num_workers=workers)
                started = time.perf_counter()
                windows = sum(len(batch["lengths"]) for batch, _ in dataset.batches(batch_size))
                seconds = time.perf_counter() - started
                print(f"{batch_size:>6} {workers:>8} {seconds:>8.1f} {windows / seconds:>10.0f}")


if __name__ == "__main__":
    main()
