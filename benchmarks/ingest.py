"""Input speed on one data file: bare ijson, the first pass (the token cache), verifying the cache, a cached
epoch, validation.

Examples:

    python benchmarks/ingest.py --data /tmp/sessions.json --vocab-size 10000 --generate 1000000  # issue #6's
    python benchmarks/ingest.py --data /tmp/sessions.json --vocab-size 10000 --repeat 3 --json  # noisy
    python benchmarks/ingest.py --data /data/part-0001.jsonl --vocab-size 10000 --json
    python benchmarks/ingest.py --data /tmp/sessions.json --vocab-size 10000 --workers 1

Each stage runs once (bare ijson and the first pass `--repeat` times, alternately, the fastest run of each
kept: on a loaded machine the ratio of two single runs says more about the load than the code), in this
order, on the same file (read once beforehand so that every stage finds it in the page cache):
    bare ijson     ijson.items over the file, no validation: the reference every ratio is taken to
    first pass     parse + validate + write the token cache (cache.build_caches, `--workers` processes),
                   CRC-32 of every file taken while it is written
    verify         what a later process pays when it opens the cache: cache.check_entry on every entry
                   (meta.json's types, sizes, the arrays' invariants, every file's CRC-32), reported as
                   seconds per GB of cache (verify_s_per_gb), and the CRC-32 alone (checksum_s_per_gb);
                   crc32_share_of_first_pass is what computing the CRC-32 of the cache's bytes costs as
                   a fraction of the first pass
    cached epoch   one shuffled training epoch of padded batches of `--batch-size` from the cache, no model:
                   the second of the run (every later epoch is like it); the first, which also maps the
                   cache's pages into the process, is reported as first_cached_epoch
    validation     the validation split's batches from the cache, no model
Rates are MB of the input file per second. With --json the last line printed is one JSON object with the
keys bare_ijson_mb_s, first_pass_mb_s, cached_epoch_mb_s, validation_pass_mb_s, verify_s_per_gb,
checksum_s_per_gb, crc32_share_of_first_pass, peak_rss_mb (and the ratios). --generate N writes N random
sessions (5-39 events of IDs below --vocab-size, a session_id and a label each) as one JSON array to --data
first, if it does not exist: the shape of the data the original design was made for.
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
import zlib
from pathlib import Path

import ijson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cache  # noqa: E402
from batches import CachedSessions
from cache import build_caches, cache_settings  # noqa: E402
from config import Config
from dataset import _format_of, _json_array_prefix  # noqa: E402


def generate(path: Path, sessions: int, vocab_size: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        handle.write("[")
        for i in range(sessions):
            events = [rng.randrange(vocab_size) for _ in range(rng.randrange(5, 40))]
            record = {"session_id": f"s{i}", "event_ids": events, "label": 0}
            handle.write(("," if i else "") + json.dumps(record))
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


def count_windows(data: CachedSessions, batch_size: int) -> int:
    return sum(len(batch["lengths"]) for batch, _ in data.batches(batch_size))


def verify_costs(entries: list[Path]) -> tuple[float, float, float]:
    """(s/GB of cache to verify the entries as a new process does, s/GB of the CRC-32 alone, seconds of
    zlib.crc32 over the cache's bytes held in memory: what the first pass adds by taking it while writing)."""
    files = [f for e in entries for f in e.iterdir()]
    gigabytes = sum(f.stat().st_size for f in files) / 1e9
    cache.VERIFIED.clear()  # as in a new process
    seconds, problems = timed(lambda: [cache.check_entry(e, None) for e in entries])
    assert problems == [None] * len(entries), problems
    checksum, _ = timed(lambda: [cache._checksum_problem(e, cache.open_entries([e])[0]) for e in entries])
    held = [f.read_bytes() for f in files]
    in_memory, _ = timed(lambda: [zlib.crc32(b) for b in held])
    return seconds / gigabytes, checksum / gigabytes, in_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a .json, .jsonl or DeepLog text file")
    parser.add_argument("--vocab-size", type=int, required=True, help="model.vocab_size")
    parser.add_argument("--workers", type=int, help="first-pass processes (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument("--buffer-size", type=int, default=10000, help="lazy_loading.buffer_size")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of bare ijson and of the first pass, the fastest of each kept (default 1)")
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
    figures = {"bare_ijson_mb_s": 0.0, "first_pass_mb_s": 0.0}
    settings = cache_settings(Config(), args.vocab_size)
    with tempfile.TemporaryDirectory() as cache_dir:
        for run in range(args.repeat):
            seconds, records = timed(lambda: bare_ijson(path))
            figures["bare_ijson_mb_s"] = max(figures["bare_ijson_mb_s"], megabytes / seconds)
            seconds, entries = timed(lambda run=run: build_caches(path, settings, Path(cache_dir) / str(run),
                                                                  args.workers))
            if figures["first_pass_mb_s"] < megabytes / seconds:
                figures["first_pass_mb_s"], first_pass_s = megabytes / seconds, seconds
        figures["verify_s_per_gb"], figures["checksum_s_per_gb"], crc32_s = verify_costs(entries)
        figures["crc32_share_of_first_pass"] = crc32_s / first_pass_s
        train = CachedSessions(entries, args.vocab_size, "train", buffer_size=args.buffer_size)
        for epoch in (1, 2):  # the first epoch of a run also maps the cache's pages into the process
            train.set_epoch(epoch)
            seconds, windows = timed(lambda: count_windows(train, args.batch_size))
            figures["first_cached_epoch_mb_s" if epoch == 1 else "cached_epoch_mb_s"] = megabytes / seconds
        validation = CachedSessions(entries, args.vocab_size, "val", shuffle=False,
                                    buffer_size=args.buffer_size)
        seconds, val_windows = timed(lambda: count_windows(validation, args.batch_size))
        figures["validation_pass_mb_s"] = megabytes / seconds
        cache_mb = sum(f.stat().st_size for e in entries for f in e.iterdir()) / 1e6
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for key in ("first_pass", "first_cached_epoch", "cached_epoch", "validation_pass"):
        figures[f"{key}_x_bare"] = figures[f"{key}_mb_s"] / figures["bare_ijson_mb_s"]
    print(f"{path}: {megabytes:.0f} MB, {records} records, {windows} training windows, {val_windows} "
          f"validation windows, cache {cache_mb:.0f} MB, workers {args.workers or os.cpu_count()}, "
          f"best of {args.repeat}")
    for stage in ("bare_ijson", "first_pass", "first_cached_epoch", "cached_epoch", "validation_pass"):
        ratio = figures.get(f"{stage}_x_bare", 1.0)
        print(f"  {stage:<18} {figures[f'{stage}_mb_s']:>9.0f} MB/s  {ratio:>6.2f}x bare ijson")
    print(f"  verify on open     {figures['verify_s_per_gb']:>9.2f} s/GB of cache "
          f"(CRC-32 alone {figures['checksum_s_per_gb']:.2f} s/GB)")
    print(f"  CRC-32 in the first pass {100 * figures['crc32_share_of_first_pass']:>5.1f} % of its time")
    print(f"  peak RSS           {figures['peak_rss_mb']:>9.0f} MB")
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
