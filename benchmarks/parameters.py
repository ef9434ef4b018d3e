"""Timing and parameter-value anomalies injected into real logs: recall and FPR per scorer (#25 item 5).

Examples:

    python benchmarks/parameters.py --quick                     # all four data sets, small, about 2 minutes
    python benchmarks/parameters.py                             # full run: 12,000 generated blocks, 10 epochs
                                                                # (about 8 minutes on 2 busy CPU cores)
    python benchmarks/parameters.py --datasets openstack hdfs_gen --epochs 5 --output runs/params.json
    python benchmarks/parameters.py --quick --no-key-model      # the baseline only, no train.py (seconds)

Data sets (raw logs; each is cut into a training part, kept clean, and a held-out part that is injected):

    openstack       ../shared/data/loghub/OpenStack_2k.log, windows of --window-size lines (count windows:
                    the log has no request or session id on most lines); the first half trains
    hdfs2k          ../shared/data/loghub/HDFS_2k.log, one session per block (--session-key 'blk_-?\\d+',
                    --time-field Date,Time); a random sample, so nearly every block has one line: sizes only
    hdfs2k_window   the same log in count windows: the gaps between its lines, sizes
    hdfs_gen        a generated HDFS log with HDFS_2k's line formats: many blocks, write times that follow
                    the size, reads, scans, re-replication, deletion; seconds resolution like HDFS. Built-in
                    context: the first "Deleting block" follows "ask ... to delete" within seconds, or
                    "NameSystem.delete ... invalidSet" (no ask) after about ten minutes

Anomalies are injected into the raw lines of the held-out part, which then go through preprocess.py (with
the training part's parser state), as detection would see them. One copy of the held-out log per kind, with
--share of the eligible sessions injected (each at one event), and the clean copy:

    slowed          a request's duration x 5-20 (OpenStack's "time: 0.2477"); in hdfs_gen the write of a
                    block (the gap before its first "Received block") x 5-20
    delayed         a gap of 5-20 x the training's 99.5% gap of that event type before one event; with
                    sessions by id the session's later lines move (the file is re-sorted by time), in
                    windows every later line of the file moves (a stall), so no other gap changes
    out_of_range    a size or length (OpenStack "len: N", HDFS "size N") x 20-100 (of the value or of its
                    99.5% training quantile, the larger: a small HDFS tail block x 20 is still a normal size)
    context         a gap or value that is normal for the event after one predecessor but not after the
                    predecessor it has: pairs found in the training part (the value of event E after B lies
                    outside its range after A, yet within E's range over all predecessors); in hdfs_gen only
                    at the built-in step ("Deleting block"). The per-event-type baseline cannot see these
                    by construction

Each injected session is labelled with its kind; every injection is checked against what preprocess.py then
extracts (times and values), and failures are reported. Recall = flagged injected sessions / injected ones of
that kind; FPR = flagged sessions of the clean held-out copy / its sessions (the same sessions as the
untouched ones of the injected copies, which the JSON also counts).

Scorers:

    baseline        per (event type, slot): slot 0 the gap since the session's previous event, slots 1-4
                    its values. Bounds: the 0.5%/99.5% quantiles of the training sessions (slots seen at
                    least --baseline-min-count times); a session's score is its largest excess beyond a
                    bound (in robust spreads, 1.4826 MAD, at least 0.1, on an asinh, i.e. log-like, scale);
                    the threshold flags at most --target-fpr of the training sessions, each scored out of
                    fold (4 interleaved folds, bounds fitted on the other three). No model
    key_model       train.py on the training part's sessions, then detect.py's default verdict: the log-key
                    model (and its event-set/pair records); it sees no value or time, so it should miss most
                    of these anomalies
    parameter       the parameter-value model's rule (values.py), trained in the same train.py run as the key
                    model, its threshold fitted at the default evaluation.target_fpr (0.05%)
    combined        abnormal when the key model's default verdict or the parameter rule says so

Everything is seeded (--seed): the generated log, the injections, train.py's weights. Work files go to
--work-dir (each data set's subfolder is replaced at every run); the figures to --output as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
LOGHUB = REPO.parent / "shared" / "data" / "loghub"
KINDS = ("slowed", "delayed", "out_of_range", "context")
SCORERS = ("baseline", "key_model", "parameter", "combined")
MARKER = ".parameters-benchmark"
MAX_SLOTS = 4          # values kept per event by preprocess.py
HDFS_FORMAT = "<Date> <Time> <Pid> <Level> <Component>: <Content>"
OPENSTACK_FORMAT = r"<Logrecord> <Date> <Time> <Pid> <Level> <Component> \[<ADDR>\] <Content>"


@dataclass
class Dataset:
    """How to read, split, group and inject one log."""
    name: str
    log_format: str
    grouping: list[str]                      # preprocess.py flags that group the lines
    time_format: str                         # strptime of the "Date Time" text
    time_re: re.Pattern                      # group 1: the "Date Time" text of a raw line
    content_re: re.Pattern                   # matches the header before the content
    by_id: bool                              # sessions by id (re-sort after moving lines) or windows
    kinds: tuple[str, ...]
    fields: dict[str, re.Pattern] = field(default_factory=dict)   # kind -> number to rewrite (group 1)
    slowed_gap_re: re.Pattern | None = None  # slowed as a longer gap before the first line matching this
    context_re: re.Pattern | None = None     # context anomalies only at events whose template matches
    source: Path | None = None               # None: generated
    train_fraction: float = 0.5


def datasets(window_size: int) -> dict[str, Dataset]:
    hdfs_time = re.compile(r"^(\d{6} \d{6}) ")
    hdfs_content = re.compile(r"^\d{6} \d{6} \d+ \w+ [^:]+: ")
    hdfs_id = ["--session-key", r"blk_-?\d+", "--time-field", "Date,Time", "--time-format", "%y%m%d %H%M%S"]
    hdfs_window = ["--window", f"count:{window_size}", "--time-field", "Date,Time",
                   "--time-format", "%y%m%d %H%M%S"]
    size = re.compile(r"\bsize (\d+)\b")
    return {
        "openstack": Dataset(
            "openstack", OPENSTACK_FORMAT,
            ["--window", f"count:{window_size}", "--time-field", "Date,Time",
             "--time-format", "%Y-%m-%d %H:%M:%S.%f"],
            "%Y-%m-%d %H:%M:%S.%f", re.compile(r"^\S+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) "),
            re.compile(r"^\S+ \S+ \S+ \d+ \w+ \S+ \[[^\]]*\] "), False, KINDS,
            {"slowed": re.compile(r"\btime: (\d+\.\d+)$"), "out_of_range": re.compile(r"\blen: (\d+)\b")},
            source=LOGHUB / "OpenStack_2k.log"),
        "hdfs2k": Dataset(
            "hdfs2k", HDFS_FORMAT, hdfs_id, "%y%m%d %H%M%S", hdfs_time, hdfs_content, True,
            ("delayed", "out_of_range", "context"), {"out_of_range": size}, source=LOGHUB / "HDFS_2k.log"),
        "hdfs2k_window": Dataset(
            "hdfs2k_window", HDFS_FORMAT, hdfs_window, "%y%m%d %H%M%S", hdfs_time, hdfs_content, False,
            ("delayed", "out_of_range", "context"), {"out_of_range": size}, source=LOGHUB / "HDFS_2k.log"),
        "hdfs_gen": Dataset(
            "hdfs_gen", HDFS_FORMAT, hdfs_id, "%y%m%d %H%M%S", hdfs_time, hdfs_content, True, KINDS,
            {"out_of_range": size}, slowed_gap_re=re.compile(r"Received block \S+ of size \d+ from"),
            context_re=re.compile(r"^Deleting block ")),
    }


# ----------------------------------------------------------------------------- a generated HDFS-like log

def generate_hdfs(blocks: int, start: float, rng: np.random.Generator) -> list[str]:
    """HDFS_2k's line formats for `blocks` block lifecycles from `start` (epoch seconds), sorted by time.

    Allocation, a pipeline of three datanodes receiving (the write takes size / throughput: a full 64 MiB
    block about 1.7 s), each replica's Received/PacketResponder/addStoredBlock, reads (some failing), block
    scans hours later, an occasional re-replication, and deletion in one of two ways: "NameSystem.delete"
    then "ask ... to delete" then "Deleting block" seconds after the ask, or "NameSystem.delete" then
    "Deleting block" about ten minutes later (at the next block report): the gap before the first
    "Deleting block" depends on its predecessor."""
    nodes = [f"10.25{rng.integers(0, 2)}.{rng.integers(1, 255)}.{rng.integers(1, 255)}" for _ in range(120)]
    events: list[tuple[float, int, str]] = []
    span = blocks * 4.0                                          # about a block every 4 s

    def add(t, pid, level, component, content):
        events.append((t, len(events), f"{pid} {level} {component}: {content}"))

    for _ in range(blocks):
        blk = f"blk_{int(rng.integers(-2 ** 62, 2 ** 62))}"
        t0 = start + rng.uniform(0, span)
        pipe = [nodes[i] for i in rng.choice(len(nodes), 3, replace=False)]
        full = rng.random() < 0.8
        size = 67108864 if full else int(math.exp(rng.uniform(math.log(1e4), math.log(67108864))))
        task = int(rng.integers(0, 2000))
        add(t0, 28, "INFO", "dfs.FSNamesystem", "BLOCK* NameSystem.allocateBlock: /user/root/rand/"
            f"_temporary/_task_200811092030_0001_m_{task:06d}_0/part-{task:05d}. {blk}")
        for k, node in enumerate(pipe):
            src = pipe[k - 1] if k else pipe[0]
            add(t0 + rng.uniform(0.01, 0.6), int(rng.integers(100, 9000)), "INFO", "dfs.DataNode$DataXceiver",
                f"Receiving block {blk} src: /{src}:{rng.integers(30000, 60000)} dest: /{node}:50010")
        write = size / rng.lognormal(math.log(40e6), 0.3) + 0.6
        end = t0
        for k in (2, 1, 0):
            t = t0 + write + rng.uniform(0, 0.3) + 0.05 * (2 - k)
            pid = int(rng.integers(100, 9000))
            add(t, pid, "INFO", "dfs.DataNode$PacketResponder", f"Received block {blk} of size {size} from "
                f"/{pipe[max(k - 1, 0)]}")
            add(t + rng.uniform(0, 0.05), pid, "INFO", "dfs.DataNode$PacketResponder",
                f"PacketResponder {k} for block {blk} terminating")
            t_stored = t + rng.uniform(0.05, 0.8)
            add(t_stored, 29, "INFO", "dfs.FSNamesystem", "BLOCK* NameSystem.addStoredBlock: blockMap "
                f"updated: {pipe[k]}:50010 is added to {blk} size {size}")
            end = max(end, t_stored)
        last = end
        t = end
        for _ in range(rng.poisson(0.8)):
            t += rng.lognormal(math.log(300), 1.0)
            node, reader = pipe[rng.integers(0, 3)], nodes[rng.integers(0, len(nodes))]
            if rng.random() < 0.15:
                add(t, int(rng.integers(100, 9000)), "WARN", "dfs.DataNode$DataXceiver",
                    f"{node}:50010:Got exception while serving {blk} to /{reader}:")
            else:
                add(t, int(rng.integers(100, 9000)), "INFO", "dfs.DataNode$DataXceiver",
                    f"{node}:50010 Served block {blk} to /{reader}")
            last = max(last, t)
        if rng.random() < 0.3:
            t = end + rng.lognormal(math.log(7200), 0.5)
            add(t, 13, "INFO", "dfs.DataBlockScanner", f"Verification succeeded for {blk}")
            last = max(last, t)
        if rng.random() < 0.05:
            t = end + rng.lognormal(math.log(3600), 0.7)
            source, target = pipe[rng.integers(0, 3)], nodes[rng.integers(0, len(nodes))]
            add(t, 19, "INFO", "dfs.FSNamesystem", f"BLOCK* ask {source}:50010 to replicate {blk} to "
                f"datanode(s) {target}:50010")
            t += rng.uniform(0.5, 2.5)
            add(t, int(rng.integers(100, 9000)), "INFO", "dfs.DataNode",
                f"{source}:50010 Starting thread to transfer block {blk} to {target}:50010")
            t += size / rng.lognormal(math.log(40e6), 0.3) + rng.uniform(0.1, 1.0)
            add(t, int(rng.integers(100, 9000)), "INFO", "dfs.DataNode$DataXceiver",
                f"Received block {blk} src: /{source}:{rng.integers(30000, 60000)} dest: /{target}:50010 "
                f"of size {size}")
            last = max(last, t)
        if rng.random() < 0.6:
            t_del = max(end + rng.lognormal(math.log(4 * 3600), 0.6), last + 60)
            for node in pipe:
                add(t_del + rng.uniform(0, 0.5), 29, "INFO", "dfs.FSNamesystem",
                    f"BLOCK* NameSystem.delete: {blk} is added to invalidSet of {node}:50010")
            asked = rng.random() < 0.6
            base = t_del + rng.lognormal(math.log(600), 0.4) if not asked else None
            for node in pipe:
                if asked:
                    t_ask = t_del + rng.uniform(1, 3)
                    add(t_ask, 19, "INFO", "dfs.FSNamesystem", f"BLOCK* ask {node}:50010 to delete  {blk}")
                    t_gone = t_ask + rng.lognormal(math.log(2), 0.5)
                else:
                    t_gone = base + rng.uniform(0, 2)
                add(t_gone, 19, "INFO", "dfs.FSDataset", f"Deleting block {blk} file "
                    f"/mnt/hadoop/dfs/data/current/subdir{rng.integers(0, 64)}/{blk}")
    events.sort()
    return [f"{time.strftime('%y%m%d %H%M%S', time.gmtime(int(t)))} {rest}" for t, _, rest in events]


# ----------------------------------------------------------------------------- raw lines, times, values

def parse_time(ds: Dataset, line: str) -> float | None:
    match = ds.time_re.match(line)
    if not match:
        return None
    return datetime.strptime(match.group(1), ds.time_format).replace(tzinfo=timezone.utc).timestamp()


def with_time(ds: Dataset, line: str, t: float) -> str:
    match = ds.time_re.match(line)
    if "%f" in ds.time_format:                  # milliseconds, as OpenStack writes them
        ms = int(round(t * 1000))
        moment = datetime.fromtimestamp(ms // 1000, timezone.utc)
        text = moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d}"
    else:
        text = datetime.fromtimestamp(round(t), timezone.utc).strftime(ds.time_format)
    return line[:match.start(1)] + text + line[match.end(1):]


def number_text(old: str, value: float) -> str:
    """`value` written like `old`: an integer, or as many decimals."""
    if "." not in old:
        return str(int(round(value)))
    return f"{value:.{len(old.split('.')[1])}f}"


def value_span(ds: Dataset, line: str, slot: int) -> tuple[int, int] | None:
    """Where the `slot`-th numeric parameter (0-based) is in a raw line, by preprocess.py's rule (logparse.
    line_values: each word of the content that is a finite number, a trailing , ; . allowed)."""
    header = ds.content_re.match(line)
    if not header:
        return None
    found = 0
    for word in re.finditer(r"\S+", line[header.end():]):
        text = word.group()
        if not (text[0].isdigit() or text[0] == "-"):
            continue
        end = word.end() - (text[-1] in ",;.")
        text = text[:-1] if text[-1] in ",;." else text
        try:
            value = float(text)
        except ValueError:
            continue
        if math.isfinite(value) and "_" not in text:
            if found == slot:
                return header.end() + word.start(), header.end() + end
            found += 1
    return None


def run(command: list[str], env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} failed with exit code {done.returncode}:\n"
                 f"{done.stderr[-3000:]}")
    return done.stderr


def preprocess(ds: Dataset, log: Path, out: Path, parser_state: Path | None = None) -> list[dict]:
    """preprocess.py on one raw file; the sessions, each with "line_numbers" (0-based, one per event)."""
    command = [sys.executable, "preprocess.py", str(log), "--output", str(out), *ds.grouping]
    # the parser state fixes the log format (and masks, Drain settings): the same event IDs as training
    command += ["--parser-state", str(parser_state)] if parser_state else ["--log-format", ds.log_format]
    run(command)
    sessions = []
    with open(out / "sessions.jsonl") as f:
        for line in f:
            session = json.loads(line)
            numbers = [first - 1 + k for _, first, count in session["lines"] for k in range(count)]
            session["line_numbers"] = numbers if len(numbers) == len(session["event_ids"]) else None
            sessions.append(session)
    return sessions


def slots(session: dict):
    """(position, event, slot, value, predecessor) for every gap (slot 0) and value (slots 1..4)."""
    events, times = session["event_ids"], session.get("times") or [None] * len(session["event_ids"])
    values = session.get("values") or [[]] * len(events)
    for i, event in enumerate(events):
        previous = events[i - 1] if i else None
        if i and times[i] is not None and times[i - 1] is not None:
            yield i, event, 0, times[i] - times[i - 1], previous
        for j, value in enumerate(values[i][:MAX_SLOTS]):
            yield i, event, j + 1, value, previous


def extraction_report(sessions: list[dict], templates: dict[int, str]) -> dict:
    """What preprocess.py kept: unknown times, negative gaps, templates whose value count varies."""
    events = sum(len(s["event_ids"]) for s in sessions)
    null_times = sum(t is None for s in sessions for t in s.get("times") or [])
    negative = sum(1 for s in sessions for _, _, slot, x, _ in slots(s) if slot == 0 and x < 0)
    counts = defaultdict(Counter)
    for s in sessions:
        for event, values in zip(s["event_ids"], s.get("values") or []):
            counts[event][len(values)] += 1
    varying = {templates.get(e, str(e)): dict(c) for e, c in counts.items() if len(c) > 1}
    multi = sum(len(s["event_ids"]) > 1 for s in sessions)
    return {"sessions": len(sessions), "events": events, "sessions_with_2_or_more_events": multi,
            "times_missing": "times" not in sessions[0] if sessions else None, "null_times": null_times,
            "negative_gaps": negative, "templates_with_varying_value_counts": varying}


# ----------------------------------------------------------------------------- the per-event-type baseline

class QuantileBaseline:
    """Per (event type, slot) quantile bounds; a session's score is its largest excess beyond them."""

    def __init__(self, resolution: float, low: float = 0.005, high: float = 0.995, min_count: int = 5):
        self.resolution, self.low, self.high, self.min_count = resolution, low, high, min_count
        self.bounds: dict[tuple[int, int], tuple[float, float, float, float]] = {}
        self.threshold = 0.0

    def scale(self, slot: int, values: np.ndarray) -> float:
        """The unit of asinh(x / c): the time resolution for gaps, a hundredth of the median for values."""
        if slot == 0:
            return self.resolution
        magnitude = np.abs(values)
        median = float(np.median(magnitude))
        if median > 0:
            return 0.01 * median
        nonzero = magnitude[magnitude > 0]
        return float(nonzero.min()) if len(nonzero) else 1.0

    def fit(self, sessions: list[dict]) -> QuantileBaseline:
        table = defaultdict(list)
        for s in sessions:
            for _, event, slot, x, _ in slots(s):
                table[event, slot].append(x)
        for key, xs in table.items():
            if len(xs) < self.min_count:
                continue
            xs = np.asarray(xs, dtype=float)
            c = self.scale(key[1], xs)
            f = np.arcsinh(xs / c)
            lo, hi = np.quantile(f, [self.low, self.high])
            spread = max(1.4826 * float(np.median(np.abs(f - np.median(f)))), 0.1)
            self.bounds[key] = (c, float(lo), float(hi), spread)
        return self

    def inside(self, event: int, slot: int, x: float) -> bool:
        c, lo, hi, _ = self.bounds[event, slot]
        return lo <= math.asinh(x / c) <= hi

    def score(self, session: dict) -> float:
        worst = 0.0
        for _, event, slot, x, _ in slots(session):
            bound = self.bounds.get((event, slot))
            if bound is None:
                continue
            c, lo, hi, spread = bound
            f = math.asinh(x / c)
            worst = max(worst, (lo - f) / spread, (f - hi) / spread)
        return worst

    def flags(self, session: dict) -> bool:
        return self.score(session) > self.threshold


def fit_baseline(sessions: list[dict], resolution: float, min_count: int, target_fpr: float,
                 folds: int = 4) -> QuantileBaseline:
    """Bounds from every training session; the threshold from out-of-fold scores: each of `folds`
    interleaved folds scored by bounds fitted on the others, the smallest threshold that flags at most
    target_fpr of all those normal sessions (score > threshold)."""
    scores = []
    for k in range(folds):
        part = QuantileBaseline(resolution, min_count=min_count).fit(
            [s for n, s in enumerate(sessions) if n % folds != k])
        scores += [part.score(s) for n, s in enumerate(sessions) if n % folds == k]
    scores.sort(reverse=True)
    allowed = int(math.floor(target_fpr * len(scores)))
    baseline = QuantileBaseline(resolution, min_count=min_count).fit(sessions)
    baseline.threshold = scores[allowed] if allowed < len(scores) else 0.0
    return baseline


# ----------------------------------------------------------------------------- injection

def gap_quantiles(sessions: list[dict], q: float = 0.995) -> dict[int, float]:
    gaps = defaultdict(list)
    for s in sessions:
        for _, event, slot, x, _ in slots(s):
            if slot == 0:
                gaps[event].append(x)
    every = [g for gs in gaps.values() for g in gs]
    table = {e: float(np.quantile(g, q)) for e, g in gaps.items()}
    table[None] = float(np.quantile(every, q)) if every else 1.0
    return table


def value_quantiles(sessions: list[dict], q: float = 0.995) -> dict[tuple[int, int], float]:
    table = defaultdict(list)
    for s in sessions:
        for _, event, slot, x, _ in slots(s):
            if slot:
                table[event, slot].append(x)
    return {key: float(np.quantile(xs, q)) for key, xs in table.items()}


def context_pairs(sessions: list[dict], baseline: QuantileBaseline, templates: dict[int, str],
                  only: re.Pattern | None = None, min_count: int = 8, margin: float = 1.0) -> list[dict]:
    """(A, E, slot, B): the slot of E after B lies outside its range after A (by `margin` on the baseline's
    asinh scale), and within E's range over every predecessor. Each with the values of B that qualify."""
    table = defaultdict(lambda: defaultdict(list))
    for s in sessions:
        for _, event, slot, x, previous in slots(s):
            if previous is not None:
                table[event, slot][previous].append(x)
    pairs = []
    for (event, slot), by_previous in sorted(table.items()):
        if (event, slot) not in baseline.bounds or (only and not only.search(templates.get(event, ""))):
            continue
        c = baseline.bounds[event, slot][0]
        groups = {a: np.asarray(xs) for a, xs in by_previous.items() if len(xs) >= min_count}
        for a, xs_a in sorted(groups.items()):
            f_lo, f_hi = np.arcsinh(np.quantile(xs_a, [0.005, 0.995]) / c)
            for b, xs_b in sorted(groups.items()):
                if a == b:
                    continue
                f_b = np.arcsinh(xs_b / c)
                usable = [float(x) for x, f in zip(xs_b, f_b) if (f < f_lo - margin or f > f_hi + margin)
                          and baseline.inside(event, slot, float(x))]
                if len(usable) >= 3 and len(usable) >= 0.5 * len(xs_b):
                    pairs.append({"after": a, "event": event, "slot": slot, "normal_after": b,
                                  "values": usable, "range_after": [float(np.quantile(xs_a, 0.005)),
                                                                    float(np.quantile(xs_a, 0.995))]})
    return pairs


class Injection:
    """Edits to one copy of the held-out raw log: number rewrites and time shifts, then applied once."""

    def __init__(self, ds: Dataset, lines: list[str]):
        self.ds, self.lines = ds, list(lines)
        self.times = [parse_time(ds, line) for line in lines]
        self.shift = np.zeros(len(lines))
        self.stall = np.zeros(len(lines) + 1)      # windows: every line from here on moves

    def move(self, session: dict, position: int, delta: float) -> None:
        """The gap before event `position` grows by delta (may be negative, never below zero)."""
        numbers = session["line_numbers"]
        if self.ds.by_id:
            for n in numbers[position:]:
                self.shift[n] += delta
        else:
            self.stall[numbers[position]] += delta

    def rewrite(self, number: int, span: tuple[int, int], value: float) -> float:
        line = self.lines[number]
        old = line[span[0]:span[1]]
        text = number_text(old, value)
        self.lines[number] = line[:span[0]] + text + line[span[1]:]
        return float(text)

    def result(self) -> list[str]:
        shift = self.shift + np.cumsum(self.stall)[:len(self.lines)]
        if self.ds.by_id and "%f" not in self.ds.time_format:
            shift = np.round(shift)
        lines, times = list(self.lines), list(self.times)
        for n in np.nonzero(shift)[0]:
            times[n] += float(shift[n])
            lines[n] = with_time(self.ds, lines[n], times[n])
        if self.ds.by_id and all(a <= b for a, b in zip(self.times, self.times[1:])):
            order = sorted(range(len(lines)), key=lambda n: times[n])   # stable: ties keep their order
            lines = [lines[n] for n in order]
        return lines


def inject(ds: Dataset, kind: str, lines: list[str], sessions: list[dict], train: dict, share: float,
           rng: np.random.Generator) -> tuple[list[str], dict[str, dict]]:
    """A copy of the held-out raw lines with `kind` injected into `share` of the eligible sessions; per
    injected session what was done and what preprocess.py should then read (for the check)."""
    users = Counter(n for s in sessions if s["line_numbers"] for n in set(s["line_numbers"]))
    edit = Injection(ds, lines)
    gaps, baseline = train["gap_q"], train["baseline"]
    resolution = baseline.resolution
    candidates = []      # (session, plan)
    for s in sessions:
        numbers = s["line_numbers"]
        if not numbers or any(users[n] > 1 for n in numbers):
            continue     # a line shared with another session: an edit would touch two
        times = s.get("times") or []
        options = []
        if kind in ("slowed", "out_of_range") and kind in ds.fields:
            pattern = ds.fields[kind]
            for i, n in enumerate(numbers):
                match = pattern.search(lines[n])
                if match:
                    options.append(("field", i, match.span(1), float(match.group(1))))
        elif kind == "slowed" and ds.slowed_gap_re is not None:
            i = next((i for i, n in enumerate(numbers) if ds.slowed_gap_re.search(lines[n])), None)
            if i and times[i] is not None and times[i - 1] is not None:
                options.append(("gap", i, None, times[i] - times[i - 1]))
        elif kind == "delayed":
            options = [("gap", i, None, times[i] - times[i - 1]) for i in range(1, len(numbers))
                       if times and times[i] is not None and times[i - 1] is not None]
        elif kind == "context":
            for i, event, slot, x, previous in slots(s):
                for pair in train["pairs"]:
                    if (pair["after"], pair["event"], pair["slot"]) == (previous, event, slot):
                        span = None if slot == 0 else value_span(ds, lines[numbers[i]], slot - 1)
                        if slot == 0 or span:
                            options.append(("context", i, span, x, pair))
        if options:
            candidates.append((s, options))
    chosen = rng.permutation(len(candidates))[:int(round(share * len(candidates)))]
    labels = {}
    for index in sorted(chosen):
        s, options = candidates[index]
        option = options[rng.integers(0, len(options))]
        how, i, span, old = option[:4]
        event = s["event_ids"][i]
        note = {"kind": kind, "position": i, "event": event, "line": s["line_numbers"][i] + 1}
        if kind == "out_of_range" or (kind == "slowed" and how == "field"):
            line = lines[s["line_numbers"][i]]
            slot = next((k + 1 for k in range(MAX_SLOTS) if (value_span(ds, line, k) or (0,))[0] == span[0]),
                        None)       # None: preprocess.py would not keep it (the check then fails)
            if kind == "out_of_range":      # x 20-100 of the value or of its usual top, the larger
                factor = rng.uniform(20, 100)
                base = max(old, train["value_q"].get((event, slot), old))
            else:
                factor, base = rng.uniform(5, 20), old
            new = edit.rewrite(s["line_numbers"][i], span, base * factor)
            note.update(slot=slot, old=old, new=new, factor=factor)
        elif kind == "slowed":
            factor = rng.uniform(5, 20)
            new_gap = max(old, resolution) * factor
            edit.move(s, i, new_gap - old)
            note.update(slot=0, old=old, new=new_gap, factor=factor)
        elif kind == "delayed":
            delay = rng.uniform(5, 20) * max(gaps.get(event, gaps[None]), resolution)
            edit.move(s, i, delay)
            note.update(slot=0, old=old, new=old + delay)
        else:
            pair = option[4]
            value = float(rng.choice(pair["values"]))
            note.update(slot=pair["slot"], old=old, after=pair["after"], normal_after=pair["normal_after"],
                        range_after=pair["range_after"])
            if pair["slot"] == 0:
                if "%f" not in ds.time_format:
                    value = float(round(value))
                edit.move(s, i, value - old)
                note["new"] = value
            else:
                note["new"] = edit.rewrite(s["line_numbers"][i], span, value)
        labels[s["session_id"]] = note
    return edit.result(), labels


def check_injections(sessions: list[dict], labels: dict[str, dict], resolution: float) -> dict:
    """Does preprocess.py read back what was injected (the gap or the value at the injected event)?"""
    by_id = {s["session_id"]: s for s in sessions}
    ok, failed = 0, []
    for sid, note in labels.items():
        s = by_id.get(sid)
        i, slot = note["position"], note.get("slot")
        got = None
        if s is not None and slot == 0 and s.get("times"):
            t = s["times"]
            got = t[i] - t[i - 1] if t[i] is not None and t[i - 1] is not None else None
            good = got is not None and abs(got - note["new"]) <= max(resolution, 1e-3) * 1.01
        elif s is not None and slot:
            values = s["values"][i]
            got = values[slot - 1] if len(values) >= slot else None
            good = got is not None and math.isclose(got, note["new"], rel_tol=1e-9, abs_tol=1e-9)
        else:
            good = False
        if good:
            ok += 1
        else:
            failed.append({"session_id": sid, "expected": note["new"], "read": got, "slot": slot,
                           "line": note["line"]})
    return {"ok": ok, "failed": len(failed), "first_failures": failed[:3]}


# ----------------------------------------------------------------------------- scorers

def key_model_verdicts(work: Path, train_dir: Path, copies: dict[str, list[dict]], epochs: int, seed: int,
                       env: dict) -> dict[str, dict[str, bool]]:
    """train.py on the training part (the key model, and the parameter model beside it: one run, as users
    run it), then detect.py's default verdict on every copy, which is the key model's alone.
    {copy: {session_id: flagged}}; the checkpoint is work/key_model/checkpoints/best_model.pt."""
    model_dir = work / "key_model"
    config = yaml.safe_load((train_dir / "config.yaml").read_text())
    config.setdefault("training", {})["evaluate_after_training"] = True   # the parameter model is fitted then
    config_path = work / "key_model_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run([sys.executable, "train.py", "--config", str(config_path), "--epochs", str(epochs),
         "--seed", str(seed), "--output-dir", str(model_dir), "--device", "cpu"], env)
    scored = work / "key_model_input.jsonl"
    with open(scored, "w") as f:
        for name, sessions in copies.items():
            for s in sessions:
                f.write(json.dumps({"session_id": f"{name}|{s['session_id']}", "event_ids": s["event_ids"],
                                    "label": 0}) + "\n")
    verdicts_path = work / "key_model_verdicts.jsonl"
    run([sys.executable, "detect.py", "--checkpoint", str(model_dir / "checkpoints" / "best_model.pt"),
         str(scored), "--output", str(verdicts_path)], env)
    verdicts = defaultdict(dict)
    with open(verdicts_path) as f:
        for line in f:
            record = json.loads(line)
            if "verdict" in record:
                name, sid = record["session_id"].split("|", 1)
                verdicts[name][sid] = record["verdict"] == "abnormal"
    return verdicts


def parameter_rule_verdicts(work: Path, copies: dict[str, list[dict]]) -> dict | None:
    """The parameter-value model's `parameter` rule (values.py), from the checkpoint key_model_verdicts
    trained: a session is flagged when a value's error against the model's prediction, or its excess beyond
    its type's training range, is above its threshold (fitted on the normal calibration sessions at
    evaluation.target_fpr, the default config's). {copy: {session_id: flagged}}."""
    sys.path.insert(0, str(REPO))
    import values
    from checkpoint import load_model
    model = load_model(work / "key_model" / "checkpoints" / "best_model.pt").parameter_model
    if model is None:
        return None

    def flagged(session: dict) -> bool:
        if session.get("times") is None and session.get("values") is None:
            return False
        found = model.score(session["event_ids"], values.event_vectors(session.get("times"),
                                                                        session.get("values")))
        return found is not None and found["score"] > 1   # above its threshold
    return {name: {s["session_id"]: flagged(s) for s in sessions} for name, sessions in copies.items()}


def combined_default_verdicts(key_model: dict | None, parameter: dict | None) -> dict | None:
    """The default rule with the parameter rule in it: abnormal when the key model's default verdict or the
    parameter rule says so."""
    if key_model is None or parameter is None:
        return None
    return {name: {sid: flag or key_model[name].get(sid, False) for sid, flag in flags.items()}
            for name, flags in parameter.items()}


# ----------------------------------------------------------------------------- one data set

def evaluate_dataset(ds: Dataset, args, work: Path, env: dict) -> dict:
    rng = np.random.default_rng([args.seed, zlib.crc32(ds.name.encode())])
    started = time.time()
    if ds.source is None:
        train_blocks, eval_blocks = (1500, 600) if args.quick else (args.gen_blocks, args.gen_blocks // 3)
        train_lines = generate_hdfs(train_blocks, 1226188800.0, rng)           # 2008-11-09, as HDFS_v1
        eval_lines = generate_hdfs(eval_blocks, 1226188800.0 + train_blocks * 4.0 + 86400, rng)
        source = f"generated: {train_blocks} training and {eval_blocks} held-out blocks"
    else:
        lines = ds.source.read_text().splitlines()
        cut = int(len(lines) * ds.train_fraction)
        train_lines, eval_lines = lines[:cut], lines[cut:]
        source = f"{ds.source.name}: lines 1-{cut} train, {cut + 1}-{len(lines)} held out"
    (work / "train.log").write_text("\n".join(train_lines) + "\n")
    (work / "eval_none.log").write_text("\n".join(eval_lines) + "\n")
    train_dir = work / "train"
    train_sessions = preprocess(ds, work / "train.log", train_dir)
    state = train_dir / "parser_state.json"
    clean = preprocess(ds, work / "eval_none.log", work / "eval_none", state)
    templates = {t["id"]: t["template"] for t in json.loads((train_dir / "templates.json").read_text())}

    times = [t for s in train_sessions for t in s.get("times") or [] if t is not None]
    resolution = 1.0 if times and all(float(t).is_integer() for t in times) else 1e-3
    baseline = fit_baseline(train_sessions, resolution, args.baseline_min_count, args.target_fpr)
    train = {"baseline": baseline, "gap_q": gap_quantiles(train_sessions),
             "value_q": value_quantiles(train_sessions),
             "pairs": context_pairs(train_sessions, baseline, templates, ds.context_re)}

    copies = {"none": clean}
    labels, checks = {"none": {}}, {}
    for kind in ds.kinds:
        injected, labels[kind] = inject(ds, kind, eval_lines, clean, train, args.share, rng)
        if not labels[kind]:
            continue
        path = work / f"eval_{kind}.log"
        path.write_text("\n".join(injected) + "\n")
        copies[kind] = preprocess(ds, path, work / f"eval_{kind}", state)
        checks[kind] = check_injections(copies[kind], labels[kind], resolution)
    (work / "labels.json").write_text(json.dumps(labels, indent=1))

    verdicts = {"baseline": {name: {s["session_id"]: baseline.flags(s) for s in sessions}
                             for name, sessions in copies.items()}}
    if args.no_key_model:
        verdicts["key_model"] = None
    else:
        verdicts["key_model"] = key_model_verdicts(work, train_dir, copies, args.epochs, args.seed, env)
    verdicts["parameter"] = None if args.no_key_model else parameter_rule_verdicts(work, copies)
    verdicts["combined"] = combined_default_verdicts(verdicts["key_model"], verdicts["parameter"])

    results = {}
    for scorer in SCORERS:
        if verdicts[scorer] is None:
            results[scorer] = None
            continue
        flagged = verdicts[scorer]
        row = {"fpr": rate(sum(flagged["none"].values()), len(flagged["none"]))}
        untouched = [v for name in copies if name != "none"
                     for sid, v in flagged[name].items() if sid not in labels[name]]
        row["fpr_untouched_in_injected_copies"] = rate(sum(untouched), len(untouched))
        for kind in ds.kinds:
            hits = [flagged[kind].get(sid, False) for sid in labels.get(kind, {})] if kind in copies else []
            row[kind] = rate(sum(hits), len(hits)) if hits else None
            if hits:     # the same sessions before injection: flagged for another reason
                row[kind]["flagged_before_injection"] = sum(flagged["none"].get(sid, False)
                                                            for sid in labels[kind])
        results[scorer] = row
    pair_names = [{"after": templates.get(p["after"]), "event": templates.get(p["event"]), "slot": p["slot"],
                   "normal_after": templates.get(p["normal_after"]), "range_after": p["range_after"],
                   "injected_values": [min(p["values"]), max(p["values"])]} for p in train["pairs"]]
    return {"source": source, "grouping": " ".join(ds.grouping),
            "training_sessions": len(train_sessions), "held_out_sessions": len(clean),
            "injected": {k: len(v) for k, v in labels.items() if k != "none"},
            "not_applicable": [k for k in KINDS if k not in ds.kinds or not labels.get(k)],
            "baseline": {"threshold": baseline.threshold, "slots": len(baseline.bounds),
                         "time_resolution_s": resolution},
            "context_pairs": pair_names, "injection_checks": checks,
            "extraction": {"train": extraction_report(train_sessions, templates),
                           "held_out": extraction_report(clean, templates)},
            "results": results, "seconds": round(time.time() - started, 1)}


def rate(hits: int, total: int) -> dict:
    return {"rate": hits / total if total else None, "hits": hits, "n": total}


def show(figure: dict | None) -> str:
    """rate (hits/n), and how many of those hits the clean copy already flagged ("k before")."""
    if figure is None or not figure["n"]:
        return "n/a"
    before = figure.get("flagged_before_injection")
    tail = f", {before} before)" if before else ")"
    return f"{figure['rate']:.3f} ({figure['hits']}/{figure['n']}{tail}"


def print_table(name: str, entry: dict) -> None:
    print(f"\n{name}: {entry['source']}; {entry['grouping']}; {entry['training_sessions']} training, "
          f"{entry['held_out_sessions']} held-out sessions; injected {entry['injected']}")
    header = ["scorer", "FPR (untouched)"] + [f"recall {k}" for k in KINDS]
    widths = [10, 20] + [28] * len(KINDS)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for scorer in SCORERS:
        row = entry["results"][scorer]
        if row is None:
            cells = [scorer, "not built yet" if scorer in ("parameter", "combined") else "skipped"]
            cells += [""] * len(KINDS)
        else:
            cells = [scorer, show(row["fpr"])] + [show(row.get(k)) for k in KINDS]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    print("  (k before: k of those sessions were flagged in the clean copy too, i.e. not for the injection)")
    failed = {k: v for k, v in entry["injection_checks"].items() if v["failed"]}
    if failed:
        print(f"  injections preprocess.py did not read back: {failed}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=("openstack", "hdfs2k", "hdfs2k_window", "hdfs_gen"),
                        default=["openstack", "hdfs2k", "hdfs2k_window", "hdfs_gen"], help="which data sets "
                        "(default: all four)")
    parser.add_argument("--quick", action="store_true", help="small run (under 2 minutes on 2 CPU cores): "
                        "generated log of 1,500 + 600 blocks, 2 epochs unless --epochs")
    parser.add_argument("--epochs", type=int, help="train.py epochs of the key model (default 10, 2 with "
                        "--quick)")
    parser.add_argument("--gen-blocks", type=int, default=12000, help="blocks in the generated log's "
                        "training part; the held-out part has a third as many (default 12000; --quick: 1500)")
    parser.add_argument("--window-size", type=int, default=10, help="lines per count window of openstack and "
                        "hdfs2k_window (default 10: 100 windows per half of a 2k sample)")
    parser.add_argument("--share", type=float, default=0.5, help="share of the eligible held-out sessions "
                        "injected in each kind's copy (default 0.5)")
    parser.add_argument("--target-fpr", type=float, default=0.01, help="the baseline's threshold flags at "
                        "most this share of the calibration sessions (default 0.01)")
    parser.add_argument("--baseline-min-count", type=int, default=5, help="the baseline bounds an (event "
                        "type, slot) seen at least this often in training (default 5)")
    parser.add_argument("--no-key-model", action="store_true", help="skip train.py/detect.py (the baseline "
                        "only)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated log, the injections and "
                        "train.py (default 42)")
    parser.add_argument("--work-dir", default="outputs/benchmarks/parameters", help="work files, one "
                        "subfolder per data set, replaced at every run (default "
                        "outputs/benchmarks/parameters)")
    parser.add_argument("--output", help="write the figures here as JSON (default WORK_DIR/parameters.json)")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 2 if args.quick else 10
    if not 0 < args.share <= 1 or not 0 <= args.target_fpr < 1:
        sys.exit("error: --share must be in (0, 1] and --target-fpr in [0, 1)")

    work_root = Path(args.work_dir).resolve()
    env = dict(os.environ, XDG_CACHE_HOME=str(work_root / "cache"))   # token caches stay with the run
    all_sets = datasets(args.window_size)
    report = {"settings": {k: v for k, v in vars(args).items()}, "datasets": {}}
    for name in args.datasets:
        ds = all_sets[name]
        if ds.source is not None and not ds.source.exists():
            sys.exit(f"error: {ds.source}: no such file (the loghub samples are in ../shared/data/loghub)")
        work = work_root / name
        if work.exists():
            if not (work / MARKER).exists():
                sys.exit(f"error: {work} exists and is not this benchmark's: give another --work-dir")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        (work / MARKER).touch()
        print(f"{name} ...", file=sys.stderr)
        report["datasets"][name] = evaluate_dataset(ds, args, work, env)
        print_table(name, report["datasets"][name])
    output = Path(args.output) if args.output else work_root / "parameters.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nfigures: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
