"""Memory stays flat whatever the data size: peak RSS of training's input pipeline and of evaluation.

Examples:

    python benchmarks/memory.py                              # 0.1, 0.5 and 2 GB of generated JSON
    python benchmarks/memory.py --gigabytes 0.1 1 --stages train
    python benchmarks/memory.py --gigabytes 0.05 0.2 --format jsonl
    python benchmarks/memory.py --long 1000000x1 100000x160 --stages long   # sessions of any length

For each size, a JSON array of random HDFS-like sessions (5-39 events of 29 types, all distinct) is
written, then each stage runs in a fresh process that reports its peak resident memory (ru_maxrss):
    train      the first pass (token cache, all cores), the count, one shuffled epoch of padded batches
               of 256 and the validation pass, exactly as train.py reads its data (no model)
    evaluate   calibration on the validation split's calibration half, then evaluation of the whole file
               (every session scored: none repeats) with a tiny model, through evaluate.py's streaming
               path and the token cache
Two peaks are reported: peak RSS (ru_maxrss, as `/usr/bin/time` shows it), which counts the pages of
the memory-mapped token cache the process has touched (page cache the kernel can take back at any time,
so it grows with the cache until memory is short), and the peak of anonymous memory (RssAnon, sampled
every 5 ms): what the process itself holds. Both include Python with torch loaded (about 230 MB). One
.json file is parsed in the process itself; parsing processes, where a JSONL or text file is split,
report their own peak ("parsers MB").

    long       (--long EVENTSxSESSIONS ...) a JSONL file of that many random sessions of that many events
               each: calibration, evaluation and detection (detect.score_files, the misses of every flagged
               session explained) over all of them, then DeepLog.verdict on the longest, with a tiny model
               scoring in the windows of training (max_seq_length 256, window_context 32): memory stays
               bounded whatever the length of a session.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_data(path: Path, gigabytes: float) -> int:
    rng = random.Random(0)
    target, written, sessions = gigabytes * 1e9, 0, 0
    with open(path, "w") as handle:
        handle.write("[")
        while written < target:
            events = [rng.randrange(1, 29) for _ in range(rng.randrange(5, 40))]
            record = ("," if sessions else "") + json.dumps({"session_id": f"s{sessions}",
                                                             "event_ids": events})
            written += handle.write(record)
            sessions += 1
        handle.write("]")
    return sessions


class AnonymousPeak:
    """The peak of the process's anonymous resident memory (RssAnon: what it allocated itself, without
    the file pages it has mapped, which the kernel can drop at any time), sampled every 5 ms."""

    def __init__(self):
        self.peak_kb, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak_kb / 1024


def child(stage: str, path: str, cache_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    import logging

    import torch

    import evaluate
    import scoring
    from batches import CachedSessions
    from cache import build_caches, cache_settings
    from config import load_config
    from model import DeepLog
    config = load_config(None, {"data.preprocessed_dir": path, "lazy_loading.cache_dir": cache_dir,
                                      "model.embedding_dim": 8, "model.hidden_size": 8,
                                      "model.num_layers": 1})
    anonymous = AnonymousPeak()
    started = time.time()
    if stage == "train":
        entries = build_caches(path, cache_settings(config, 29), cache_dir)
        train = CachedSessions(entries, 29, "train")
        windows = train.count()["windows"]
        train.set_epoch(1)
        batches = sum(1 for _ in train.batches(256))
        batches += sum(1 for _ in CachedSessions(entries, 29, "val", shuffle=False).batches(256))
        detail = {"windows": windows, "batches": batches}
    elif stage == "long":
        detail = long_sessions(config, path)
    else:
        torch.set_num_threads(2)
        model = DeepLog(29, 8, 8, 1, 0.0).eval()
        logger = logging.getLogger("deeplog")
        calibration_half, _, _ = evaluate.validation_sessions(config, {}, logger=logger)
        calibration = evaluate.fit_calibration(model, calibration_half, 10, 9, 0.001, "memory benchmark",
                                               "combined")
        normal = scoring.data_chunks(path, config, "all", logger)
        results, _ = evaluate.evaluate(model, calibration, normal, [], 10, "combined")
        detail = {"sessions": results["normal_scores"]["count"], "scored": results["normal_scores"]["scored"]}
    print(json.dumps({**detail, "seconds": time.time() - started, "anonymous_peak_mb": anonymous.stop(),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "children_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def write_long(path: Path, length: int, count: int) -> int:
    rng = random.Random(1)
    with open(path, "w") as handle:
        for number in range(count):
            events = [rng.randrange(0, 29) for _ in range(length)]
            handle.write(json.dumps({"session_id": f"long{number}", "event_ids": events}) + "\n")
    return count


def long_sessions(config, path: str) -> dict:
    import io
    import logging

    import torch

    import detect
    import evaluate
    import scoring
    from config import reader_options
    from model import DeepLog
    torch.set_num_threads(2)
    model = DeepLog(29, 8, 8, 1, 0.0).eval().set_windows(256, 32)
    logger = logging.getLogger("deeplog")
    calibration = evaluate.fit_calibration(model, scoring.data_chunks(path, config, "all", logger), 10, 9,
                                           0.001, "memory benchmark", "combined")
    results, _ = evaluate.evaluate(model, calibration, scoring.data_chunks(path, config, "all", logger), [],
                                   10, "combined")
    out = io.StringIO()
    totals = detect.score_files(model, calibration, path, reader_options(config), "probability", out)
    longest = max((json.loads(line)["event_ids"] for line in open(path)), key=len)
    model.calibration = calibration
    verdict = scoring.verdict(model, [longest])
    return {"sessions": results["normal_scores"]["count"],
            "predictions": results["next_event"]["total_predictions"],
            "detected": sum(totals.get(v, 0) for v in ("normal", "abnormal")), "verdict": verdict[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, nargs="+", default=[0.1, 0.5, 2.0], help="file sizes")
    parser.add_argument("--stages", nargs="+", choices=["train", "evaluate", "long"],
                        default=["train", "evaluate"])
    parser.add_argument("--long", nargs="+", default=["1000000x1", "100000x160"],
                        help="EVENTSxSESSIONS: the long-session cases of the `long` stage")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    print(f"{'GB':>5} {'sessions':>10} {'stage':>9} {'seconds':>8} {'peak RSS MB':>12} {'anonymous MB':>13} "
          f"{'parsers MB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        if "long" in args.stages:
            for case in args.long:
                length, count = map(int, case.split("x"))
                path = Path(tmp) / "long.jsonl"
                write_long(path, length, count)
                out = subprocess.run([sys.executable, __file__, "--child", "long", str(path), f"{tmp}/cache"],
                                     capture_output=True, text=True, check=True).stdout
                row = json.loads(out.splitlines()[-1])
                print(f"long {case}: {path.stat().st_size / 1e6:.0f} MB, {row['predictions']} predictions, "
                      f"{row['seconds']:.1f} s, peak RSS {row['peak_mb']:.0f} MB, anonymous "
                      f"{row['anonymous_peak_mb']:.0f} MB", flush=True)
            args.gigabytes = [g for g in args.gigabytes if set(args.stages) - {"long"}]
        for gigabytes in args.gigabytes:
            path = Path(tmp) / "sessions.json"
            sessions = write_data(path, gigabytes)
            for stage in [s for s in args.stages if s != "long"]:
                out = subprocess.run([sys.executable, __file__, "--child", stage, str(path), f"{tmp}/cache"],
                                     capture_output=True, text=True, check=True).stdout
                row = json.loads(out.splitlines()[-1])
                print(f"{path.stat().st_size / 1e9:>5.2f} {sessions:>10} {stage:>9} {row['seconds']:>8.1f} "
                      f"{row['peak_mb']:>12.0f} {row['anonymous_peak_mb']:>13.0f} "
                      f"{row['children_peak_mb']:>11.0f}",
                      flush=True)
            path.unlink()
            subprocess.run(["rm", "-rf", f"{tmp}/cache"], check=True)


if __name__ == "__main__":
    main()
