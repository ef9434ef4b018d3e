r"""Parsing quality and speed of preprocess.py: loghub grouping accuracy, lines/s and peak memory.

Examples:

    python benchmarks/parsing.py                       # accuracy on the loghub 2k samples + 1M-line speed run
    python benchmarks/parsing.py --lines 200000 --sweep   # smaller speed run; accuracy over several --similarity
    python benchmarks/parsing.py --skip-speed

Accuracy: loghub's grouping accuracy (Zhu et al., ICSE-SEIP 2019): a line is correct when the set of lines
sharing its parsed template equals the set sharing its ground-truth EventId. Measured on HDFS_2k and BGL_2k
of ../shared/data/loghub (a) with the log-parsing benchmark's settings (its masks only, st 0.5, depth 4) and
(b) with preprocess.py's defaults: its default masks and --similarity, no per-log tuning.

Speed: preprocess.py as a subprocess on a generated HDFS-like log (every HDFS_v1 template, its <*> filled
with plausible values, blocks interleaved), grouped by block; lines/s and peak RSS once the sessions are
written (as preprocess.py reports them in sources.json: before it imports torch to validate config.yaml),
at two sizes: with sessions held until the end of the input (memory grows with the sessions, not the
lines) and with --session-idle (flat: equal peaks). The generated blocks live ~40,000 lines each.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOGHUB = REPO.parent / "shared" / "data" / "loghub"
sys.path.insert(0, str(REPO))

import preprocess  # noqa: E402

BENCHMARK = {  # the log-parsing benchmark's settings (../shared/data/loghub/README.md) and Drain's accuracy
    "HDFS": dict(log_format="<Date> <Time> <Pid> <Level> <Component>: <Content>",
                 masks=[r"blk_-?\d+", r"(\d+\.){3}\d+(:\d+)?"], published=0.9975),
    "BGL": dict(log_format="<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> "
                           "<Content>", masks=[r"core\.\d+"], published=0.9625),
}


def parse_lines(lines: list[str], cfg: preprocess.PreprocessConfig) -> list:
    """The event ID of every line (None where the line does not match the log format)."""
    parser = preprocess.Parser(cfg)
    ids = []
    for line in lines:
        match = parser.regex.match(line)
        ids.append(None if match is None else parser.parse(match.group("Content")))
    return ids


def grouping_accuracy(predicted: list, truth: list) -> float:
    """loghub's definition; a line the format does not match is a group of its own."""
    predicted = [("unmatched", i) if p is None else p for i, p in enumerate(predicted)]
    truth_size = collections.Counter(truth)
    groups = collections.defaultdict(list)
    for p, t in zip(predicted, truth):
        groups[p].append(t)
    correct = sum(len(members) for members in groups.values()
                  if len(set(members)) == 1 and truth_size[members[0]] == len(members))
    return correct / len(truth)


def accuracy_table(similarities: list[float]) -> list[tuple]:
    rows = []
    for system, settings in BENCHMARK.items():
        log = LOGHUB / f"{system}_2k.log"
        lines = log.read_text().splitlines()
        with open(LOGHUB / f"{system}_2k.log_structured.csv", newline="") as handle:
            truth = [row["EventId"] for row in csv.DictReader(handle)]
        assert len(lines) == len(truth), f"{log}: {len(lines)} lines, {len(truth)} ground-truth rows"
        cases = [("benchmark masks, st 0.5, depth 4",
                  preprocess.PreprocessConfig(log_format=settings["log_format"], masks=settings["masks"],
                                              default_masks=False, similarity=0.5, depth=4))]
        for st in similarities:
            default = " (default)" if st == preprocess.PreprocessConfig.similarity else ""
            cases.append((f"default masks, st {st}{default}",
                          preprocess.PreprocessConfig(log_format=settings["log_format"], similarity=st)))
        for name, cfg in cases:
            started = time.perf_counter()
            predicted = parse_lines(lines, cfg)
            speed = len(lines) / (time.perf_counter() - started)
            templates = len({p for p in predicted if p is not None})
            rows.append((system, name, grouping_accuracy(predicted, truth), settings["published"], templates,
                         len(set(truth)), speed))
    return rows


def fill(template: str, rng: random.Random, block: str) -> str:
    """A plausible HDFS content line from an HDFS_v1 template: the leading <*> (a prefix such as an address)
    dropped, the next one the block id, the others addresses, sizes or paths, spaces around each."""
    parts = template.removeprefix("<*>").split("<*>")
    values = [block] + [rng.choice((f"/10.25{rng.randrange(10)}.{rng.randrange(256)}.{rng.randrange(256)}:50010",
                                    str(rng.randrange(10 ** 8)),
                                    f"/user/root/rand/_temporary/_task_200811092030_0001_m_{rng.randrange(10 ** 6):06d}"
                                    f"_0/part-{rng.randrange(10 ** 5):05d}")) for _ in parts[2:]]
    return " ".join((parts[0] + "".join(f" {value} {part}" for value, part in zip(values, parts[1:]))).split())


def generate_hdfs(path: Path, lines: int, seed: int = 0) -> None:
    """Interleaved blocks, each a run of events drawn from the HDFS_v1 templates, in time order."""
    rng = random.Random(seed)
    with open(LOGHUB / "HDFS_templates.csv", newline="") as handle:
        templates = [row["EventTemplate"].strip() for row in csv.DictReader(handle)]
    active: list = []
    written = 0
    with open(path, "w") as out:
        while written < lines:
            if len(active) < 2000 or rng.random() < 0.05:
                active.append([f"blk_{rng.choice(['-', ''])}{rng.randrange(10**18)}", rng.randrange(10, 30)])
            slot = rng.randrange(len(active))
            block, left = active[slot]
            second = written // 10
            out.write(f"0811{9 + second // 86400:02d} {second % 86400 // 3600:02d}{second % 3600 // 60:02d}"
                      f"{second % 60:02d} {rng.randrange(1000)} INFO dfs.DataNode: "
                      f"{fill(rng.choice(templates), rng, block)}\n")
            written += 1
            if left <= 1:
                active[slot] = active[-1]
                active.pop()
            else:
                active[slot][1] -= 1


def speed_run(lines: int, workdir: Path, flags: list[str]) -> tuple[float, float, float]:
    """(lines/s, peak RSS in MB) of preprocess.py on a generated log of `lines` lines."""
    log = workdir / f"hdfs_{lines}.log"
    if not log.exists():
        generate_hdfs(log, lines)
    output = workdir / f"out_{lines}_{len(flags)}"
    command = [sys.executable, str(REPO / "preprocess.py"), str(log), "--output", str(output),
               "--session-key", r"blk_-?\d+", "--log-format", BENCHMARK["HDFS"]["log_format"], *flags,
               "--config", str(REPO / "config.yaml")]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"preprocess.py failed: {result.stderr.strip()}")
    stats = json.loads((output / "sources.json").read_text())["stats"]
    print(f"  {result.stdout.strip()}", flush=True)
    return lines / elapsed, stats["lines_per_s"], stats["peak_rss_mb"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines of the large generated log")
    parser.add_argument("--sweep", action="store_true", help="default masks at several --similarity values")
    parser.add_argument("--skip-speed", action="store_true", help="accuracy only")
    args = parser.parse_args()
    if not (LOGHUB / "HDFS_2k.log").exists():
        raise SystemExit(f"{LOGHUB} is absent: nothing to measure")
    similarities = [0.3, 0.4, 0.45, 0.5, 0.6, 0.7] if args.sweep else [preprocess.PreprocessConfig.similarity]
    print(f"{'log':5} {'settings':40} {'accuracy':>8} {'Drain':>7} {'templ.':>6} {'truth':>5} {'lines/s':>8}")
    for system, name, accuracy, published, templates, truth, speed in accuracy_table(similarities):
        print(f"{system:5} {name:40} {accuracy:8.4f} {published:7.4f} {templates:6} {truth:5} {speed:8,.0f}")
    if args.skip_speed:
        return
    print("speed (preprocess.py, HDFS-like log, sessions by block, end to end incl. writing):")
    with tempfile.TemporaryDirectory() as tmp:
        for flags in ([], ["--session-idle", "100000"]):
            print(f"  {' '.join(flags) or 'sessions open until the end of the input'}:")
            for lines in (args.lines // 5, args.lines):
                overall, parsing, peak = speed_run(lines, Path(tmp), flags)
                print(f"  {lines:>10,} lines: {parsing:9,.0f} lines/s reading+parsing+grouping+writing, "
                      f"{overall:9,.0f} lines/s with start-up and config; peak RSS {peak:7.1f} MB", flush=True)


if __name__ == "__main__":
    main()
