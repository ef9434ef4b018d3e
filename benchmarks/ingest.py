"""Input speed on one data file: bare ijson, the first pass (the token cache), a cached epoch, validation.

Examples:

    python benchmarks/ingest.py --data /tmp/sessions.json --vocab-size 10000 --generate 1000000   # the issue's file
    python benchmarks/ingest.py --data /data/part-0001.jsonl --vocab-size 10000 --json
    python benchmarks/ingest.py --data /tmp/sessions.json --vocab-size 10000 --workers 1

Each stage runs once, in this order, on the same file (read once beforehand so that every stage finds it
in the page cache):
    bare ijson     ijson.items over the file, no validation: the reference every ratio is taken to
    first pass     parse + validate + write the token cache (cache.build_caches, `--workers` processes)
    cached epoch   one shuffled training epoch of padded batches of `--batch-size` from the cache, no model:
                   the second of the run (every later epoch is like it); the first, which also maps the
                   cache's pages into the process, is reported as first_cached_epoch
    validation     the validation split's batches from the cache, no model
Rates are MB of the input file per second. With --json the last line printed is one JSON object with the
keys bare_ijson_mb_s, first_pass_mb_s, cached_epoch_mb_s, validation_pass_mb_s, peak_rss_mb (and the
ratios). --generate N writes N random sessions (5-39 events of IDs below --vocab-size, a session_id
and a label each) as one JSON array to --data first, if it does not exist: the shape of the data the
original design was made for.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import ijson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cache import CachedSessions, CacheSettings, build_caches  # noqa: E402
from dataset import _format_of, _json_array_prefix  # noqa: E402


def generate(path: Path, sessions: int, vocab_size: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        handle.write("[")
        for i in range(sessions):
            events = [rng.randrange(vocab_size) for _ in range(rng.randrange(5, 40))]
            handle.write(("," if i else "") + json.dumps({"session_id": f"s{i}", "event_ids": events, "label": 0}))
        handle.write("]")


def timed(run) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def bare_ijson(path: Path) -> int:
    """Records of the file parsed with ijson and nothing else (DeepLog text: lines split)."""
    count = 0
    with open(path, "rb") as handle:
        if _format_of(path) == "text":
            for line in handle:
                count += bool(line.split())
            return count
        items = ijson.items(handle, "", multiple_values=True) if _format_of(path) == "jsonl" else \
            ijson.items(handle, _json_array_prefix(path, "sessions"), use_float=True)
        for _ in items:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a .json, .jsonl or DeepLog text file")
    parser.add_argument("--vocab-size", type=int, required=True, help="model.vocab_size")
    parser.add_argument("--workers", type=int, help="first-pass processes (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument("--buffer-size", type=int, default=10000, help="lazy_loading.buffer_size")
    parser.add_argument("--generate", type=int, metavar="N", help="first write N random sessions to --data")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    path = Path(args.data)
    if args.generate and not path.exists():
        generate(path, args.generate, args.vocab_size)
    megabytes = path.stat().st_size / 1e6
    with open(path, "rb") as handle:  # into the page cache, so that no stage pays the disk for the others
        while handle.read(2 ** 24):
            pass
    figures = {}
    seconds, records = timed(lambda: bare_ijson(path))
    figures["bare_ijson_mb_s"] = megabytes / seconds
    with tempfile.TemporaryDirectory() as cache_dir:
        settings = CacheSettings(vocab_size=args.vocab_size)
        seconds, entries = timed(lambda: build_caches(path, settings, cache_dir, args.workers))
        figures["first_pass_mb_s"] = megabytes / seconds
        train = CachedSessions(entries, args.vocab_size, "train", buffer_size=args.buffer_size)
        for epoch in (1, 2):  # the first epoch of a run also maps the cache's pages into the process
            train.set_epoch(epoch)
            seconds, windows = timed(lambda: sum(len(b["lengths"]) for b, _ in train.batches(args.batch_size)))
            figures["first_cached_epoch_mb_s" if epoch == 1 else "cached_epoch_mb_s"] = megabytes / seconds
        validation = CachedSessions(entries, args.vocab_size, "val", shuffle=False, buffer_size=args.buffer_size)
        seconds, val_windows = timed(lambda: sum(len(b["lengths"]) for b, _ in validation.batches(args.batch_size)))
        figures["validation_pass_mb_s"] = megabytes / seconds
        cache_mb = sum(f.stat().st_size for e in entries for f in e.iterdir()) / 1e6
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for key in ("first_pass", "first_cached_epoch", "cached_epoch", "validation_pass"):
        figures[f"{key}_x_bare"] = figures[f"{key}_mb_s"] / figures["bare_ijson_mb_s"]
    print(f"{path}: {megabytes:.0f} MB, {records} records, {windows} training windows, {val_windows} validation "
          f"windows, cache {cache_mb:.0f} MB, workers {args.workers or os.cpu_count()}")
    for stage in ("bare_ijson", "first_pass", "first_cached_epoch", "cached_epoch", "validation_pass"):
        ratio = figures.get(f"{stage}_x_bare", 1.0)
        print(f"  {stage:<18} {figures[f'{stage}_mb_s']:>9.0f} MB/s  {ratio:>6.2f}x bare ijson")
    print(f"  peak RSS           {figures['peak_rss_mb']:>9.0f} MB")
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
