"""Live detection speed: lines per second, and the delay from a line being written to its early alert.

Examples:

    python benchmarks/live.py                                  # ../shared/data/hdfs, the default recipe
    python benchmarks/live.py --work runs/live --lines 1000000 --rate 50000 --seconds 20
    python benchmarks/live.py --work runs/live --checkpoint runs/live/train/checkpoints/best_model.pt  # reuse

Steps, end to end with the project's own scripts:
1. A raw HDFS-like log: the event sequences of ../shared/data/hdfs (hdfs_train for training; hdfs_dev_normal
   with 3% hdfs_dev_abnormal sessions for detection) written as HDFS DataNode/NameSystem lines (loghub's
   HDFS templates, random IPs, sizes and block IDs), --concurrent sessions interleaved at random as in a
   real cluster log.
2. preprocess.py on the training log (Drain, --session-key blk_...), train.py on its sessions (the recipe
   of config.yaml, --epochs), which calibrates as always.
3. Throughput: detect.py --follow on a log of --lines lines already written: its own count, logged when it
   stops ("lines/s": lines per second of reading, parsing and scoring; before 2026-12-07, per second from
   the first line read to the last one scored, the polls between blocks included).
4. Delay: detect.py --follow on a log that a writer appends to at --rate lines per second (in bursts every
   10 ms) for --seconds; each early alert's delay is the time it appeared in the output minus the time its
   line ("at") was written. Prints the percentiles.
Both on this machine's cores (2 here), the writer included. Figures: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def templates() -> dict[int, str]:
    """Event key k of the DeepLog HDFS sets -> loghub's HDFS template E<k>."""
    with open(SHARED / "loghub" / "HDFS_templates.csv", newline="") as handle:
        return {int(row["EventId"][1:]): row["EventTemplate"] for row in csv.DictReader(handle)}


def render(template: str, block: str, rng: random.Random) -> str:
    values = iter([f"10.250.{rng.randrange(256)}.{rng.randrange(256)}:50010", str(rng.randrange(1, 67108864)),
                   f"/user/root/rand/_temporary/part-{rng.randrange(99999):05d}",
                   str(rng.randrange(100))] * 4)
    text = template.replace("<*>", " ", 1) if template.startswith("<*>") else template
    while "<*>" in text:
        text = text.replace("<*>", f" {next(values)} ", 1)
    return f"081109 {rng.randrange(240000):06d} {rng.randrange(1, 999)} INFO dfs.DataNode: " \
           f"{' '.join(text.split())} {block}"


def sessions(path: Path) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in open(path) if line.strip()]


def interleave(pool: list[list[int]], lines: int, concurrent: int, rng: random.Random,
               names: dict[int, str]):
    """Raw lines of sessions drawn from `pool`, `concurrent` of them open at a time, until `lines` lines."""
    active, written, next_block = [], 0, 0
    while written < lines:
        while len(active) < concurrent:
            next_block += 1
            active.append([f"blk_{rng.getrandbits(62) - (1 << 61)}", rng.choice(pool), 0])
        pick = rng.randrange(len(active))
        block, events, at = active[pick]
        yield render(names[events[at]], block, rng)
        written += 1
        active[pick][2] += 1
        if active[pick][2] == len(events):
            active[pick] = active[-1]
            active.pop()


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, capture_output=True, text=True,
                            **kwargs)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def train(work: Path, epochs: int, rng: random.Random, names: dict) -> Path:
    log = work / "train.log"
    with open(log, "w") as handle:
        pool = sessions(SHARED / "hdfs" / "hdfs_train")
        total = sum(map(len, pool))
        handle.writelines(line + "\n" for line in interleave(pool, total, 200, rng, names))
    run(["preprocess.py", log, "--output", work / "parsed", "--log-format",
         "<Date> <Time> <Pid> <Level> <Component>: <Content>", "--session-key", r"blk_-?\d+"])
    started = time.time()
    run(["train.py", "--config", work / "parsed" / "config.yaml", "--output-dir", work / "train",
         "--epochs", epochs, "--overwrite"])
    print(f"trained in {time.time() - started:.0f} s")
    return work / "train" / "checkpoints" / "best_model.pt"


def detection_pool() -> list[list[int]]:
    normal = sessions(SHARED / "hdfs" / "hdfs_dev_normal")
    abnormal = sessions(SHARED / "hdfs" / "hdfs_dev_abnormal")
    return normal * 97 + abnormal[:300]   # about 3% abnormal sessions


def detect_command(checkpoint: Path, work: Path, log: Path, output: Path) -> list:
    return [sys.executable, "detect.py", "--checkpoint", checkpoint, log, "--parser-state",
            work / "parsed" / "parser_state.json", "--follow", "--output", output, "--idle-lines", "50000"]


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    return stderr


def throughput(checkpoint: Path, work: Path, lines: int, concurrent: int, rng, names) -> None:
    log, output = work / "throughput.log", work / "throughput.jsonl"
    for path in (output, Path(f"{output}.state")):
        path.unlink(missing_ok=True)
    with open(log, "w") as handle:
        handle.writelines(line + "\n" for line in interleave(detection_pool(), lines, concurrent, rng, names))
    size = log.stat().st_size
    process = subprocess.Popen(list(map(str, detect_command(checkpoint, work, log, output))), cwd=REPO,
                               stderr=subprocess.PIPE, text=True)
    state = Path(f"{output}.state")
    import torch

    seen = None
    while True:   # until the saved place is the end of the log (read when the state changed: it is big)
        time.sleep(1)
        try:
            changed = state.stat().st_mtime
            if changed != seen and torch.load(state, weights_only=True)["sources"][0]["offset"] >= size:
                break
            seen = changed
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
    stderr = stop(process)
    speed = [line for line in stderr.splitlines() if "lines/s" in line]
    print(f"throughput on {lines:,} lines: {speed[-1] if speed else stderr[-2000:]}")


def delay(checkpoint: Path, work: Path, rate: int, seconds: float, concurrent: int, rng, names) -> None:
    log, output = work / "delay.log", work / "delay.jsonl"
    for path in (log, output, Path(f"{output}.state")):
        path.unlink(missing_ok=True)
    lines = list(interleave(detection_pool(), int(rate * seconds), concurrent, rng, names))
    log.touch()
    process = subprocess.Popen(list(map(str, detect_command(checkpoint, work, log, output))), cwd=REPO,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(8)   # the model loads
    written: dict[int, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def read_alerts():
        while not output.exists():
            time.sleep(0.01)
        with open(output) as handle:
            partial = ""
            while not done.is_set():
                line = partial + handle.readline()
                if not line.endswith("\n"):   # nothing new, or half a write so far
                    partial = line
                    time.sleep(0.005)
                    continue
                partial = ""
                record = json.loads(line)
                if record.get("alert") == "early":
                    seen.setdefault(record["at"], time.time())

    reader = threading.Thread(target=read_alerts)
    reader.start()
    burst = max(1, rate // 100)
    started = time.time()
    with open(log, "a") as handle:
        for first in range(0, len(lines), burst):
            target = started + first / rate
            time.sleep(max(0.0, target - time.time()))
            handle.write("".join(line + "\n" for line in lines[first:first + burst]))
            handle.flush()
            now = time.time()
            for number in range(first + 1, first + burst + 1):
                written[number] = now
    achieved = len(lines) / (time.time() - started)
    time.sleep(3)
    done.set()
    reader.join()
    stop(process)
    delays = sorted(seen[at] - written[int(at.rsplit(":", 1)[1])] for at in seen)
    if not delays:
        print("no early alert")
        return
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]  # noqa: E731
    print(f"delay at {achieved:,.0f} lines/s written for {seconds:g} s: {len(delays)} early alerts, "
          f"p50 {pick(0.5) * 1000:.0f} ms, p95 {pick(0.95) * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/deeplog-live", help="where the logs and the run go")
    parser.add_argument("--checkpoint", help="reuse this checkpoint (and WORK/parsed/parser_state.json)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (the recipe's otherwise)")
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines of the throughput log")
    parser.add_argument("--rate", type=int, default=50_000, help="lines per second written for the delay")
    parser.add_argument("--seconds", type=float, default=20, help="how long the writer writes")
    parser.add_argument("--concurrent", type=int, default=2000, help="sessions open at a time in the logs")
    args = parser.parse_args()
    if not (SHARED / "hdfs" / "hdfs_train").exists():
        sys.exit(f"needs {SHARED / 'hdfs'}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng, names = random.Random(0), templates()
    checkpoint = Path(args.checkpoint) if args.checkpoint else train(work, args.epochs, rng, names)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    throughput(checkpoint, work, args.lines, args.concurrent, rng, names)
    delay(checkpoint, work, args.rate, args.seconds, args.concurrent, rng, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
