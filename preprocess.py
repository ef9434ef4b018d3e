r"""Raw log files in: parse them with Drain3, group the lines into sessions or windows, write training data.

Examples:

    # HDFS-style: one session per block; a line naming two blocks joins both sessions
    python preprocess.py ../shared/data/loghub/HDFS_2k.log --output outputs/hdfs_raw \
        --log-format "<Date> <Time> <Pid> <Level> <Component>: <Content>" --session-key 'blk_-?\d+' \
        --labels anomaly_label.csv
    python train.py --config outputs/hdfs_raw/config.yaml          # vocab_size and data path are set
    python preprocess.py /logs/hdfs/ --session-idle 200000 ...      # endless logs: a block unnamed for 200,000
                                                                    # lines is complete (flat memory)

    # BGL-style: no identifiers, so windows (here 1 h every 30 min); label from the first field ('-' = normal)
    python preprocess.py BGL.log.gz --output outputs/bgl --window time:3600:1800 --time-field Timestamp \
        --log-format "<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> <Content>" \
        --label-field Label --normal-value - --structured outputs/bgl/structured.csv
    python preprocess.py ../shared/data/loghub/BGL_2k.log --output outputs/bgl2k --window count:20:10 ...

    # new logs onto the SAME event IDs (nothing learned; a line no template matches gets ID vocab_size);
    # format, masks and grouping come from the state
    python preprocess.py /logs/today/ --parser-state outputs/hdfs_raw/parser_state.json --output outputs/today
    python evaluate.py --checkpoint outputs/hdfs_raw/train/checkpoints/best_model.pt \
        --detect outputs/today/sessions.jsonl --output outputs/today/detections.jsonl

    # parse only (no --session-key or --window): templates, parser state and loghub's structured CSV
    python preprocess.py ../shared/data/loghub/Linux_2k.log --output outputs/linux \
        --log-format '<Month> <Date> <Time> <Level> <Component>(\[<PID>\])?: <Content>' \
        --structured outputs/linux/structured.csv

Log formats are loghub's, as logpai/logparser reads them: <Field> placeholders, and the text between them a
regular expression (`\[`, `\|`, optional groups such as `(\[<PID>\])?`) in which a run of spaces matches
any run of whitespace; the line is stripped, then matched whole. Text without regex characters ([ ] ( ) . |
? * + { } ^ $ \) means itself, as before. A field inside an optional group that is absent reads as "".
A field other than Content ends where the text after it (or, before an optional group, the group's or the
text after it) first matches, and is never retried, so a line costs about one pass. On the nine loghub
samples these are the very fields of loghub's lazy regex, which retries every field at every later place:
minutes on one line that does not fit. (Still retried: Content when fields follow it, and a field followed
by a quantifier or by a group that opens with a field or an alternation.) If none of the first 1000 lines
match, the run stops, naming the first three.

Input: a file or a directory of files (plain or .gz), streamed line by line; memory holds the parser, the
open sessions (those named within --session-idle lines, at most --max-open-sessions) or the current
windows, never the lines. Settings: defaults in PreprocessConfig < the optional `preprocess:` section of
--config < (with --parser-state: the grouping saved in it) < flags.

Output in --output: sessions.jsonl (session_id, event_ids, label, and "lines": [[file index, first line,
count], ...], runs of consecutive line numbers the events came from), sources.json (the files those
indexes name, and the counts), templates.json (id, template, count), parser_state.json (plain JSON: log
format, masks, Drain settings, templates, prefix tree, grouping), and config.yaml, the --config values with
model.vocab_size, data.preprocessed_dir and training.output_dir set for `python train.py --config`.
A parse-only run writes no sessions.jsonl or config.yaml. --structured writes loghub's *_structured.csv
columns: LineId, the format's fields, EventId, EventTemplate.
"""
from __future__ import annotations

import argparse
import array
import collections
import csv
import dataclasses
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time
import typing
from datetime import datetime, timezone
from pathlib import Path

import yaml
from drain3 import TemplateMiner
from drain3.drain import LogCluster, Node
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

STATE_FORMAT = "deeplog parser state"
# Default masks, applied in this order after the user's own (--mask). Each stands for a value, never for
# wording, so they hold on any system: drawn from the variable parts of the loghub systems. A mask matches
# whole tokens or parts set off by punctuation other than "_" (so "core.12" -> "core.<*>", but "blk_-42" and
# "job_2008_01" are one id), and ids and paths go before numbers so that they are masked whole.
_B, _E = r"(?<![A-Za-z0-9_])", r"(?![A-Za-z0-9_])"
DEFAULT_MASKS = [
    rf"{_B}(\d{{1,3}}\.){{3}}\d{{1,3}}(:\d{{1,5}})?{_E}",                  # IPv4 address, optional port
    rf"{_B}[0-9a-fA-F]{{8}}(-[0-9a-fA-F]{{4}}){{3}}-[0-9a-fA-F]{{12}}{_E}",  # UUID
    r"(?<![\w.<>*/])(/[\w.$~+-]+){2,}/?",                                # absolute paths of 2+ parts
    rf"{_B}[A-Za-z]+_-?\d+(_\w+)?{_E}",                                  # block-like ids: blk_-42, job_2008_01
    rf"{_B}0[xX][0-9a-fA-F]+{_E}",                                       # 0x hex numbers
    rf"{_B}(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{{8,}}{_E}",                     # long hex ids, hashes
    rf"{_B}[-+]?\d+(\.\d+)?{_E}",                                        # numbers
    r"<\*>(\s+<\*>)+",  # a run of values (a list of ids, "1 of 3"...) is one: lists of any length share a template
]


@dataclasses.dataclass
class PreprocessConfig:
    log_format: str = "<Content>"         # loghub-style: <Field> placeholders; Drain parses <Content>
    masks: list = dataclasses.field(default_factory=list)  # regexes replaced by <*> before Drain
    default_masks: bool = True            # also apply DEFAULT_MASKS (after the user's)
    similarity: float = 0.45              # Drain sim_th: the middle of the plateau (0.4-0.5) where the loghub
                                          # samples parse best with the default masks (benchmarks/parsing.py)
    depth: int = 4                        # Drain prefix-tree depth (>= 3)
    max_templates: typing.Optional[int] = None  # Drain max_clusters: LRU cap on templates held in memory
    session_key: typing.Optional[str] = None    # regex of session identifiers
    window: typing.Optional[str] = None         # count:SIZE[:STEP] or time:SIZE[:STEP] (seconds)
    time_field: typing.Optional[str] = None     # a log-format field holding the time (time windows)
    time_format: typing.Optional[str] = None    # strptime format of time_field; null: epoch seconds
    labels: typing.Optional[str] = None         # CSV of session id, label (Normal/Anomaly or 0/1)
    label_field: typing.Optional[str] = None    # a log-format field that labels each line
    normal_value: str = "-"                     # ... and its value on normal lines
    session_idle: typing.Optional[int] = None   # a session not named for this many lines is complete: written
    max_open_sessions: int = 1_000_000          # beyond this, the least recently active session is written


class PreprocessError(Exception):
    """Bad input or settings; the message says which."""


# ----------------------------------------------------------------------------- parsing
# Log formats are loghub's (logpai/logparser's generate_logformat_regex): <Field> placeholders, the text
# between them a regular expression in which a run of spaces matches any run of whitespace, the whole line
# (stripped) matched. loghub makes every field a lazy `.*?`, which backtracks without bound on a line that
# does not fit (one line can take minutes): here a field other than Content ends where the fixed text after
# it first matches, and is never re-tried (an atomic group), so a line costs about one pass. Content stays
# lazy (free text may hold any separator); so does a field with no fixed text after it (see _field_regex).
_MARK = "\0"  # a field's place in the text that follows it, while that text is scanned


def _structure(text: str, start: int = 0):
    """(index, char) of each `(`, `)`, `|` or field mark of a regex text, outside escapes and classes."""
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1
        elif char == "[":  # a class: `]` right after `[` or `[^` is a member, not its end
            i += 2 if text[i + 1:i + 2] == "^" else 1
            i += text[i:i + 1] == "]"
            while i < len(text) and text[i] != "]":
                i += 2 if text[i] == "\\" else 1
        elif char in "()|" + _MARK:
            yield i, char
        i += 1


def _fixed(text: str) -> bool:
    """Whether `text` is a regex of its own that cannot match an empty string (so a field can end at it)."""
    if not text or re.match(r"[*+?]|\{\d*,?\d*\}", text):  # a quantifier would bind to the field's group
        return False
    try:
        return re._parser.parse(text).getwidth()[0] > 0  # stdlib's own parser; on any error: lazy
    except Exception:
        return False


def _follow(rest: str) -> str | None:
    """What may come right after a field that the group opening `rest` follows (`rest`: the format's
    remaining text, later fields marked), as a regex: the group's leading text, and if the group is optional
    (`?`, `*`) the text after it. None where that is no fixed text (a field first, an alternation)."""
    inner = 3 if rest.startswith("(?:") else 1
    if rest[1:2] == "?" and inner == 1:
        return None  # a lookaround, a named group or flags
    depth, end, first = 0, None, None
    for i, char in _structure(rest):
        depth += (char == "(") - (char == ")")
        if char == "|" and depth == 1 or char == _MARK and depth == 0:
            return None
        first = i if first is None and i >= inner else first
        if depth == 0:
            end = i
            break
    if end is None or not _fixed(rest[inner:first]):
        return None
    quantifier = rest[end + 1:end + 2]
    if quantifier not in ("?", "*"):
        return None if quantifier == "{" else rest[inner:first]
    start = end + 2 + (rest[end + 2:end + 3] in ("?", "+"))  # a lazy or possessive quantifier
    stop = next((i for i, _ in _structure(rest, start)), len(rest))
    after = rest[start:stop] or ("$" if stop == len(rest) else "")
    return f"{rest[inner:first]}|{after}" if after == "$" or _fixed(after) else None


def _field_regex(name: str, rest: str, last: bool) -> str:
    """The regex of one field followed by `rest` (the remaining text, later fields marked), rest included.
    Content (free text) stays lazy; other fields end at the first match of the fixed text after them."""
    text = rest.split(_MARK, 1)[0]
    lazy = f"(?P<{name}>.*?)"
    if last:  # what follows ends the line: lazy with it inside an atomic group is exact and linear
        return f"(?>{lazy}{text}$)" if next(_structure(text), None) is None else f"{lazy}{text}$"
    if name == "Content":
        return lazy + text
    if not text:  # another field right after: loghub's lazy field is then always empty
        return f"(?P<{name}>)"
    cut = next((i for i, _ in _structure(text)), len(text))
    if _fixed(text[:cut]):
        return f"(?>{lazy}{text[:cut]}){text[cut:]}"
    follow = _follow(rest) if text.startswith("(") else None
    return f"(?>{lazy}(?={follow})){text}" if follow else lazy + text


def format_regex(log_format: str) -> re.Pattern:
    """loghub's format string -> a regex with one named group per <Field>, matched against a stripped line."""
    parts = re.split(r"(<[^<>]+>)", log_format)
    fields = parts[1::2]
    bad = [f for f in fields if not f[1:-1].isidentifier()]
    if "<Content>" not in fields or bad or len(set(fields)) != len(fields):
        why = f"bad field name {bad[0]}" if bad else "a field repeats" if "<Content>" in fields else "no <Content>"
        raise PreprocessError(f"--log-format {log_format!r}: {why} (expected e.g. '<Date> <Time> <Level>: <Content>')")
    texts = [re.sub(" +", r"\\s+", part) for part in parts[0::2]]
    loghub = "".join(f"(?P<{part[1:-1]}>.*?)" if i % 2 else texts[i // 2] for i, part in enumerate(parts))
    names = [f[1:-1] for f in fields]
    try:
        lost = [name for name in names if name not in re.compile(f"^{loghub}$").groupindex]
        if lost:  # "[<Level>]" is a character class holding the field's group: it compiles, means nothing
            raise re.error(f"<{lost[0]}> is inside a character class [...]")
    except re.error as error:
        raise PreprocessError(f"--log-format {log_format!r}: the text between fields is a regular expression "
                              f"(as in loghub) and this one is not: {error} (write \\[ \\( \\. \\| \\? "
                              f"for the characters themselves)") from None
    pieces = [texts[0]] + [_field_regex(name, _MARK.join(texts[i + 1:]), i == len(names) - 1)
                           for i, name in enumerate(names)]
    try:
        return re.compile("^" + "".join(pieces))
    except re.error:  # not expected; loghub's own regex is then the safe choice
        return re.compile(f"^{loghub}$")


def compile_regex(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise PreprocessError(f"{flag} {pattern!r}: not a regular expression: {error}") from None


def make_miner(drain: dict, masks: list[str]) -> TemplateMiner:
    config = TemplateMinerConfig()  # in code: no drain3.ini is read
    config.drain_sim_th, config.drain_depth = drain["sim_th"], drain["depth"]
    config.drain_max_children, config.drain_max_clusters = drain["max_children"], drain["max_clusters"]
    config.masking_instructions = [MaskingInstruction(compile_regex(m, "--mask").pattern, "*") for m in masks]
    return TemplateMiner(config=config)


def _tree_to_json(node: Node) -> dict:
    return {"clusters": list(node.cluster_ids), "children": {k: _tree_to_json(c) for k, c in
                                                             node.key_to_child_node.items()}}


def _tree_from_json(data: dict) -> Node:
    node = Node()
    node.cluster_ids = list(data["clusters"])
    node.key_to_child_node = {k: _tree_from_json(c) for k, c in data["children"].items()}
    return node


class Parser:
    """Drain3 with dense event IDs (drain3's cluster IDs count from 1 in order of creation: ID = cluster - 1).
    Learning (state None) creates templates; from a saved state it only matches, and a line that matches no
    template gets the unknown ID vocab_size."""

    def __init__(self, cfg: PreprocessConfig, state: dict | None = None):
        self.learning = state is None
        if state is None:
            # the default masks as one alternation: one scan of the line instead of one per mask (a third
            # faster, same result: each alternative starts where no earlier one could)
            masks = list(cfg.masks) + (["|".join(f"(?:{m})" for m in DEFAULT_MASKS[:-1]), DEFAULT_MASKS[-1]]
                                       if cfg.default_masks else [])
            state = {"log_format": cfg.log_format, "masks": masks, "templates": [], "tree": None,
                     "drain": {"sim_th": cfg.similarity, "depth": cfg.depth, "max_children": 100,
                               "max_clusters": cfg.max_templates}}
        if not (0 <= state["drain"]["sim_th"] <= 1) or state["drain"]["depth"] < 3 or \
                (state["drain"]["max_clusters"] or 1) < 1:
            raise PreprocessError("--similarity must be in [0, 1], --depth >= 3 and --max-templates >= 1")
        self.log_format, self.masks, self.drain_settings = state["log_format"], state["masks"], state["drain"]
        self.regex = format_regex(self.log_format)
        self.miner = make_miner(self.drain_settings, self.masks)
        drain = self.miner.drain
        self.templates = {t["id"]: t["template"] for t in state["templates"]}  # last known, evicted ones too
        self.counts = [0] * state.get("vocab_size", 0)
        for event_id, template in self.templates.items():
            drain.id_to_cluster[event_id + 1] = LogCluster(template.split(), event_id + 1)
        drain.clusters_counter = state.get("vocab_size", 0)
        if state["tree"] is not None:  # the very tree Drain grew, so matching behaves exactly as it did
            drain.root_node = _tree_from_json(state["tree"])

    def match(self, line: str) -> re.Match | None:
        """The log format's fields of a line, matched as loghub does: on the line stripped of whitespace."""
        return self.regex.match(line.strip())

    @property
    def vocab_size(self) -> int:
        return self.miner.drain.clusters_counter  # IDs issued, evicted templates' included

    def parse(self, content: str) -> int:
        if not self.learning:
            cluster = self.miner.match(content, full_search_strategy="fallback")
            event_id = self.vocab_size if cluster is None else cluster.cluster_id - 1
        else:
            result = self.miner.add_log_message(content)
            event_id = result["cluster_id"] - 1
            if result["change_type"] != "none":
                self.templates[event_id] = result["template_mined"]
                if event_id == len(self.counts):
                    self.counts.append(0)
        if event_id < len(self.counts):
            self.counts[event_id] += 1
        return event_id

    def template(self, event_id: int) -> str:
        cluster = self.miner.drain.id_to_cluster.get(event_id + 1)
        return cluster.get_template() if cluster is not None else self.templates.get(event_id, "<unknown>")

    def state(self) -> dict:
        live = sorted(c.cluster_id - 1 for c in self.miner.drain.clusters)
        return {"format": STATE_FORMAT, "version": 1, "log_format": self.log_format, "masks": self.masks,
                "drain": self.drain_settings, "vocab_size": self.miner.drain.clusters_counter,
                "templates": [{"id": i, "template": self.template(i)} for i in live],
                "tree": _tree_to_json(self.miner.drain.root_node)}

    def table(self) -> list[dict]:
        live = {c.cluster_id - 1 for c in self.miner.drain.clusters}
        return [{"id": i, "template": self.template(i), "count": self.counts[i] if i < len(self.counts) else 0,
                 **({} if i in live else {"evicted": True})} for i in range(self.vocab_size)]


def load_state(path: str) -> dict:
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PreprocessError(f"--parser-state {path}: unreadable: {error}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PreprocessError(f"--parser-state {path}: not a parser_state.json written by preprocess.py")
    missing = {"log_format", "masks", "drain", "vocab_size", "templates", "tree"} - set(state)
    if missing:
        raise PreprocessError(f"--parser-state {path}: incomplete, no {', '.join(sorted(missing))}")
    return state


# ----------------------------------------------------------------------------- input
def input_files(paths: list[str]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise PreprocessError(f"{path}: directory holds no file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PreprocessError(f"{path}: no such file or directory")
    return files


def read_lines(files: list[Path]):
    """(file index, 1-based line number, line) of every file in turn, streamed; undecodable bytes replaced."""
    for index, path in enumerate(files):
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as handle:
                for number, line in enumerate(handle, start=1):
                    yield index, number, line.rstrip("\r\n")
        except (OSError, EOFError) as error:  # permissions, a corrupt or truncated .gz
            raise PreprocessError(f"{path}: unreadable: {error}") from None


LABEL_VALUES = {"normal": 0, "0": 0, "false": 0, "anomaly": 1, "abnormal": 1, "1": 1, "true": 1}


def read_labels(path: str) -> dict[str, int]:
    """session id -> 0/1 from a CSV of id, label (a header row, such as BlockId,Label, is skipped)."""
    labels = {}
    try:
        with open(path, newline="") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if len(row) < 2:
                    continue
                value = LABEL_VALUES.get(row[1].strip().lower())
                if value is None:
                    if number == 1:
                        continue  # the header
                    raise PreprocessError(f"{path}: line {number}: label {row[1][:40]!r} is not Normal/Anomaly/0/1")
                labels[row[0].strip()] = value
    except OSError as error:
        raise PreprocessError(f"--labels {path}: unreadable: {error.strerror}") from None
    return labels


# ----------------------------------------------------------------------------- grouping
# Every grouper takes lines as add(event ID, line reference, abnormal, time) and yields finished groups as
# (session id, event IDs, line references, abnormal). A reference is file index << 40 | line number.
class Sessions:
    """Lines grouped by the identifiers they name. A session stays open until the end of the input, until
    `idle` lines have passed without it (if set), or until max_open sessions are open and it is the least
    recently active one (then counted in `closed_early`). Sessions are kept least recently active first,
    so closing the idle ones costs nothing per line."""

    def __init__(self, key: re.Pattern, max_open: int, idle: int | None):
        self.key, self.max_open, self.idle, self.open = key, max_open, idle, collections.OrderedDict()
        self.seen = self.closed_early = self.closed_idle = self.no_key = self.lines = 0

    def add(self, line: str, event: int, ref: int, abnormal: bool, _time):
        self.lines += 1
        while self.idle and self.open and next(iter(self.open.values()))[4] <= self.lines - self.idle:
            self.closed_idle += 1
            yield self._finish(*self.open.popitem(last=False))
        ids = dict.fromkeys(m.group(0) for m in self.key.finditer(line))  # each once, in order
        if not ids:
            self.no_key += 1
        for session_id in ids:
            state = self.open.get(session_id)
            if state is None:
                if len(self.open) >= self.max_open:
                    self.closed_early += 1
                    yield self._finish(*self.open.popitem(last=False))
                self.seen += 1
                state = self.open[session_id] = [self.seen, array.array("l"), array.array("q"), False, 0]
            else:
                self.open.move_to_end(session_id)  # most recently active last: the LRU end is first
            state[1].append(event)
            state[2].append(ref)
            state[3] = state[3] or abnormal
            state[4] = self.lines

    @staticmethod
    def _finish(session_id, state):
        return session_id, state[1], state[2], state[3]

    def close(self):
        for session_id, state in sorted(self.open.items(), key=lambda item: item[1][0]):  # first seen first
            yield self._finish(session_id, state)
        self.open.clear()


class Windows:
    """Sliding or tumbling windows over line counts or times: window k covers [start + k*step, ... + size).
    Only the lines of the current window(s) are held. At the end, one last partial window takes the lines
    no full window covered."""

    def __init__(self, spec: str):
        kind, _, sizes = spec.partition(":")
        try:
            numbers = [float(x) for x in sizes.split(":")] if sizes else []
            size, step = numbers[0], numbers[1] if len(numbers) == 2 else numbers[0]
            ok = kind in ("count", "time") and len(numbers) <= 2 and size > 0 and step > 0
        except (ValueError, IndexError):
            ok = False
        if not ok or (kind == "count" and not (size.is_integer() and step.is_integer())):
            raise PreprocessError(f"--window {spec!r}: expected count:SIZE[:STEP] (lines) or time:SIZE[:STEP] "
                                  f"(seconds), positive")
        self.kind, self.size, self.step = kind, size, step
        self.lines = collections.deque()   # (position, event, ref, abnormal), position = line count or time
        self.begin = None                   # start of the current window
        self.covered = None                 # end of the last window written
        self.count = self.out_of_order = self.written = 0

    def add(self, _line: str, event: int, ref: int, abnormal: bool, when):
        position = self.count if self.kind == "count" else when
        self.count += 1
        if self.begin is None:
            self.begin = position
        if self.lines and position < self.lines[-1][0]:
            self.out_of_order += 1  # kept in the current window: a clock step back must not lose lines
            position = self.lines[-1][0]
        while position >= self.begin + self.size:  # the current window is complete
            if self.lines and self.lines[0][0] < self.begin + self.size:
                yield self._window(self.begin + self.size)
            self.begin += self.step
            while self.lines and self.lines[0][0] < self.begin:
                self.lines.popleft()
            if not self.lines and position >= self.begin + self.size:  # a gap: jump over the empty windows
                self.begin += (position - self.size - self.begin) // self.step * self.step + self.step
        if position >= self.begin:  # (else it falls between two windows: step > size)
            self.lines.append((position, event, ref, abnormal))

    def _window(self, end):
        inside = [line for line in self.lines if line[0] < end]
        self.covered, self.written = end, self.written + 1
        return (f"{self.kind}-window-{self.written}",
                [x[1] for x in inside], [x[2] for x in inside], any(x[3] for x in inside))

    def close(self):
        if self.lines and (self.covered is None or self.lines[-1][0] >= self.covered):
            yield self._window(float("inf"))
        self.lines.clear()


def line_runs(refs) -> list[list[int]]:
    """Line references -> [[file index, first line, count], ...] over runs of consecutive lines."""
    runs = []
    for ref in refs:
        file_index, line = ref >> 40, ref & (1 << 40) - 1
        last = runs[-1] if runs else None
        if last and last[0] == file_index and last[1] + last[2] == line:
            last[2] += 1
        else:
            runs.append([file_index, line, 1])
    return runs


# ----------------------------------------------------------------------------- alerts back to raw lines
class RawLines:
    """The raw log line behind each event of a session written by preprocess.py, whose "lines" runs
    [[file index, first line, count], ...] number the lines of `files`. Lines are fetched a chunk at a time:
    plain files through a sparse index (the offset of every INDEX_EVERY-th line, built on first use, so memory
    is 8 bytes per INDEX_EVERY lines) and a seek; .gz files by one sequential read per chunk."""

    INDEX_EVERY = 1024

    def __init__(self, files: list[str]):
        self.files, self.indexes = [Path(f) for f in files], {}

    @classmethod
    def for_sessions(cls, path) -> RawLines | None:
        """From the sources.json that preprocess.py writes next to sessions.jsonl; None where there is none."""
        path = Path(path)
        sources = (path if path.is_dir() else path.parent) / "sources.json"
        try:
            return cls(json.loads(sources.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def line_of(runs, position: int) -> tuple[int, int] | None:
        """(file index, line number) of the event at `position`, or None (the end of session, no provenance)."""
        try:
            for file_index, first, count in runs:
                if position < count:
                    return int(file_index), int(first) + position
                position -= count
        except (TypeError, ValueError):
            return None
        return None

    def fetch(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
        found: dict[tuple[int, int], str] = {}
        by_file: dict[int, list[int]] = {}
        for file_index, line in wanted:
            if 0 <= file_index < len(self.files) and line >= 1:
                by_file.setdefault(file_index, []).append(line)
        for file_index, lines in by_file.items():
            try:
                found.update({(file_index, n): text for n, text in self._read(self.files[file_index], sorted(lines))})
            except (OSError, EOFError):
                continue  # a log moved or rotated away: its misses are shown without their line
        return found

    def _read(self, file: Path, lines: list[int]):
        if file.name.endswith(".gz"):
            with gzip.open(file, "rb") as handle:
                yield from self._scan(handle, 1, lines)
            return
        index = self.indexes.get(file)
        if index is None:
            index = self.indexes[file] = self._index(file)
        with open(file, "rb") as handle:
            for line in lines:
                block = (line - 1) // self.INDEX_EVERY
                if block >= len(index):
                    break
                handle.seek(int(index[block]))
                yield from self._scan(handle, block * self.INDEX_EVERY + 1, [line])

    @staticmethod
    def _scan(handle, first: int, lines: list[int]):
        wanted = iter(lines)
        target = next(wanted, None)
        for number, raw in enumerate(handle, start=first):
            while target is not None and target < number:
                target = next(wanted, None)
            if target is None:
                return
            if number == target:
                yield number, raw.decode(errors="replace").rstrip("\r\n")
                target = next(wanted, None)

    def _index(self, file: Path):
        import numpy as np  # only detection needs it: preprocessing stays lean (its peak RSS is ~30 MB)
        offsets, newlines, position = [0], 0, 0
        with open(file, "rb") as handle:
            while block := handle.read(2 ** 20):
                ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + position + 1  # after each newline
                first = (-newlines - 1) % self.INDEX_EVERY  # the newline that ends line k * INDEX_EVERY
                offsets.extend(ends[first::self.INDEX_EVERY].tolist())
                newlines += len(ends)
                position += len(block)
        return np.array(offsets, dtype=np.int64)

    def annotate(self, located: list[tuple[list | None, list[dict]]]) -> None:
        """Add to each miss its raw line ("raw") and where it is ("at"), for (lines runs, misses) pairs."""
        places = [(miss, self.line_of(runs, miss["position"]) if runs else None)
                  for runs, misses in located for miss in misses]
        found = self.fetch({where for _, where in places if where is not None})
        for miss, where in places:
            if where is not None:
                miss["at"] = f"{self.files[where[0]] if where[0] < len(self.files) else where[0]}:{where[1]}"
                miss["raw"] = found.get(where)


# ----------------------------------------------------------------------------- the run
GROUPING = ("session_key", "session_idle", "window", "time_field", "time_format", "label_field", "normal_value")


def make_grouper(cfg: PreprocessConfig, parser: Parser, parse_only: bool = False) -> Sessions | Windows | None:
    """The grouper the settings ask for; None for a parse-only run (`parse_only` allowed and neither
    --session-key nor --window given)."""
    fields = parser.regex.groupindex
    for flag, name in (("--label-field", cfg.label_field), ("--time-field", cfg.time_field)):
        if name is not None and name not in fields:
            raise PreprocessError(f"{flag} {name}: not a field of the log format ({', '.join(fields)})")
    if cfg.session_key is not None and cfg.window is not None or \
            cfg.session_key is None and cfg.window is None and not parse_only:
        raise PreprocessError("give either --session-key REGEX or --window count:SIZE[:STEP] / time:SIZE[:STEP]")
    if cfg.max_open_sessions < 1 or (cfg.session_idle or 1) < 1:
        raise PreprocessError("--max-open-sessions and --session-idle must be >= 1")
    if cfg.session_key is not None:
        return Sessions(compile_regex(cfg.session_key, "--session-key"), cfg.max_open_sessions, cfg.session_idle)
    if cfg.window is None:  # parse only: settings that only grouping reads would be silently ignored
        given = [flag for flag, value in (("--labels", cfg.labels), ("--label-field", cfg.label_field),
                                          ("--time-field", cfg.time_field), ("--session-idle", cfg.session_idle))
                 if value is not None]
        if given:
            raise PreprocessError(f"{given[0]} groups lines: give --session-key or --window too, or drop it")
        return None
    grouper = Windows(cfg.window)
    if grouper.kind == "time" and cfg.time_field is None:
        raise PreprocessError("--window time:... needs --time-field (a field of --log-format)")
    if cfg.labels:
        raise PreprocessError("--labels names sessions: with --window, label lines with --label-field")
    return grouper


FAIL_FAST_LINES = 1000  # none of this many first lines matching the log format: the format is wrong, stop


def no_match_error(log_format: str, first_lines: list[str], lines: int) -> PreprocessError:
    shown = "; ".join(first_lines) or "none, the input is empty"
    return PreprocessError(f"no line {'of the first %d ' % lines if lines >= FAIL_FAST_LINES else ''}matches "
                           f"--log-format {log_format!r} (first lines: {shown}). The text between fields is a "
                           f"regular expression, as in loghub: write \\[ \\( \\. \\| \\? for the characters")


def iter_log_sessions(cfg: PreprocessConfig, parser: Parser, files: list[Path], stats: dict,
                      labels: dict | None = None, rows=None, parse_only: bool = False,
                      require_match: bool = False):
    """Sessions as sessions.jsonl holds them (dicts), streamed from raw log files (none in a parse-only
    run); counts go into `stats`, and one CSV row per input line (LineId, EventId, the fields) into `rows`
    when given. PreprocessError once FAIL_FAST_LINES lines came and none matched the log format (or at the
    end, with `require_match`)."""
    grouper = make_grouper(cfg, parser, parse_only)
    names, first_lines = list(parser.regex.groupindex), []
    writer = csv.writer(rows) if rows else None

    def finished(groups):
        for session_id, events, refs, abnormal in groups:
            label = labels.get(session_id, 0) if labels is not None else int(abnormal)
            stats["sessions"] += 1
            stats["abnormal"] += label
            stats["unlabelled"] += labels is not None and session_id not in labels
            yield {"session_id": session_id, "event_ids": list(events), "label": label, "lines": line_runs(refs)}

    for file_index, number, line in read_lines(files):
        stats["lines"] += 1
        match = parser.match(line)
        if match is None:
            stats["unmatched"] += 1
            if len(first_lines) < 3:
                first_lines.append(f"{files[file_index]}:{number}: {line[:120]}")
                stats["first_unmatched"] = first_lines[0]
            if stats["parsed"] == 0 and stats["lines"] >= FAIL_FAST_LINES:
                raise no_match_error(parser.log_format, first_lines, stats["lines"])
            if writer:
                writer.writerow([stats["lines"], ""])
            continue
        # a field inside an optional group, such as loghub's (\[<PID>\])?, is None where absent: read as ""
        event = parser.parse(match.group("Content") or "")
        stats["parsed"] += 1
        stats["unknown"] += event >= parser.vocab_size
        if writer:
            writer.writerow([stats["lines"], event, *(match.group(name) or "" for name in names)])
        if grouper is None:
            continue
        when = None
        if cfg.time_field:
            try:
                value = match.group(cfg.time_field) or ""
                when = datetime.strptime(value, cfg.time_format).replace(tzinfo=timezone.utc).timestamp() \
                    if cfg.time_format else float(value)
            except ValueError:
                stats["bad_time"] += 1
                continue
        abnormal = cfg.label_field is not None and (match.group(cfg.label_field) or "") != cfg.normal_value
        yield from finished(grouper.add(line, event, file_index << 40 | number, abnormal, when))
    if require_match and stats["parsed"] == 0:
        raise no_match_error(parser.log_format, first_lines, stats["lines"])
    if grouper is None:
        return
    yield from finished(grouper.close())
    stats.update(**({"lines_without_key": grouper.no_key, "sessions_closed_idle": grouper.closed_idle,
                     "sessions_closed_early": grouper.closed_early}
                    if isinstance(grouper, Sessions) else {"out_of_order": grouper.out_of_order}))


def sessions_from_logs(state_path: str, inputs: list[str], stats: dict | None = None, **settings):
    """For detection on raw logs: sessions (dicts as in sessions.jsonl) through a saved parser state, with
    the grouping it was saved with unless `settings` (PreprocessConfig fields) say otherwise. Streamed."""
    state = load_state(state_path)
    cfg = PreprocessConfig(**{**state.get("grouping", {}), **settings})
    stats = stats if stats is not None else new_stats()
    return iter_log_sessions(cfg, Parser(cfg, state), input_files(inputs), stats)


def new_stats() -> dict:
    return collections.defaultdict(int, lines=0, parsed=0, unmatched=0, bad_time=0, unknown=0, first_unmatched="")


def preprocess(cfg: PreprocessConfig, inputs: list[str], output: Path, state: dict | None = None,
               structured: str | None = None, base_config: str | None = None) -> dict:
    """Parse and group `inputs` into `output`. Without --session-key or --window it only parses: templates,
    parser state, sources and the --structured CSV, no sessions.jsonl or config.yaml (there is nothing to
    train on)."""
    parser = Parser(cfg, state)
    parse_only = make_grouper(cfg, parser, parse_only=True) is None  # settings checked before any work
    labels = read_labels(cfg.labels) if cfg.labels else None
    files = input_files(inputs)
    output.mkdir(parents=True, exist_ok=True)
    stats = new_stats()
    started = time.perf_counter()
    sessions_tmp = None if parse_only else \
        tempfile.NamedTemporaryFile("w", dir=output, prefix=".sessions.", delete=False)
    rows_tmp = tempfile.NamedTemporaryFile("w", dir=output, prefix=".rows.", delete=False, newline="") \
        if structured else None
    try:
        try:
            for session in iter_log_sessions(cfg, parser, files, stats, labels, rows_tmp, parse_only, True):
                sessions_tmp.write(json.dumps(session, separators=(",", ":")) + "\n")
            if sessions_tmp:
                sessions_tmp.close()
        except OSError as error:  # a full disk: a failed write names no file; the temp file goes below
            if error.filename:
                raise
            name = output / "sessions.jsonl" if sessions_tmp else Path(structured)  # the file being made
            raise OSError(error.errno, error.strerror or str(error), str(name)) from None
        if sessions_tmp:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(sessions_tmp.name, 0o666 & ~umask)  # temp files are made 0600: follow the umask instead
            os.replace(sessions_tmp.name, output / "sessions.jsonl")
        if rows_tmp:
            rows_tmp.close()
            write_structured(rows_tmp.name, structured, parser)
    finally:
        for tmp in (sessions_tmp, rows_tmp):
            if tmp is not None:
                tmp.close()
                Path(tmp.name).unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    stats.update(templates=parser.vocab_size, seconds=round(elapsed, 3),
                 peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                 lines_per_s=round(stats["lines"] / max(elapsed, 1e-9)))
    if parse_only:
        stats["parse_only"] = True
    write_json(output / "templates.json", parser.table())
    grouping = {k: getattr(cfg, k) for k in GROUPING}
    write_json(output / "parser_state.json", {**parser.state(), "grouping": grouping})
    write_json(output / "sources.json", {"files": [str(f.resolve()) for f in files], "stats": dict(stats)})
    if parser.learning and not parse_only:  # data with unknown IDs (>= vocab_size) is for detection only
        write_train_config(base_config, output, parser.vocab_size)
    return dict(stats)


def write_structured(rows_path: str, structured: str, parser: Parser) -> None:
    """loghub's *_structured.csv columns: LineId, the log format's fields (Content among them), EventId,
    EventTemplate, with each template as it stands at the end (Drain's templates change while it learns, so
    the rows are written from the IDs once the parse is done). A line the format does not match has only its
    LineId."""
    Path(structured).parent.mkdir(parents=True, exist_ok=True)
    names = list(parser.regex.groupindex)
    templates = {}
    with open(rows_path, newline="") as rows, open(structured, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["LineId", *names, "EventId", "EventTemplate"])
        for line_id, event, *values in csv.reader(rows):
            if event and event not in templates:
                templates[event] = parser.template(int(event)) if int(event) < parser.vocab_size else "<unknown>"
            writer.writerow([line_id, *(values or [""] * len(names)), event, templates.get(event, "")])


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def write_train_config(base_config: str | None, output: Path, vocab_size: int) -> None:
    """The base config (minus its preprocess: section, which utils.load_config does not know) with this
    data, validated by the same loader train.py uses."""
    import utils  # here, not at the top: it imports torch, which parsing does not need

    raw = read_yaml(base_config) if base_config else {}
    raw.pop("preprocess", None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=output, delete=False) as handle:
        yaml.safe_dump(raw, handle)
    try:
        config = utils.load_config(handle.name, {"model.vocab_size": vocab_size,
                                                 "data.preprocessed_dir": str((output / "sessions.jsonl").resolve()),
                                                 "training.output_dir": str((output / "train").resolve())})
    except utils.ConfigError as error:
        raise PreprocessError(f"--config {base_config}: {str(error).replace(handle.name + ': ', '')}") from None
    finally:
        Path(handle.name).unlink(missing_ok=True)
    utils.save_config(config, output / "config.yaml")


def read_yaml(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PreprocessError(f"--config {path}: unreadable: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise PreprocessError(f"--config {path}: expected a mapping of sections")
    return raw


def resolve_config(base_config: str | None, flags: dict, state_grouping: dict | None = None) -> PreprocessConfig:
    """PreprocessConfig defaults < the `preprocess:` section of the YAML < the grouping saved in a parser
    state < flags given (not None)."""
    cfg = PreprocessConfig()
    section = read_yaml(base_config).get("preprocess") or {} if base_config else {}
    if not isinstance(section, dict):
        raise PreprocessError(f"{base_config}: section 'preprocess' must be a mapping")
    hints = typing.get_type_hints(PreprocessConfig)
    for source, values in ((f"{base_config}: preprocess", section), ("parser state", state_grouping or {}),
                           ("command line", flags)):
        for key, value in values.items():
            if value is None and source == "command line":
                continue
            if key not in hints:
                raise PreprocessError(f"{source}: unknown key '{key}' (known: {', '.join(hints)})")
            expected = typing.get_args(hints[key])[0] if typing.get_origin(hints[key]) is typing.Union else hints[key]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not (value is None and typing.get_origin(hints[key]) is typing.Union) and \
                    (not isinstance(value, expected) or isinstance(value, bool) != (expected is bool)):
                raise PreprocessError(f"{source}: '{key}' must be {expected.__name__}, got {value!r}")
            setattr(cfg, key, value)
    return cfg


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", help="raw log files or directories of them (plain or .gz)")
    add("--output", required=True, help="directory for sessions.jsonl, templates.json, parser_state.json, ...")
    add("--config", default="config.yaml", help="YAML whose `preprocess:` section gives defaults and whose "
        "other sections are copied into OUTPUT/config.yaml (default: config.yaml, if present)")
    add("--log-format", help="loghub's line layout, e.g. '<Date> <Time> <Level> \\[<Process>\\] <Component>: "
        "<Content>': text between fields is a regex, a run of spaces any whitespace (default: the whole line is "
        "the content)")
    add("--mask", action="append", dest="masks", help="regex of a variable part, replaced by <*> before Drain; "
        "repeatable (replaces the config's list), applied in order before the default masks")
    add("--no-default-masks", action="store_false", dest="default_masks", default=None,
        help="do not apply the built-in masks (IP:port, UUID, hex, long hex ids, paths, block-like ids, numbers)")
    add("--similarity", type=float, help="Drain similarity threshold sim_th in [0, 1] (default 0.45)")
    add("--depth", type=int, help="Drain prefix-tree depth, >= 3 (default 4)")
    add("--max-templates", type=int, help="cap on templates held (drain3 max_clusters, least recently used "
        "evicted; an evicted template seen again gets a new ID); default: no cap")
    add("--parser-state", help="parser_state.json of an earlier run: match lines onto its event IDs, learn "
        "nothing (unmatched lines get ID vocab_size); log format, masks and Drain settings come from it, and "
        "the grouping unless given")
    add("--session-key", help=r"regex of session identifiers, e.g. 'blk_-?\d+' (a line naming several joins each)")
    add("--window", help="count:SIZE[:STEP] (lines) or time:SIZE[:STEP] (seconds; needs --time-field)")
    add("--time-field", help="log-format field holding each line's time (default format: epoch seconds)")
    add("--time-format", help="strptime format of --time-field, e.g. '%%Y-%%m-%%d-%%H.%%M.%%S.%%f' (read as UTC)")
    add("--labels", help="CSV of session id, label (Normal/Anomaly or 0/1), such as HDFS's anomaly_label.csv")
    add("--label-field", help="log-format field labelling each line; a session or window with any line whose "
        "value is not --normal-value is abnormal")
    add("--normal-value", help="value of --label-field on normal lines (default '-', as in BGL)")
    add("--session-idle", type=int, help="a session not named for this many input lines is complete and "
        "written, which keeps memory flat on endless logs (default: sessions end with the input)")
    add("--max-open-sessions", type=int, help="open sessions held at most; then the least recently active is "
        "written early (default 1000000)")
    add("--structured", help="also write this CSV: one row per input line, LineId (1-based, counted over all "
        "inputs), the log format's fields, EventId, EventTemplate (without --session-key or --window: parse only)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in PreprocessConfig.__dataclass_fields__}

    def run():
        base = args.config if (args.config != "config.yaml" or Path(args.config).exists()) else None
        state = None
        if args.parser_state:
            given = [k for k in ("log_format", "masks", "default_masks", "similarity", "depth", "max_templates")
                     if flags[k] is not None]
            if given:
                raise PreprocessError(f"--parser-state fixes the parser: drop --{given[0].replace('_', '-')}")
            state = load_state(args.parser_state)
        cfg = resolve_config(base, flags, state and state.get("grouping"))
        stats = preprocess(cfg, args.inputs, Path(args.output), state, args.structured, base)
        print(f"{stats['lines']} lines: {stats['parsed']} parsed, {stats['unmatched']} not matching the log format"
              f"{', %d of unknown events' % stats['unknown'] if args.parser_state else ''}; "
              f"{stats['templates']} templates (vocab_size); "
              + ("parsed only (no --session-key or --window): no sessions.jsonl or config.yaml written"
                 if stats.get("parse_only") else f"{stats['sessions']} sessions, {stats['abnormal']} abnormal")
              + f"; {stats['lines_per_s']:,} lines/s. Output in {args.output}")
        if stats.get("parse_only") and (Path(args.output) / "sessions.jsonl").exists():
            print(f"warning: {Path(args.output) / 'sessions.jsonl'} is an earlier run's, not this one's",
                  file=sys.stderr)
        for key, what in (("sessions_closed_early", "sessions written early (raise --max-open-sessions)"),
                          ("unlabelled", "sessions missing from --labels (labelled normal)"),
                          ("bad_time", "lines with an unreadable --time-field (left out)"),
                          ("out_of_order", "lines earlier than the line before (kept in the current window)")):
            if stats.get(key):
                print(f"warning: {stats[key]} {what}", file=sys.stderr)

    try:
        run()
    except PreprocessError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {error.filename + ': ' if error.filename else ''}{error.strerror or error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
