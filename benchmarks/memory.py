"""Memory stays flat whatever the data size: peak RSS of one streamed training-data pass per file size.

Examples:

    python benchmarks/memory.py                       # 20k, 200k and 1M sessions of generated JSON
    python benchmarks/memory.py --sessions 10000 5000000 --format jsonl

Each size runs in a fresh process: it writes a data file, then streams it through SessionDataset
(counting pass, then one shuffled epoch of padded batches of 64, shuffle buffer 10,000) and reports the
file size, the time and the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_data(path: Path, sessions: int, fmt: str) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        if fmt == "json":
            handle.write("[")
        for i in range(sessions):
            events = [rng.randrange(29) for _ in range(rng.randrange(5, 40))]
            record = json.dumps({"session_id": f"s{i}", "event_ids": events})
            handle.write(("," if i and fmt == "json" else "") + record + ("\n" if fmt == "jsonl" else ""))
        if fmt == "json":
            handle.write("]")


def child(path: str) -> None:
    sys.path.insert(0, str(REPO))
    from dataset import SessionDataset
    dataset = SessionDataset(path, 29, split="train", validation_split=0.1, shuffle=True, buffer_size=10000)
    started = time.time()
    windows = dataset.count()["windows"]
    batches = sum(1 for _ in dataset.batches(64))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"windows": windows, "batches": batches, "seconds": time.time() - started, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[20000, 200000, 1000000], help="file sizes")
    parser.add_argument("--format", choices=["json", "jsonl"], default="json", help="data file format")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'sessions':>10} {'file MB':>9} {'windows':>9} {'seconds':>8} {'peak RSS MB':>12}")
        for count in args.sessions:
            path = Path(tmp) / f"data.{args.format}"
            write_data(path, count, args.format)
            out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                                 check=True).stdout
            row = json.loads(out)
            print(f"{count:>10} {path.stat().st_size / 2**20:>9.1f} {row['windows']:>9} {row['seconds']:>8.1f} "
                  f"{row['peak_mb']:>12.0f}")
            path.unlink()


if __name__ == "__main__":
    main()
