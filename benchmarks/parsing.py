r"""Parsing quality and speed of preprocess.py: loghub grouping accuracy, lines/s and peak memory.

Examples:

    python benchmarks/parsing.py                  # accuracy on the nine loghub 2k samples + 1M-line speed run
    python benchmarks/parsing.py --skip-speed --json parsing.json   # accuracy only, also as JSON
    python benchmarks/parsing.py --lines 200000 --sweep   # smaller speed run; defaults over --similarity and
                                                          # --depth

Accuracy: loghub's grouping accuracy (Zhu et al., ICSE-SEIP 2019): a line is correct when the set of lines
sharing its parsed template equals the set sharing its ground-truth EventId. On each of the nine systems of
../shared/data/loghub, in the same run:
  ours      preprocess.py's parser with the log-parsing benchmark's settings for that log (its format, masks,
            similarity and depth as ../shared/data/loghub/README.md lists them; no default masks);
  drain3    drain3's TemplateMiner run directly with the same settings: masks as drain3 MaskingInstructions
            replaced by <*>, sim_th, depth, and the content cut out with logparser's own format regex
            (generate_logformat_regex: lazy fields, `\s+` for spaces) on the stripped line;
  published Drain's accuracy in the benchmark paper;
  defaults  preprocess.py with the log format only: its default masks, --similarity and --depth.

Speed: preprocess.py as a subprocess on a generated HDFS-like log (every HDFS_v1 template, its <*> filled
with plausible values, blocks interleaved), grouped by block; lines/s and peak RSS once the sessions are
written, as preprocess.py reports them in sources.json: the peak includes the interpreter and its imports
(utils, so torch), which sources.json also gives alone (start_rss_mb, the peak when the parse starts), so the
parse's own growth is the difference. At two sizes: with sessions held until the end of the input (memory
grows with the sessions, not the lines) and with --session-idle (flat: equal peaks). The generated blocks
live ~40,000 lines each.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOGHUB = REPO.parent / "shared" / "data" / "loghub"
sys.path.insert(0, str(REPO))

import logparse  # noqa: E402
import preprocess  # noqa: E402

# The log-parsing benchmark's settings, verbatim from ../shared/data/loghub/README.md (logpai/logparser's
# Drain/benchmark.py), and Drain's published accuracy. In that table Android's third mask shows its `|` as
# `\|` (a Markdown table's escape); the regex itself is an alternation.
BENCHMARK = {
    "HDFS": dict(log_format="<Date> <Time> <Pid> <Level> <Component>: <Content>",
                 masks=[r"blk_-?\d+", r"(\d+\.){3}\d+(:\d+)?"], st=0.5, depth=4, published=0.998),
    "BGL": dict(log_format="<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> "
                           "<Content>", masks=[r"core\.\d+"], st=0.5, depth=4, published=0.963),
    "HPC": dict(log_format="<LogId> <Node> <Component> <State> <Time> <Flag> <Content>", masks=[r"=\d+"],
                st=0.5, depth=4, published=0.887),
    "Windows": dict(log_format="<Date> <Time>, <Level>                  <Component>    <Content>",
                    masks=[r"0x.*?\s"], st=0.7, depth=5, published=0.997),
    "Linux": dict(log_format=r"<Month> <Date> <Time> <Level> <Component>(\[<PID>\])?: <Content>",
                  masks=[r"(\d+\.){3}\d+", r"\d{2}:\d{2}:\d{2}"], st=0.39, depth=6, published=0.690),
    "Android": dict(log_format="<Date> <Time>  <Pid>  <Tid> <Level> <Component>: <Content>",
                    masks=[r"(/[\w-]+)+", r"([\w-]+\.){2,}[\w-]+",
                           r"\b(\-?\+?\d+)\b|\b0[Xx][a-fA-F\d]+\b|\b[a-fA-F\d]{4,}\b"], st=0.2, depth=6,
                    published=0.911),
    "Proxifier": dict(log_format=r"\[<Time>\] <Program> - <Content>",
                      masks=[r"<\d+\ssec", r"([\w-]+\.)+[\w-]+(:\d+)?", r"\d{2}:\d{2}(:\d{2})*", r"[KGTM]B"],
                      st=0.6, depth=3, published=0.527),
    "OpenStack": dict(log_format=r"<Logrecord> <Date> <Time> <Pid> <Level> <Component> \[<ADDR>\] <Content>",
                      masks=[r"((\d+\.){3}\d+,?)+", r"/.+?\s", r"\d+"], st=0.5, depth=5, published=0.733),
    "Mac": dict(log_format=r"<Month>  <Date> <Time> <User> <Component>\[<PID>\]( \(<Address>\))?: <Content>",
                masks=[r"([\w-]+\.){2,}[\w-]+"], st=0.7, depth=6, published=0.787),
}


def load(system: str) -> tuple[list[str], list[str]]:
    """The raw lines of a 2k sample and the ground-truth EventId of each."""
    log = LOGHUB / f"{system}_2k.log"
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    with open(LOGHUB / f"{system}_2k.log_structured.csv", newline="", encoding="utf-8") as handle:
        truth = [row["EventId"] for row in csv.DictReader(handle)]
    assert len(lines) == len(truth), f"{log}: {len(lines)} lines, {len(truth)} ground-truth rows"
    return lines, truth


def parse_lines(lines: list[str], cfg: preprocess.PreprocessConfig) -> list:
    """The event ID of every line through preprocess.py's parser (None where the format does not match)."""
    parser = logparse.Parser(cfg)
    ids = []
    for line in lines:
        match = parser.match(line)
        ids.append(None if match is None else parser.parse(match.group("Content")))
    return ids


def loghub_regex(log_format: str) -> re.Pattern:
    """logpai/logparser's generate_logformat_regex: lazy fields, literal text as a regex, spaces as \\s+."""
    parts = re.split(r"(<[^<>]+>)", log_format)
    return re.compile("^" + "".join(f"(?P<{part[1:-1]}>.*?)" if i % 2 else re.sub(" +", "\\\\s+", part)
                                    for i, part in enumerate(parts)) + "$")


def drain3_lines(lines: list[str], settings: dict) -> list:
    """The cluster of every line through drain3's TemplateMiner itself, set up as logparser's benchmark
    sets Drain up (None where logparser's format regex does not match the stripped line)."""
    from drain3 import TemplateMiner
    from drain3.masking import MaskingInstruction
    from drain3.template_miner_config import TemplateMinerConfig

    config = TemplateMinerConfig()
    config.drain_sim_th, config.drain_depth = settings["st"], settings["depth"]
    config.masking_instructions = [MaskingInstruction(mask, "*") for mask in settings["masks"]]  # -> <*>
    miner, regex = TemplateMiner(config=config), loghub_regex(settings["log_format"])
    ids = []
    for line in lines:
        match = regex.search(line.strip())
        ids.append(None if match is None else miner.add_log_message(match.group("Content"))["cluster_id"])
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


def benchmark_config(settings: dict) -> preprocess.PreprocessConfig:
    return preprocess.PreprocessConfig(log_format=settings["log_format"], masks=list(settings["masks"]),
                                       default_masks=False, similarity=settings["st"],
                                       depth=settings["depth"])


def accuracy_table(systems: list[str] | None = None, sweep: list[tuple[float, int]] = ()) -> list[dict]:
    """One row per system: accuracy of ours (benchmark settings), drain3 directly (the same), the published
    figure, ours with the defaults, and with defaults at each (similarity, depth) of `sweep`."""
    rows = []
    for system in systems or BENCHMARK:
        settings = BENCHMARK[system]
        lines, truth = load(system)
        started = time.perf_counter()
        ours = parse_lines(lines, benchmark_config(settings))
        speed = len(lines) / (time.perf_counter() - started)
        defaults = parse_lines(lines, preprocess.PreprocessConfig(log_format=settings["log_format"]))
        row = {"system": system, "ours": grouping_accuracy(ours, truth),
               "drain3": grouping_accuracy(drain3_lines(lines, settings), truth),
               "published": settings["published"], "defaults": grouping_accuracy(defaults, truth),
               "templates": len({p for p in ours if p is not None}),
               "default_templates": len({p for p in defaults if p is not None}),
               "true_templates": len(set(truth)),
               "unmatched": ours.count(None), "lines_per_s": round(speed)}
        for st, depth in sweep:
            cfg = preprocess.PreprocessConfig(log_format=settings["log_format"], similarity=st, depth=depth)
            row[f"defaults st {st} depth {depth}"] = grouping_accuracy(parse_lines(lines, cfg), truth)
        rows.append(row)
    return rows


def fill(template: str, rng: random.Random, block: str) -> str:
    """A plausible HDFS content line from an HDFS_v1 template: the leading <*> (a prefix such as an address)
    dropped, the next one the block id, the others addresses, sizes or paths, spaces around each."""
    parts = template.removeprefix("<*>").split("<*>")
    def value():
        return rng.choice((f"/10.25{rng.randrange(10)}.{rng.randrange(256)}.{rng.randrange(256)}:50010",
                           str(rng.randrange(10 ** 8)),
                           f"/user/root/rand/_temporary/_task_200811092030_0001_m_"
                           f"{rng.randrange(10 ** 6):06d}_0/part-{rng.randrange(10 ** 5):05d}"))
    values = [block] + [value() for _ in parts[2:]]
    filled = parts[0] + "".join(f" {value} {part}" for value, part in zip(values, parts[1:]))
    return " ".join(filled.split())


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


def speed_run(lines: int, workdir: Path, flags: list[str]) -> tuple[float, float, float, float]:
    """(lines/s end to end, lines/s as preprocess.py counts them, peak RSS in MB, RSS in MB when the parse
    starts) of preprocess.py on a generated log of `lines` lines."""
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
    return lines / elapsed, stats["lines_per_s"], stats["peak_rss_mb"], stats["start_rss_mb"]


def print_accuracy(rows: list[dict]) -> None:
    sweep = [key for key in rows[0] if key.startswith("defaults st")]
    print(f"{'log':10} {'ours':>7} {'drain3':>7} {'Drain':>6} {'defaults':>8}   templates: ours defaults "
          f"truth {'lines/s':>8}" + "".join(" %5s/%s" % tuple(key.split()[2::2]) for key in sweep))
    for row in rows:
        mark = " " if row["ours"] >= row["drain3"] else "!"  # below drain3 with the same settings
        print(f"{row['system']:10} {row['ours']:7.4f}{mark}{row['drain3']:7.4f} {row['published']:6.3f} "
              f"{row['defaults']:8.4f} {row['templates']:>16} {row['default_templates']:>8} "
              f"{row['true_templates']:>5} {row['lines_per_s']:8,}"
              + "".join(f" {row[key]:7.4f}" for key in sweep))
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in ("ours", "drain3", "defaults", *sweep)}
    print(f"{'mean':10} {mean['ours']:7.4f} {mean['drain3']:7.4f} {'':6} {mean['defaults']:8.4f} {'':40}"
          + "".join(f" {mean[key]:7.4f}" for key in sweep))
    below = [row["system"] for row in rows if row["ours"] < row["drain3"]]
    print(f"ours >= drain3 (the same settings) on {len(rows) - len(below)} of {len(rows)} systems"
          + (f"; below on {', '.join(below)}" if below else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines of the large generated log")
    parser.add_argument("--sweep", action="store_true",
                        help="defaults also at several --similarity and --depth")
    parser.add_argument("--skip-speed", action="store_true", help="accuracy only")
    parser.add_argument("--json", help="also write the accuracy rows to this JSON file")
    args = parser.parse_args()
    if not (LOGHUB / "HDFS_2k.log").exists():
        raise SystemExit(f"{LOGHUB} is absent: nothing to measure")
    sweep = [(st, depth) for depth in (4, 5, 6) for st in (0.4, 0.45, 0.5, 0.6)] if args.sweep else []
    rows = accuracy_table(sweep=sweep)
    print_accuracy(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.skip_speed:
        return
    print("speed (preprocess.py, HDFS-like log, sessions by block, end to end incl. writing):")
    with tempfile.TemporaryDirectory() as tmp:
        for flags in ([], ["--session-idle", "100000"]):
            print(f"  {' '.join(flags) or 'sessions open until the end of the input'}:")
            for lines in (args.lines // 5, args.lines):
                overall, parsing, peak, start = speed_run(lines, Path(tmp), flags)
                print(f"  {lines:>10,} lines: {parsing:9,.0f} lines/s reading+parsing+grouping+writing, "
                      f"{overall:9,.0f} lines/s with start-up and config; peak RSS {peak:7.1f} MB "
                      f"({start:.1f} MB at the start of the parse)", flush=True)


if __name__ == "__main__":
    main()
