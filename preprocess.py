r"""Raw log files in: parse them with Drain3, group the lines into sessions or windows, write training data.

Examples:

    # HDFS-style: one session per block; a line naming two blocks joins both sessions
    python preprocess.py ../shared/data/loghub/HDFS_2k.log --output outputs/hdfs_raw \
        --log-format "<Date> <Time> <Pid> <Level> <Component>: <Content>" --session-key 'blk_-?\d+' \
        --labels anomaly_label.csv
    python train.py --config outputs/hdfs_raw/config.yaml          # vocab_size and data path are set
    python preprocess.py /logs/hdfs/ --session-idle 200000 ...      # endless logs: a block unnamed for
                                                                    # 200,000 lines is complete (flat memory)

    # BGL-style: no identifiers, so windows (here 1 h every 30 min); label from the first field ('-' = normal)
    BGL='<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> <Content>'
    python preprocess.py BGL.log.gz --output outputs/bgl --window time:3600:1800 --time-field Timestamp \
        --log-format "$BGL" --label-field Label --normal-value - --structured outputs/bgl/structured.csv
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

Input: a file or a directory of files (plain or .gz; regular files, read again later for the raw lines
behind detections, so not a FIFO or a pipe), streamed line by line, a line ending at "\n", "\r\n" or a lone
"\r" (one splitter for parsing, --labels and the raw lines shown); memory holds the parser, the open
sessions (those named within --session-idle lines, at most --max-open-sessions) or the current windows,
never the lines. Each user regex (--mask, --session-key, the text of --log-format) has REGEX_BUDGET_S
(1 s) per line: one that backtracks past it stops the run, naming it and the line. Settings: the one
config of utils.py (its PreprocessConfig defaults < the optional `preprocess:` section of --config < with
--parser-state, the grouping saved in it < flags), every value checked there; a parser state is checked key
by key where it is read (load_state).

Output in --output: sessions.jsonl (session_id, event_ids, label, and "lines": [[file index, first line,
count], ...], runs of consecutive line numbers the events came from), sources.json (the files those
indexes name, and the counts), templates.json (id, template, count), parser_state.json (plain JSON: log
format, masks, Drain settings, templates, prefix tree, grouping), and config.yaml, the --config values with
model.vocab_size, data.preprocessed_dir and training.output_dir set for `python train.py --config`.
A parse-only run writes no sessions.jsonl or config.yaml. --structured writes loghub's *_structured.csv
columns: LineId, the format's fields, EventId, EventTemplate.

One parse at a time, shown whole: a run holds --output's lock (utils.OutputLock; a second run on the same
folder is refused, naming the holder) and writes every file (the --structured CSV too, when it names a
file directly in --output) into a new generation folder, OUTPUT/.parse-<time>-<random>/. Once all are
written and fsynced, OUTPUT/current, a symlink, is pointed at it with one atomic rename; the names users
know (OUTPUT/sessions.jsonl, parser_state.json, config.yaml, ...) are fixed symlinks to current/<name>.
So at every moment, an interrupt or a kill at any step included, the folder shows the previous parse or
the new one, never a mix: a name the shown parse lacks (sessions.jsonl after a parse-only run) is a
dangling link, then removed. The previous generation, and any a killed run left, is removed under the lock.
Paths in config.yaml go through the fixed names (absolute, symlinks not resolved), so they follow the
parse shown. A folder written before generations existed (plain files) is first taken in as one. A
--structured CSV elsewhere is written atomically to its own path, before the switch.
"""
from __future__ import annotations

import argparse
import array
import collections
import contextlib
import csv
import gzip
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

from drain3 import TemplateMiner
from drain3.drain import LogCluster, Node
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

import utils
from config import Config, PreprocessConfig, check_values, load_config, save_config, set_value

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
    rf"{_B}[A-Za-z]+_-?\d+(_\w+)?{_E}",                                  # block-like ids: blk_-42, job_20_1
    rf"{_B}0[xX][0-9a-fA-F]+{_E}",                                       # 0x hex numbers
    rf"{_B}(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{{8,}}{_E}",                     # long hex ids, hashes
    rf"{_B}[-+]?\d+(\.\d+)?{_E}",                                        # numbers
    r"<\*>(\s+<\*>)+",  # a run of values (a list of ids, "1 of 3"...) is one: any length, one template
]


PreprocessConfig = PreprocessConfig  # the `preprocess:` section of the one config (utils.py)
# The settings that group lines, saved in the parser state (so detection groups new logs the same way)
GROUPING = ("session_key", "session_idle", "window", "time_field", "time_format", "label_field",
            "normal_value")


class PreprocessError(utils.UserError):
    """Bad input or settings; the message says which."""


class LineError(PreprocessError):
    """A PreprocessError about the log line being grouped; the parse adds which line it is."""


# ----------------------------------------------------------------------------- user regexes, on a budget
# A user's regex (--mask, --session-key, the text between the fields of --log-format) can backtrack without
# end on a line it does not fit: (a+)+$ on 30 a's and a b takes minutes, on 40 days. Each call of one on one
# line has a time budget, REGEX_BUDGET_S: the watchdog below stops the call past it, and the run stops on one
# line naming the setting, the pattern and the log line. The engine stays the stdlib's (the `regex` package's
# own timeout= costs about 3.5 us a call, a sixth of the parse; RE2 refuses lookarounds, which masks use):
# its matcher checks for signals while it backtracks, so a SIGALRM handler can end even a match that never
# would. The built-in masks are linear by construction and run without the watchdog.
# A budget per call alone would let a pattern that takes just under it on every line run for days: calls
# that each run past one tick are slow for a log line whatever the pattern, and past SLOW_BUDGET_S of them
# (CPU time of the main thread, so a loaded machine does not count) within SLOW_WINDOW_S the run stops too.
REGEX_BUDGET_S = 1.0
SLOW_BUDGET_S, SLOW_WINDOW_S = 5.0, 60.0
_TICK_S = 0.2


class PatternTimeout(PreprocessError):
    """A user regex ran past REGEX_BUDGET_S on one line, or its slow calls past SLOW_BUDGET_S (`slow_s`)
    within SLOW_WINDOW_S (raised inside the match by the watchdog)."""

    def __init__(self, regex: UserRegex, slow_s: float | None = None):
        self.flag, self.pattern, self.slow_s = regex.flag, regex.shown, slow_s
        super().__init__(f"{regex.flag} {utils.short(regex.shown)}: no result after {REGEX_BUDGET_S:g} s "
                         f"on one line" if slow_s is None else
                         f"{regex.flag} {utils.short(regex.shown)}: {slow_s:.1f} s in calls of over "
                         f"{_TICK_S:g} s each on one line within {SLOW_WINDOW_S:g} s")


class _Watchdog:
    """While armed (a `with` block in the main thread, the others nest), a SIGALRM ticks every _TICK_S. A
    UserRegex call marks itself running (one serial number per call); a tick that finds the same call still
    running REGEX_BUDGET_S after it first saw it raises PatternTimeout inside that call. Ticks while no user
    regex runs do nothing. Where it cannot arm (a thread other than the main one, or SIGALRM or the real-time
    timer already in use) the patterns run without a budget."""

    def __init__(self):
        self.running: UserRegex | None = None
        self.serial, self.depth, self.seen, self.armed = 0, 0, (0, 0.0), False
        self.last = (0, 0.0)               # the call running at the last tick, and the thread's CPU time then
        self.slow_s, self.slow_since = 0.0, 0.0   # CPU time in calls seen by two ticks, since when

    def __enter__(self):
        if self.depth == 0:
            self.armed = self._arm()
        self.depth += 1
        return self

    def __exit__(self, *_):
        self.depth -= 1
        if self.depth == 0 and self.armed:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            with contextlib.suppress(ValueError):  # (left in another thread: the timer is off, enough)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)

    def _arm(self) -> bool:
        try:
            if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None) or \
                    signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
                return False  # someone else's alarm: left alone
            signal.signal(signal.SIGALRM, self._tick)
        except ValueError:  # not the main thread
            return False
        signal.setitimer(signal.ITIMER_REAL, _TICK_S, _TICK_S)
        return True

    def _tick(self, _signum, _frame):
        running = self.running
        if running is None:
            return
        now, cpu = time.monotonic(), time.thread_time()
        if self.seen[0] != self.serial:
            self.seen = (self.serial, now)
        elif now - self.seen[1] >= REGEX_BUDGET_S:
            self.running = None
            raise PatternTimeout(running)
        if self.last[0] == self.serial:   # one call seen by two ticks: its CPU time between them is slow
            if now - self.slow_since > SLOW_WINDOW_S:
                self.slow_s, self.slow_since = 0.0, now
            self.slow_s += cpu - self.last[1]
            if self.slow_s >= SLOW_BUDGET_S:
                slow_s, self.slow_s, self.running = self.slow_s, 0.0, None
                raise PatternTimeout(running, slow_s)
        self.last = (self.serial, cpu)


_WATCHDOG = _Watchdog()


class UserRegex:
    """A compiled user regex whose calls run on the watchdog's budget; messages name it as `flag` `shown`
    (default: its pattern). match and sub as re.Pattern's; finditer returns a list of the matches."""

    __slots__ = ("regex", "flag", "shown")

    def __init__(self, regex: re.Pattern, flag: str, shown: str | None = None):
        self.regex, self.flag, self.shown = regex, flag, regex.pattern if shown is None else shown

    @property
    def pattern(self) -> str:
        return self.regex.pattern

    @property
    def groupindex(self):
        return self.regex.groupindex

    def match(self, text: str):
        watch = _WATCHDOG
        watch.serial += 1
        watch.running = self
        try:
            return self.regex.match(text)
        finally:
            watch.running = None

    def sub(self, replacement: str, text: str) -> str:
        watch = _WATCHDOG
        watch.serial += 1
        watch.running = self
        try:
            return self.regex.sub(replacement, text)
        finally:
            watch.running = None

    def finditer(self, text: str) -> list[re.Match]:
        watch = _WATCHDOG
        watch.serial += 1
        watch.running = self
        try:
            return list(self.regex.finditer(text))
        finally:
            watch.running = None


def timeout_error(error: PatternTimeout, where: str) -> PreprocessError:
    """The one line for a user regex stopped by the watchdog on the log line `where` (file:line)."""
    took = f"no result after {REGEX_BUDGET_S:g} s on {where}" if error.slow_s is None else \
        f"{error.slow_s:.1f} s in calls of over {_TICK_S:g} s each on one line within {SLOW_WINDOW_S:g} s " \
        f"(the last on {where})"
    return PreprocessError(f"{error.flag} {utils.short(error.pattern)}: {took}, so the run stops: a pattern "
                           f"whose repeats nest or overlap, such as "
                           f"(a+)+ or (a|aa)*, backtracks exponentially on a line it almost fits; write each "
                           f"repeat once (a+ for (a+)+)")


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
        if not text:   # nothing follows: the rest of the line, greedy (the same span: a stripped line has
            return f"(?>(?P<{name}>.*)$)"   # no newline before its end; a C loop, not a step per char)
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
        why = f"bad field name {utils.short_text(bad[0], 80)}" if bad else \
            "a field repeats" if "<Content>" in fields else "no <Content>"
        raise PreprocessError(f"--log-format {utils.short(log_format)}: {why} (expected e.g. "
                              f"'<Date> <Time> <Level>: <Content>')")
    texts = [re.sub(" +", r"\\s+", part) for part in parts[0::2]]
    loghub = "".join(f"(?P<{part[1:-1]}>.*?)" if i % 2 else texts[i // 2] for i, part in enumerate(parts))
    names = [f[1:-1] for f in fields]
    try:
        lost = [name for name in names if name not in re.compile(f"^{loghub}$").groupindex]
        if lost:  # "[<Level>]" is a character class holding the field's group: it compiles, means nothing
            raise re.error(f"<{lost[0]}> is inside a character class [...]")
    except (re.error, RecursionError, OverflowError) as error:
        why = "nested too deep" if isinstance(error, RecursionError) else utils.short_text(str(error), 100)
        raise PreprocessError(f"--log-format {utils.short(log_format)}: the text between fields is a regular "
                              f"expression (as in loghub) and this one is not: {why} (write \\[ \\( \\. "
                              f"\\| \\? for the characters themselves)") from None
    pieces = [texts[0]] + [_field_regex(name, _MARK.join(texts[i + 1:]), i == len(names) - 1)
                           for i, name in enumerate(names)]
    try:
        return re.compile("^" + "".join(pieces))
    except re.error:  # not expected; loghub's own regex is then the safe choice
        return re.compile(f"^{loghub}$")


def compile_regex(pattern: str, flag: str) -> re.Pattern:
    """`pattern` compiled (stdlib syntax); where it is none, PreprocessError naming `flag` and the pattern."""
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as error:
        why = "nested too deep" if isinstance(error, RecursionError) else utils.short_text(str(error), 100)
        raise PreprocessError(f"{flag} {utils.short(pattern)}: not a regular expression: {why}") from None


# the built-in masks as Parser joins them: linear by construction, run without the watchdog
_BUILT_IN_MASKS = ("|".join(f"(?:{m})" for m in DEFAULT_MASKS[:-1]), DEFAULT_MASKS[-1])


def make_miner(drain: dict, masks: list[str], flag: str = "--mask") -> TemplateMiner:
    """drain3's TemplateMiner with these settings and masks (each replaced by <*>); every mask but the
    built-in ones runs on the watchdog's budget, named `flag` in messages."""
    config = TemplateMinerConfig()  # in code: no drain3.ini is read
    config.drain_sim_th, config.drain_depth = drain["sim_th"], drain["depth"]
    config.drain_max_children, config.drain_max_clusters = drain["max_children"], drain["max_clusters"]
    config.masking_instructions = []
    for mask in masks:
        instruction = MaskingInstruction(compile_regex(mask, flag).pattern, "*")
        if mask not in _BUILT_IN_MASKS:
            instruction.regex = UserRegex(instruction.regex, flag)  # what its mask() calls .sub on
        config.masking_instructions.append(instruction)
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
            # the default masks as one alternation: one scan of the line instead of one per mask (faster,
            # same result: each alternative starts where no earlier one could)
            masks = list(cfg.masks) + (list(_BUILT_IN_MASKS) if cfg.default_masks else [])
            state = {"log_format": cfg.log_format, "masks": masks, "templates": [], "tree": None,
                     "drain": {"sim_th": cfg.similarity, "depth": cfg.depth, "max_children": 100,
                               "max_clusters": cfg.max_templates}}
        self.log_format, self.masks, self.drain_settings = state["log_format"], state["masks"], state["drain"]
        self.regex = format_regex(self.log_format)
        self._format = UserRegex(self.regex, "--log-format" if self.learning else "the log format of "
                                 "--parser-state", self.log_format)
        self.miner = make_miner(self.drain_settings, self.masks, "--mask" if self.learning else "a mask of "
                                "--parser-state")
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
        return self._format.match(line.strip())

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
        return [{"id": i, "template": self.template(i),
                 "count": self.counts[i] if i < len(self.counts) else 0,
                 **({} if i in live else {"evicted": True})} for i in range(self.vocab_size)]


# ----------------------------------------------------------------------------- the parser state, validated
# What Parser.state() writes (plus the grouping): every key is checked where the file is read, so that a
# damaged or hand-edited state is one PreprocessError naming the file and the key, never a traceback, a
# MemoryError or IDs silently shifted.
STATE_KEYS = ("format", "version", "log_format", "masks", "drain", "vocab_size", "templates", "tree")
DRAIN_KEYS = ("sim_th", "depth", "max_children", "max_clusters")
MAX_VOCAB = 10_000_000  # event IDs a state may issue (the model holds an embedding row per ID)


def load_state(path: str) -> dict:
    """A parser_state.json written by preprocess.py, as it was written, once every key has been checked: its
    type and range, the templates against vocab_size (IDs unique, ascending and below it; as many as
    vocab_size unless drain.max_clusters evicted some), the prefix tree (its shape, depth and cluster IDs,
    each template under its token count) and the grouping (the keys and types of the `preprocess:` config
    section). Any fault: PreprocessError naming the file and what is wrong. Plain JSON: nothing is
    unpickled."""
    try:
        with utils.open_regular(path) as handle:
            state = json.loads(handle.read())
    except (OSError, ValueError, RecursionError) as error:
        why = "nested too deep" if isinstance(error, RecursionError) else \
            getattr(error, "strerror", None) or error
        raise PreprocessError(f"--parser-state {path}: unreadable: {why}") from None
    try:
        _check_state(state)
    except PreprocessError as error:
        raise PreprocessError(f"--parser-state {path}: {error}") from None
    return state


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise PreprocessError(f"'{key}' must be {rule}, got {_show(value)}")


def _check_state(state) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PreprocessError(f"not a parser_state.json written by preprocess.py (a JSON object with "
                              f"format {STATE_FORMAT!r}), got {_show(state)}")
    missing = [key for key in STATE_KEYS if key not in state]
    unknown = [key for key in state if key not in (*STATE_KEYS, "grouping")]
    if missing or unknown:
        raise PreprocessError(f"incomplete, no {', '.join(missing)}" if missing else
                              f"unknown key {utils.short(unknown[0])}")
    _need(_is_int(state["version"]) and state["version"] == 1, "version", "1", state["version"])
    _need(isinstance(state["log_format"], str), "log_format", "a string", state["log_format"])
    masks = state["masks"]
    _need(isinstance(masks, list) and all(isinstance(m, str) for m in masks), "masks", "a list of strings",
          masks)
    try:
        format_regex(state["log_format"])
        for mask in masks:
            compile_regex(mask, "masks:")
    except PreprocessError as error:
        raise PreprocessError(f"log_format or masks: {error}") from None
    drain = state["drain"]
    _need(isinstance(drain, dict) and sorted(drain) == sorted(DRAIN_KEYS), "drain",
          f"an object of {', '.join(DRAIN_KEYS)}", drain)
    sim_th, depth = drain["sim_th"], drain["depth"]
    _need(isinstance(sim_th, (int, float)) and not isinstance(sim_th, bool) and 0 <= sim_th <= 1,
          "drain.sim_th", "a number in [0, 1]", sim_th)  # (NaN fails the comparison too)
    _need(_is_int(depth) and depth >= 3, "drain.depth", "an int >= 3", depth)
    _need(_is_int(drain["max_children"]) and drain["max_children"] >= 1, "drain.max_children", "an int >= 1",
          drain["max_children"])
    _need(drain["max_clusters"] is None or _is_int(drain["max_clusters"]) and drain["max_clusters"] >= 1,
          "drain.max_clusters", "null or an int >= 1", drain["max_clusters"])
    vocab_size = state["vocab_size"]
    _need(_is_int(vocab_size) and 1 <= vocab_size <= MAX_VOCAB, "vocab_size", f"an int in [1, {MAX_VOCAB:,}]",
          vocab_size)
    templates = _check_templates(state["templates"], vocab_size, drain["max_clusters"])
    _check_tree(state["tree"], templates, vocab_size, depth)
    _check_grouping(state.get("grouping", {}), state["log_format"])


def _check_templates(templates, vocab_size: int, max_clusters: int | None) -> dict[int, str]:
    """ID -> template of a state's templates list, checked against vocab_size."""
    _need(isinstance(templates, list), "templates", "a list", templates)
    found: dict[int, str] = {}
    last = -1
    for index, entry in enumerate(templates):
        key = f"templates[{index}]"
        _need(isinstance(entry, dict) and sorted(entry) == ["id", "template"], key,
              "an object of id, template", entry)
        event_id, template = entry["id"], entry["template"]
        _need(_is_int(event_id) and 0 <= event_id < vocab_size, f"{key}.id", f"an int in [0, vocab_size "
              f"{vocab_size})", event_id)
        _need(event_id > last, f"{key}.id", f"above the ID before it ({last})", event_id)
        _need(isinstance(template, str), f"{key}.template", "a string", template)
        found[event_id], last = template, event_id
    if max_clusters is None and len(found) != vocab_size:
        raise PreprocessError(f"vocab_size {vocab_size} but {len(found)} templates (without "
                              f"drain.max_clusters no template is evicted: every ID issued has one)")
    if max_clusters is not None and len(found) > max_clusters:
        raise PreprocessError(f"{len(found)} templates, above drain.max_clusters {max_clusters}")
    return found


def _check_tree(tree, templates: dict[int, str], vocab_size: int, depth: int) -> None:
    """Drain's prefix tree as _tree_to_json writes it: the root's children keyed by token count, at most
    `depth` levels, cluster IDs in [1, vocab_size], each live template under its own token count."""
    stack = [(tree, "tree", 0, None)]
    while stack:
        node, where, level, length = stack.pop()
        _need(isinstance(node, dict) and sorted(node) == ["children", "clusters"], where,
              "an object of clusters, children", node)
        clusters, children = node["clusters"], node["children"]
        _need(isinstance(clusters, list) and all(_is_int(c) and 1 <= c <= vocab_size for c in clusters),
              f"{where}.clusters", f"a list of cluster IDs in [1, vocab_size {vocab_size}]", clusters)
        _need(isinstance(children, dict), f"{where}.children", "an object", children)
        if children and level >= max(1, depth - 2):  # Drain's leaves: max_node_depth = depth - 2
            raise PreprocessError(f"'{where}' is deeper than drain.depth {depth} allows")
        if level == 0:
            _need(not clusters, "tree.clusters", "empty at the root", clusters)
            bad = [key for key in children if not (key.isdigit() and str(int(key)) == key)]
            _need(not bad, "tree.children", "keyed by token counts", bad[:1])
        if length == 0 and level == 1:
            _need(bool(clusters), f"{where}.clusters", "non-empty (the empty line's template)", clusters)
        for cluster in clusters:
            template = templates.get(cluster - 1)
            _need(template is None or len(template.split()) == length, f"{where}.clusters",
                  f"templates of {length} tokens", template)
        for key, child in children.items():
            stack.append((child, f"{where}.children[{utils.short(key)}]", level + 1,
                          int(key) if level == 0 else length))


def _check_grouping(grouping, log_format: str) -> None:
    """The grouping settings saved with a state: known keys of the `preprocess:` config section, with its
    types and ranges (utils), fields of the state's log format, a valid --window and --session-key."""
    _need(isinstance(grouping, dict), "grouping", "an object", grouping)
    unknown = [key for key in grouping if key not in GROUPING]
    if unknown:
        raise PreprocessError(f"grouping: unknown key {utils.short(unknown[0])} (known: "
                              f"{', '.join(GROUPING)})")
    try:
        config = settings_config(None, [("grouping", grouping)])
    except utils.ConfigError as error:
        raise PreprocessError(str(error)) from None
    cfg, fields = config.preprocess, format_regex(log_format).groupindex
    for key in ("time_field", "label_field"):
        _need(getattr(cfg, key) is None or getattr(cfg, key) in fields, f"grouping.{key}",
              f"null or a field of log_format ({', '.join(fields)})", getattr(cfg, key))
    if cfg.window is not None:
        Windows(cfg.window)
    if cfg.session_key is not None:
        compile_regex(cfg.session_key, "grouping.session_key")


# ----------------------------------------------------------------------------- input
def input_files(paths: list[str]) -> list[Path]:
    """The log files named: each file, and the files of each directory (sorted, hidden ones left out).
    PreprocessError where a name is missing, an empty directory, or no regular file (a FIFO, /dev/stdin
    on a pipe or a terminal, a device): its lines are read again later (the raw lines behind detections,
    through sources.json), which such a stream cannot give."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            named = sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir())
            special = next((p for p in named if p.exists() and not p.is_file()), None)
            if special is not None:   # a pipe among the logs: never skipped without a word
                raise _not_regular(special)
            found = [p for p in named if p.is_file()]
            if not found:
                raise PreprocessError(f"{path}: directory holds no file")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise _not_regular(path)
        else:
            raise PreprocessError(f"{path}: no such file or directory")
    return files


def _not_regular(path: Path) -> PreprocessError:
    return PreprocessError(f"{path} is {utils.file_kind(path)}, not a regular file: preprocess.py names "
                           f"its input files in sources.json, and detection reads them again to show the "
                           f"raw line behind each miss; write the log to a file first (e.g. ... > log.txt)")


# One line splitter for every text this module reads (logs, --labels) and for the raw lines shown later
# (RawLines): a line ends at "\n", "\r\n" or a lone "\r" (_LINE_END: Python's universal newlines), the last
# one where the data ends. So line N of a parse is line N of its provenance, whatever the line endings.
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_END_TEXT = re.compile(_LINE_END.pattern.decode())
LINE_BLOCK = 2 ** 20


def line_blocks(handle, block_bytes: int = LINE_BLOCK):
    r"""The bytes of a binary handle from where it stands, in blocks of whole lines of about `block_bytes`:
    each block ends right after a line end (a "\r" that ends a read waits for the next, which may begin with
    the "\n" of the same "\r\n"), the last one where the data ends; a longer line is a block of its own."""
    pending: list[bytes] = []  # the pieces of a line not ended yet
    while block := handle.read(block_bytes):
        cut = max(block.rfind(b"\n"), block.rfind(b"\r")) + 1
        if cut == len(block) and block.endswith(b"\r"):
            cut = max(block.rfind(b"\n", 0, cut - 1), block.rfind(b"\r", 0, cut - 1)) + 1
        if cut == 0:
            pending.append(block)
            continue
        pending.append(block[:cut] if cut < len(block) else block)
        yield b"".join(pending) if len(pending) > 1 else pending[0]
        pending = [block[cut:]] if cut < len(block) else []
    if pending:
        yield b"".join(pending)


def block_lines(block: bytes, errors: str = "replace") -> list[str]:
    """The lines of a block of whole lines (line_blocks), decoded as UTF-8 (undecodable bytes replaced, or
    with errors="strict" a UnicodeDecodeError), without their line ends."""
    text = block.decode("utf-8", errors)
    lines = _LINE_END_TEXT.split(text) if "\r" in text else text.split("\n")
    if not lines[-1]:
        lines.pop()  # what follows the last line end
    return lines


def split_lines(handle, block_bytes: int = LINE_BLOCK):
    """Every line of a binary handle from where it stands, decoded, without its line end (line_blocks,
    block_lines)."""
    for block in line_blocks(handle, block_bytes):
        yield from block_lines(block)


def read_lines(files: list[Path]):
    """(file index, 1-based line number, line) of every file in turn, streamed (split_lines): each line
    without its line end, decoded as UTF-8 with undecodable bytes replaced."""
    for index, path in enumerate(files):
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as handle:
                for number, line in enumerate(split_lines(handle), start=1):
                    yield index, number, line
        except (OSError, EOFError, zlib.error) as error:  # permissions, a corrupt or truncated .gz
            raise PreprocessError(f"{path}: unreadable: {utils.one_line(error)}") from None


LABEL_VALUES = {"normal": 0, "0": 0, "false": 0, "anomaly": 1, "abnormal": 1, "1": 1, "true": 1}


def _label_rows(path: str, handle):
    """(line number, CSV row) of a --labels file: lines split as logs are (line_blocks, block_lines), read
    as UTF-8 (a byte-order mark before the first one dropped); a line that is not UTF-8, or not CSV, is a
    PreprocessError naming the file and the line."""
    def lines():
        number = 0
        for block in line_blocks(handle):
            try:
                texts = block_lines(block, "strict")
            except UnicodeDecodeError as error:
                at, bad = error.start, block[error.start:error.start + 4]
                start = max(block.rfind(b"\n", 0, at), block.rfind(b"\r", 0, at)) + 1  # of its line
                line = number + len(_LINE_END.findall(block, 0, start)) + 1
                raise PreprocessError(f"--labels {path}: line {line} is not UTF-8 (byte {at - start + 1}: "
                                      f"{utils.excerpt(bad)}); save the CSV as UTF-8") from None
            if number == 0 and texts:
                texts[0] = texts[0].removeprefix("\ufeff")
            number += len(texts)
            yield from texts
    reader = csv.reader(lines())
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as error:
        raise PreprocessError(f"--labels {path}: line {reader.line_num}: not CSV: "
                              f"{utils.one_line(error, 100)}") from None


def _first_label(path: str, handle, session: str) -> str:
    """The first label of `session` in the --labels file and its line ("Normal on line 3"), read again
    (a line number for every session would cost memory); of a stream that cannot be read again, "another on
    an earlier line"."""
    try:
        handle.seek(0)
    except OSError:
        return "another on an earlier line"
    return next(f"{row[1].strip()} on line {number}" for number, row in _label_rows(path, handle)
                if len(row) >= 2 and row[0].strip() == session)


def read_labels(path: str) -> dict[str, int]:
    """session id -> 0/1 from a CSV of id, label (Normal/Anomaly, 0/1, true/false; any case). A first row
    whose label is none of those (BlockId,Label) is the header; blank lines are skipped. A row without a
    label, a file without labels, and a session labelled twice differently (both lines named) are a
    PreprocessError; twice alike is fine."""
    labels: dict[str, int] = {}
    try:
        with utils.open_regular(path) as handle:
            for number, row in _label_rows(path, handle):
                if not any(field.strip() for field in row):
                    continue   # a blank line
                if len(row) < 2:
                    raise PreprocessError(f"--labels {path}: line {number}: {utils.short(row[0].strip())} "
                                          f"has no label (expected id,label)")
                value = LABEL_VALUES.get(row[1].strip().lower())
                if value is None:
                    if not labels and number == 1:
                        continue  # the header
                    raise PreprocessError(f"--labels {path}: line {number}: label {utils.short(row[1])} is "
                                          f"not Normal/Anomaly/0/1")
                session = row[0].strip()
                if labels.setdefault(session, value) != value:
                    raise PreprocessError(f"--labels {path}: session {utils.short(session)} has two labels, "
                                          f"{_first_label(path, handle, session)} and {row[1].strip()} on "
                                          f"line {number}; keep one")
    except OSError as error:
        raise PreprocessError(f"--labels {path}: unreadable: {error.strerror or error}") from None
    if not labels:
        raise PreprocessError(f"--labels {path}: holds no labels (expected lines of id,label)")
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
    """Sliding or tumbling windows over line counts or times: window k covers [k*step, k*step + size) from
    the first line's position, computed from k (never summed step by step), so the arithmetic cannot stall.
    Only the lines of the current window(s) are held. At the end, one last partial window takes the lines
    no full window covered. Refused (PreprocessError): a SIZE or STEP not positive and finite (count: whole
    numbers); SIZE/STEP above MAX_OVERLAP (each line would be written in that many windows); and, as the
    lines come, a time so large that a float cannot keep SIZE or STEP apart at it (RESOLUTION)."""

    MAX_OVERLAP = 10_000  # windows one line may fall in: the output is up to that many times the input
    RESOLUTION = 2 ** -42  # a time must be exact to step * this (a float time t is exact to |t| * 2**-52)

    def __init__(self, spec: str):
        kind, _, sizes = spec.partition(":")
        try:
            numbers = [float(x) for x in sizes.split(":")] if sizes else []
            size, step = numbers[0], numbers[1] if len(numbers) == 2 else numbers[0]
            ok = kind in ("count", "time") and len(numbers) <= 2 and all(
                math.isfinite(x) and x > 0 for x in (size, step))
        except (ValueError, IndexError):
            ok = False
        if not ok or (kind == "count" and not (size.is_integer() and step.is_integer())):
            raise PreprocessError(f"--window {utils.short(spec)}: expected count:SIZE[:STEP] (lines, whole "
                                  f"numbers) or time:SIZE[:STEP] (seconds), positive and finite")
        if size / step > self.MAX_OVERLAP:
            raise PreprocessError(f"--window {utils.short(spec)}: SIZE {size:g} / STEP {step:g} is above "
                                  f"{self.MAX_OVERLAP:,}: each line would be written in that many windows; "
                                  f"take a larger STEP")
        if kind == "count":
            size, step = int(size), int(step)
        self.kind, self.size, self.step, self.spec = kind, size, step, spec
        # the largest |time| that keeps step apart; in relative times the windows are exact well beyond it
        self.max_time = min(size, step) / self.RESOLUTION
        self.lines = collections.deque()   # (position, event, ref, abnormal), position from the first line's
        self.origin = None                  # the first line's position (count or time)
        self.index = 0                      # k of the current window: the first not yet written
        self.last = None                    # the position of the line before
        self.covered = None                 # end of the last window written
        self.count = self.out_of_order = self.written = 0

    def add(self, _line: str, event: int, ref: int, abnormal: bool, when):
        if self.kind == "count":
            position = self.count
        elif -self.max_time <= when <= self.max_time:
            position = when
        else:
            raise LineError(f"--window {utils.short(self.spec)}: a time of {when:g} s is exact only to "
                                  f"{math.ulp(when):.2g} s as a float, too coarse for windows of "
                                  f"{min(self.size, self.step):g} s; take a SIZE and STEP of at least "
                                  f"{abs(when) * self.RESOLUTION:.2g} s")
        self.count += 1
        if self.origin is None:
            self.origin = position
        position -= self.origin
        if self.last is not None and position < self.last:
            self.out_of_order += 1  # kept in the current window: a clock step back must not lose lines
            position = self.last
        self.last = position
        size, step = self.size, self.step
        while position >= self.index * step + size:  # the current window is complete
            end = self.index * step + size
            if self.lines and self.lines[0][0] < end:
                yield self._window(end)
            self.index += 1
            begin = self.index * step
            while self.lines and self.lines[0][0] < begin:
                self.lines.popleft()
            if not self.lines:  # a gap: jump to the first window that ends after this line
                jump = int((position - size) // step) + 1
                if jump > self.index and (jump - 1) * step + size > position:  # (// rounded up)
                    jump -= 1
                self.index = max(self.index, jump)
        if position >= self.index * step:  # (else it falls between two windows: step > size)
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
    r"""The raw log line behind each event of a session written by preprocess.py, whose "lines" runs
    [[file index, first line, count], ...] number the lines of `files`, split as the parse split them
    (split_lines: "\n", "\r\n" or a lone "\r" ends a line). Lines are fetched a chunk at a time:
    plain files through a sparse index (the offset of every INDEX_EVERY-th line, built on first use, so memory
    is 8 bytes per INDEX_EVERY lines) and a seek; .gz files by one sequential read per chunk."""

    INDEX_EVERY = 1024

    def __init__(self, files: list[str]):
        self.files, self.indexes = [Path(f) for f in files], {}

    @classmethod
    def for_sessions(cls, path) -> RawLines | None:
        """From the sources.json that preprocess.py writes next to sessions.jsonl (of the same parse: the link
        OUTPUT/sessions.jsonl is followed to its generation); None where there is none."""
        path = Path(path).resolve()
        sources = (path if path.is_dir() else path.parent) / "sources.json"
        try:
            return cls(json.loads(sources.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def line_of(runs, position: int) -> tuple[int, int] | None:
        """(file index, line number) of the event at `position`, or None (the end of session, no
        provenance)."""
        try:
            for file_index, first, count in runs:
                if position < count:
                    return int(file_index), int(first) + position
                position -= count
        except (TypeError, ValueError):
            return None
        return None

    def fetch(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """The raw line (terminator dropped, undecodable bytes replaced) of each (file index, line number)
        wanted; lines split as the parse split them (split_lines). A file gone, unreadable or no longer a
        regular file (it would block) gives none of its lines."""
        found: dict[tuple[int, int], str] = {}
        by_file: dict[int, list[int]] = {}
        for file_index, line in wanted:
            if 0 <= file_index < len(self.files) and line >= 1:
                by_file.setdefault(file_index, []).append(line)
        for file_index, lines in by_file.items():
            try:
                if not self.files[file_index].is_file():
                    continue
                found.update({(file_index, n): text
                              for n, text in self._read(self.files[file_index], sorted(lines))})
            except (OSError, EOFError, zlib.error):
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
                handle.seek(index[block])
                yield from self._scan(handle, block * self.INDEX_EVERY + 1, [line], 2 ** 16)

    @staticmethod
    def _scan(handle, first: int, lines: list[int], block_bytes: int = LINE_BLOCK):
        """(number, text) of the `lines` wanted (ascending), reading from line number `first` on."""
        wanted = iter(lines)
        target = next(wanted, None)
        for number, text in enumerate(split_lines(handle, block_bytes), start=first):
            while target is not None and target < number:
                target = next(wanted, None)
            if target is None:
                return
            if number == target:
                yield number, text
                target = next(wanted, None)

    def _index(self, file: Path) -> array.array:
        """The byte offset of line k * INDEX_EVERY + 1, for each k the file reaches (lines as line_blocks
        and _LINE_END split them)."""
        offsets, lines, position = array.array("q", [0]), 0, 0
        with open(file, "rb") as handle:
            for block in line_blocks(handle):
                ends = [match.end() for match in _LINE_END.finditer(block)]
                first = (-lines - 1) % self.INDEX_EVERY  # the end of line k * INDEX_EVERY among them
                offsets.extend(position + end for end in ends[first::self.INDEX_EVERY])
                lines, position = lines + len(ends), position + len(block)
        return offsets

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


def make_grouper(cfg: PreprocessConfig, parser: Parser,
                 parse_only: bool = False) -> Sessions | Windows | None:
    """The grouper the settings ask for; None for a parse-only run (`parse_only` allowed and neither
    --session-key nor --window given)."""
    fields = parser.regex.groupindex
    for flag, name in (("--label-field", cfg.label_field), ("--time-field", cfg.time_field)):
        if name is not None and name not in fields:
            raise PreprocessError(f"{flag} {utils.short(name)}: not a field of the log format "
                                  f"({utils.short_text(', '.join(fields))})")
    if cfg.session_key is not None and cfg.window is not None or \
            cfg.session_key is None and cfg.window is None and not parse_only:
        raise PreprocessError("give either --session-key REGEX or --window count:SIZE[:STEP] / "
                              "time:SIZE[:STEP]")
    if cfg.session_key is not None:
        return Sessions(UserRegex(compile_regex(cfg.session_key, "--session-key"), "--session-key"),
                        cfg.max_open_sessions, cfg.session_idle)
    if cfg.window is None:  # parse only: settings that only grouping reads would be silently ignored
        given = [flag for flag, value in (("--labels", cfg.labels), ("--label-field", cfg.label_field),
                                          ("--time-field", cfg.time_field),
                                          ("--session-idle", cfg.session_idle)) if value is not None]
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
    return PreprocessError(f"no line {'of the first %d ' % lines if lines >= FAIL_FAST_LINES else ''}"
                           f"matches --log-format {utils.short(log_format)} (first lines: {shown}). The "
                           f"text between fields is a regular expression, as in loghub: write \\[ \\( \\. "
                           f"\\| \\? for the characters")


def no_group_error(cfg: PreprocessConfig, first_parsed: str, first_bad_time: str, all_bad_time: bool):
    """Lines parsed but the grouping made nothing of them: the setting that matched no line (--time-field
    where every parsed line's time was unreadable, else --session-key), with a sample line."""
    if cfg.session_key is not None and not all_bad_time:
        return PreprocessError(f"--session-key {utils.short(cfg.session_key)} matches no line, so there is "
                               f"no session (it is searched in each whole line; the first: {first_parsed})")
    how = f"with --time-format {utils.short(cfg.time_format)}" if cfg.time_format else \
        "as epoch seconds (no --time-format given)"
    return PreprocessError(f"--time-field {utils.short_text(cfg.time_field, 80)} holds no time readable "
                           f"{how}, so there is no {'session' if cfg.session_key else 'window'} (the first: "
                           f"{first_bad_time})")


def _sample(files: list[Path], file_index: int, number: int, line: str) -> str:
    """A log line for a message: where it is and its start."""
    return f"{files[file_index]}:{number}: {utils.short_text(line, 120)}"


def _line_time(cfg: PreprocessConfig, match: re.Match) -> float:
    """The line's --time-field in seconds (--time-format read as UTC, else epoch seconds); ValueError where
    it is unreadable or not finite."""
    value = match.group(cfg.time_field) or ""
    when = datetime.strptime(value, cfg.time_format).replace(tzinfo=timezone.utc).timestamp() \
        if cfg.time_format else float(value)
    if not math.isfinite(when):
        raise ValueError("not a finite number")
    return when


def iter_log_sessions(cfg: PreprocessConfig, parser: Parser, files: list[Path], stats: dict,
                      labels: dict | None = None, rows=None, parse_only: bool = False,
                      require_match: bool = False):
    """Sessions as sessions.jsonl holds them (dicts), streamed from raw log files (none in a parse-only
    run); counts go into `stats`, and one CSV row per input line (LineId, EventId, the fields) into `rows`
    when given. PreprocessError once FAIL_FAST_LINES lines came and none matched the log format (or at the
    end, with `require_match`); where lines parsed but the grouping made no session of them (no_group_error);
    where a user regex runs past its budget on a line (the watchdog, armed while this runs)."""
    grouper = make_grouper(cfg, parser, parse_only)
    names, first_lines, first_parsed, first_bad_time = list(parser.regex.groupindex), [], "", ""
    writer = csv.writer(rows) if rows else None
    produced = 0

    def finished(groups):
        nonlocal produced
        for session_id, events, refs, abnormal in groups:
            label = labels.get(session_id, 0) if labels is not None else int(abnormal)
            produced += 1
            stats["sessions"] += 1
            stats["abnormal"] += label
            stats["unlabelled"] += labels is not None and session_id not in labels
            yield {"session_id": session_id, "event_ids": list(events), "label": label,
                   "lines": line_runs(refs)}

    with _WATCHDOG:
        for file_index, number, line in read_lines(files):
            try:
                stats["lines"] += 1
                match = parser.match(line)
                if match is None:
                    stats["unmatched"] += 1
                    if len(first_lines) < 3:
                        first_lines.append(_sample(files, file_index, number, line))
                        stats["first_unmatched"] = first_lines[0]
                    if stats["parsed"] == 0 and stats["lines"] >= FAIL_FAST_LINES:
                        raise no_match_error(parser.log_format, first_lines, stats["lines"])
                    if writer:
                        writer.writerow([stats["lines"], ""])
                    continue
                # a field in an optional group (loghub's (\[<PID>\])?) is None where absent: read as ""
                event = parser.parse(match.group("Content") or "")
                stats["parsed"] += 1
                stats["unknown"] += event >= parser.vocab_size
                first_parsed = first_parsed or _sample(files, file_index, number, line)
                if writer:
                    writer.writerow([stats["lines"], event, *(match.group(name) or "" for name in names)])
                if grouper is None:
                    continue
                when = None
                if cfg.time_field:
                    try:
                        when = _line_time(cfg, match)
                    except ValueError as error:
                        stats["bad_time"] += 1
                        first_bad_time = first_bad_time or (f"{utils.short(match.group(cfg.time_field))}, "
                                                            f"{utils.one_line(error, 80)}, on "
                                                            f"{_sample(files, file_index, number, line)}")
                        continue
                abnormal = cfg.label_field is not None and \
                    (match.group(cfg.label_field) or "") != cfg.normal_value
                yield from finished(grouper.add(line, event, file_index << 40 | number, abnormal, when))
            except PatternTimeout as error:
                raise timeout_error(error, f"{files[file_index]}:{number}") from None
            except LineError as error:
                raise PreprocessError(f"{error} (at {_sample(files, file_index, number, line)})") from None
    if require_match and stats["parsed"] == 0:
        raise no_match_error(parser.log_format, first_lines, stats["lines"])
    if grouper is None:
        return
    yield from finished(grouper.close())
    if produced == 0 and first_parsed:
        raise no_group_error(cfg, first_parsed, first_bad_time, stats["bad_time"] >= stats["parsed"])
    stats.update(**({"lines_without_key": grouper.no_key, "sessions_closed_idle": grouper.closed_idle,
                     "sessions_closed_early": grouper.closed_early}
                    if isinstance(grouper, Sessions) else {"out_of_order": grouper.out_of_order}))


def sessions_from_logs(state_path: str, inputs: list[str], stats: dict | None = None, **settings):
    """For detection on raw logs: sessions (dicts as in sessions.jsonl) through a saved parser state, with
    the grouping it was saved with unless `settings` (PreprocessConfig fields) say otherwise. Streamed."""
    state = load_state(state_path)
    try:
        cfg = settings_config(None, [("parser state grouping", state.get("grouping", {})),
                                     ("settings", settings)]).preprocess
    except utils.ConfigError as error:
        raise PreprocessError(str(error)) from None
    stats = stats if stats is not None else new_stats()
    return iter_log_sessions(cfg, Parser(cfg, state), input_files(inputs), stats)


def new_stats() -> dict:
    return collections.defaultdict(int, lines=0, parsed=0, unmatched=0, bad_time=0, unknown=0, sessions=0,
                                   abnormal=0, first_unmatched="")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def preprocess(cfg: PreprocessConfig, inputs: list[str], output: Path, state: dict | None = None,
               structured: str | None = None, config: Config | None = None) -> dict:
    """Parse and group `inputs` into `output`, holding its lock: every file goes into a new generation
    folder, switched in at the end (the module docstring says how), so `output` shows this parse whole or
    the previous one. Without --session-key or --window it only parses: templates, parser state, sources
    and the --structured CSV, no sessions.jsonl or config.yaml (there is nothing to train on). `config`:
    the one config whose other sections go into config.yaml (default: utils' defaults)."""
    parser = Parser(cfg, state)
    parse_only = make_grouper(cfg, parser, parse_only=True) is None  # settings checked before any work
    labels = read_labels(cfg.labels) if cfg.labels else None
    files = input_files(inputs)
    inside = structured_name(output, structured)
    lock = lock_output(output)
    try:
        remove_leftovers(output)
        adopt_plain_files(output)
        place = new_generation(output)
        try:
            stats = write_parse(place, output, cfg, parser, files, labels, parse_only,
                                (structured, inside), config or Config())
            switch_to(output, place)
        except BaseException as error:
            switched = _current(output) == place.name
            if not switched:  # the previous parse stays
                shutil.rmtree(place, ignore_errors=True)
            if isinstance(error, OSError):
                raise _name_for_user(error, place, output, structured) from None
            if isinstance(error, utils.Stopped):
                shows = "this parse, whole" if switched else "the previous parse as it was (if there was one)"
                done = "finished" if switched else "did not finish"
                raise utils.Interrupted(f"{error}: the parse {done}: {output} shows {shows}",
                                        utils.signal_exit_code(str(error))) from None
            raise
        remove_leftovers(output)
    finally:
        lock.release()
    return stats


def write_parse(place: Path, output: Path, cfg: PreprocessConfig, parser: Parser, files: list[Path],
                labels: dict | None, parse_only: bool, structured: tuple, config: Config) -> dict:
    """Every output of one parse, written into the generation folder `place` (and a --structured CSV outside
    `output` to its own path); the stats."""
    stats, started = new_stats(), time.perf_counter()
    stats["start_rss_mb"] = peak_rss_mb()
    rows_path = place / ".rows.csv" if structured[0] else None
    opened = open(rows_path, "w", newline="", encoding="utf-8") if rows_path else contextlib.nullcontext()
    with opened as rows:
        sessions = iter_log_sessions(cfg, parser, files, stats, labels, rows, parse_only, True)
        if parse_only:
            collections.deque(sessions, maxlen=0)  # the rows are the output
        else:
            def write_sessions(handle):
                for session in sessions:
                    handle.write(json.dumps(session, separators=(",", ":")) + "\n")
            utils.atomic_write(place / "sessions.jsonl", _as_text(write_sessions))
    if labels is not None and stats["sessions"] and stats["unlabelled"] == stats["sessions"]:
        example = next(iter(labels))
        raise PreprocessError(f"--labels {cfg.labels}: none of its {len(labels):,} ids is one of the "
                              f"{stats['sessions']:,} sessions' (its first: {utils.short(example)}; session "
                              f"ids come from --session-key): nothing written")
    if rows_path:
        target = place / structured[1] if structured[1] else Path(structured[0])
        write_structured(rows_path, target, parser)
        rows_path.unlink()
    elapsed = time.perf_counter() - started
    stats.update(templates=parser.vocab_size, seconds=round(elapsed, 3), peak_rss_mb=peak_rss_mb(),
                 lines_per_s=round(stats["lines"] / max(elapsed, 1e-9)))
    if parse_only:
        stats["parse_only"] = True
    utils.save_json(place / "templates.json", parser.table())
    grouping = {k: getattr(cfg, k) for k in GROUPING}
    utils.save_json(place / "parser_state.json", {**parser.state(), "grouping": grouping})
    utils.save_json(place / "sources.json", {"files": [str(f.resolve()) for f in files],
                                             "stats": dict(stats)})
    if parser.learning and not parse_only:  # data with unknown IDs (>= vocab_size) is for detection only
        write_train_config(config, place, output, parser.vocab_size)
    return dict(stats)


class _Utf8:
    """A text face on a binary handle (utils.atomic_write's), no buffer of its own: a failed write (a full
    disk) raises where it happens, once."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text: str) -> int:
        return self.handle.write(text.encode())


def _as_text(write):
    """utils.atomic_write's writer (a binary handle) for a `write` that writes text (UTF-8)."""
    return lambda handle: write(_Utf8(handle))


def _name_for_user(error: OSError, place: Path, output: Path, structured: str | None) -> OSError:
    """A failed write names the file as the user knows it (OUTPUT/sessions.jsonl), not its generation; one
    that names no file (a write of the structured rows) names --structured."""
    name = str(error.filename or structured or "")
    if name.startswith(str(place) + os.sep):
        name = str(output / Path(name).name)
    return OSError(error.errno, error.strerror or str(error), name or None)


def write_structured(rows_path: Path, target: Path, parser: Parser) -> None:
    """loghub's *_structured.csv columns: LineId, the log format's fields (Content among them), EventId,
    EventTemplate, with each template as it stands at the end (Drain's templates change while it learns, so
    the rows are written from the IDs once the parse is done). A line the format does not match has only its
    LineId. Written atomically."""
    names = list(parser.regex.groupindex)

    def write(handle):
        templates = {}
        writer = csv.writer(handle)
        writer.writerow(["LineId", *names, "EventId", "EventTemplate"])
        with open(rows_path, newline="", encoding="utf-8") as rows:
            for line_id, event, *values in csv.reader(rows):
                if event and event not in templates:
                    templates[event] = parser.template(int(event)) if int(event) < parser.vocab_size \
                        else "<unknown>"
                writer.writerow([line_id, *(values or [""] * len(names)), event, templates.get(event, "")])
    utils.atomic_write(target, _as_text(write))


def write_train_config(config: Config, place: Path, output: Path, vocab_size: int) -> None:
    """The one config (the --config values, the resolved `preprocess:` section among them) with this data:
    model.vocab_size, and data.preprocessed_dir and training.output_dir as absolute paths through `output`'s
    fixed names (symlinks not resolved: they name the current parse, whichever it is)."""
    base = os.path.abspath(output)
    for dotted, value in (("model.vocab_size", vocab_size),
                          ("data.preprocessed_dir", os.path.join(base, "sessions.jsonl")),
                          ("training.output_dir", os.path.join(base, "train"))):
        set_value(config, dotted, value, "preprocess.py")
    check_values(config)
    save_config(config, place / "config.yaml")


# ----------------------------------------------------------------------------- the output folder
# OUTPUT/.parse-<time>-<random>/   one generation: every file of one parse (the structured CSV too, when
#                                  --structured names a file directly in OUTPUT)
# OUTPUT/current -> .parse-...     the generation shown; switched with one atomic rename
# OUTPUT/sessions.jsonl -> current/sessions.jsonl, and so on for each file: the names users know
# OUTPUT/.lock                     utils.OutputLock: one preprocess.py at a time
OUTPUT_FILES = ("sessions.jsonl", "sources.json", "templates.json", "parser_state.json", "config.yaml")
LOGGER = logging.getLogger("preprocess")


def lock_output(output: Path) -> utils.OutputLock:
    return utils.OutputLock(output, LOGGER, flag="--output")


def structured_name(output: Path, structured: str | None) -> str | None:
    """The name of --structured inside a generation when it names a file directly in `output` (so it is
    switched in with the rest); None where it lies elsewhere (then written to its path, atomically)."""
    if structured is None or Path(os.path.abspath(structured)).parent != Path(os.path.abspath(output)):
        return None
    name = Path(structured).name
    if name in OUTPUT_FILES or name == "current" or name.startswith("."):
        raise PreprocessError(f"--structured {structured}: a name preprocess.py keeps for itself in --output")
    return name


def _current(output: Path) -> str | None:
    """The generation `output/current` names, or None."""
    try:
        return os.readlink(output / "current")
    except OSError:
        return None


def _link(path: Path, target: str) -> None:
    """`path` becomes a symlink to `target` in one atomic rename, whatever stood there."""
    temp = path.with_name(f".{path.name}.link.tmp")  # (utils.remove_stale_temp_files removes a leftover)
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, path)



def new_generation(output: Path) -> Path:
    place = Path(tempfile.mkdtemp(dir=output, prefix=f".parse-{time.strftime('%Y%m%d-%H%M%S')}-"))
    os.chmod(place, 0o777 & ~utils.UMASK)  # mkdtemp makes 0700: follow the umask, as every file does
    return place


def switch_to(output: Path, place: Path) -> None:
    """Show generation `place`: first a fixed link OUTPUT/NAME -> current/NAME for each of its files (one
    the shown generation lacks dangles until the switch), then `current` replaced in one atomic rename."""
    for name in sorted(p.name for p in place.iterdir() if not p.name.startswith(".")):
        link = output / name
        if not (link.is_symlink() and os.readlink(link) == f"current/{name}"):
            _link(link, f"current/{name}")
    utils.fsync_directory(place)
    _link(output / "current", place.name)
    utils.fsync_directory(output)


def remove_leftovers(output: Path) -> None:
    """Under the lock: generations not shown (the previous one, or a killed run's), the fixed links to a
    name the shown generation lacks (sessions.jsonl after a parse-only run), temp links."""
    shown = _current(output)
    for entry in output.iterdir():
        if entry.name.startswith(".parse-") and entry.name != shown and not entry.is_symlink():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif entry.is_symlink() and os.readlink(entry) == f"current/{entry.name}" and not entry.exists():
            entry.unlink()
    utils.remove_stale_temp_files(output)


def adopt_plain_files(output: Path) -> None:
    """Plain files under the names users know (a folder written before generations, or a config.yaml an
    editor saved by rename in place of its link) become a generation: what the folder shows (those files
    and the shown generation's others) hard-linked (or copied) into a new one, shown as `current`, then each
    plain name replaced by its link: the same bytes at every moment, and the next switch replaces that
    parse whole. Plain files that already are the shown generation's (an adoption interrupted) are only
    replaced by their links."""
    shown = output / "current"
    if shown.exists() and not shown.is_symlink():
        raise PreprocessError(f"{shown}: not preprocess.py's link to its parse; move it away")
    plain = [name for name in OUTPUT_FILES if (output / name).is_file() and not (output / name).is_symlink()]
    if not plain:
        return
    if not all((shown / name).exists() and os.path.samefile(output / name, shown / name) for name in plain):
        linked = [entry.name for entry in output.iterdir() if entry.is_symlink() and entry.exists()
                  and os.readlink(entry) == f"current/{entry.name}"]
        place = new_generation(output)
        for name in plain + linked:
            try:
                os.link((output / name).resolve(), place / name)  # (a link's target: os.link keeps links)
            except OSError:  # a file system without hard links
                shutil.copy2(output / name, place / name)
        utils.fsync_directory(place)
        _link(shown, place.name)
    for name in plain:
        _link(output / name, f"current/{name}")
    utils.fsync_directory(output)


# ----------------------------------------------------------------------------- settings and the CLI
def settings_config(base_config: str | None, layers: list[tuple[str, dict]]) -> Config:
    """The one config (utils): its defaults < the YAML file `base_config` (every section checked, the
    `preprocess:` one among them) < each (source, {preprocess key: value}) layer in turn; then every value
    checked (check_values). A None of the command line means "not given"; elsewhere it is a value."""
    config = load_config(base_config) if base_config else Config()
    for source, values in layers:
        for key, value in values.items():
            if value is not None or source != "command line":
                set_value(config, f"preprocess.{key}", value, source)
    check_values(config)
    return config


def resolve_config(base_config: str | None, flags: dict, state_grouping: dict | None = None) -> Config:
    """Defaults < the YAML's `preprocess:` section < the grouping saved in a parser state < flags given."""
    return settings_config(base_config, [("parser state grouping", state_grouping or {}),
                                         ("command line", flags)])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", help="raw log files or directories of them (plain or .gz)")
    add("--output", required=True, help="directory for sessions.jsonl, templates.json, parser_state.json, "
        "...; one run at a time, each shown whole once complete")
    add("--config", default="config.yaml", help="YAML whose `preprocess:` section gives defaults and whose "
        "other sections are copied into OUTPUT/config.yaml (default: config.yaml, if present)")
    add("--log-format", help="loghub's line layout, e.g. '<Date> <Time> <Level> \\[<Process>\\] "
        "<Component>: <Content>': text between fields is a regex, a run of spaces any whitespace (default: "
        "the whole line is the content)")
    add("--mask", action="append", dest="masks", help="regex of a variable part, replaced by <*> before "
        "Drain; repeatable (replaces the config's list), applied in order before the default masks")
    add("--no-default-masks", action="store_false", dest="default_masks", default=None,
        help="do not apply the built-in masks (IP:port, UUID, hex, long hex ids, paths, block-like ids, "
        "numbers)")
    add("--similarity", type=float, help="Drain similarity threshold sim_th in [0, 1] (default 0.45)")
    add("--depth", type=int, help="Drain prefix-tree depth, >= 3 (default 4)")
    add("--max-templates", type=int, help="cap on templates held (drain3 max_clusters, least recently used "
        "evicted; an evicted template seen again gets a new ID); default: no cap")
    add("--parser-state", help="parser_state.json of an earlier run: match lines onto its event IDs, learn "
        "nothing (unmatched lines get ID vocab_size); log format, masks and Drain settings come from it, and "
        "the grouping unless given")
    add("--session-key", help=r"regex of session identifiers, e.g. 'blk_-?\d+' (a line naming several "
        "joins each)")
    add("--window", help="count:SIZE[:STEP] (lines) or time:SIZE[:STEP] (seconds; needs --time-field)")
    add("--time-field", help="log-format field holding each line's time (default format: epoch seconds)")
    add("--time-format", help="strptime format of --time-field, e.g. '%%Y-%%m-%%d-%%H.%%M.%%S.%%f' (read "
        "as UTC)")
    add("--labels", help="CSV of session id, label (Normal/Anomaly or 0/1), such as HDFS's anomaly_label.csv")
    add("--label-field", help="log-format field labelling each line; a session or window with any line "
        "whose value is not --normal-value is abnormal")
    add("--normal-value", help="value of --label-field on normal lines (default '-', as in BGL)")
    add("--session-idle", type=int, help="a session not named for this many input lines is complete and "
        "written, which keeps memory flat on endless logs (default: sessions end with the input)")
    add("--max-open-sessions", type=int, help="open sessions held at most; then the least recently active "
        "is written early (default 1000000)")
    add("--structured", help="also write this CSV: one row per input line, LineId (1-based, counted over "
        "all inputs), the log format's fields, EventId, EventTemplate (without --session-key or --window: "
        "parse only)")
    return parser.parse_args(argv)


def main(argv=None):
    utils.StopSignal(raise_now=True)   # before any work: a stop at any moment is one line, never a silence
    args = parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in PreprocessConfig.__dataclass_fields__}

    def run():
        base = args.config if (args.config != "config.yaml" or Path(args.config).exists()) else None
        state = None
        if args.parser_state:
            parser_keys = ("log_format", "masks", "default_masks", "similarity", "depth", "max_templates")
            given = [k for k in parser_keys if flags[k] is not None]
            if given:
                raise PreprocessError(f"--parser-state fixes the parser: drop --{given[0].replace('_', '-')}")
            state = load_state(args.parser_state)
        config = resolve_config(base, flags, state and state.get("grouping"))
        stats = preprocess(config.preprocess, args.inputs, Path(args.output), state, args.structured, config)
        print(f"{stats['lines']} lines: {stats['parsed']} parsed, {stats['unmatched']} not matching the log "
              f"format{', %d of unknown events' % stats['unknown'] if args.parser_state else ''}; "
              f"{stats['templates']} templates (vocab_size); "
              + ("parsed only (no --session-key or --window): no sessions.jsonl or config.yaml written"
                 if stats.get("parse_only") else
                 f"{stats['sessions']} sessions, {stats['abnormal']} abnormal")
              + f"; {stats['lines_per_s']:,} lines/s. Output in {args.output}")
        for key, what in (("sessions_closed_early", "sessions written early (raise --max-open-sessions)"),
                          ("unlabelled", "sessions missing from --labels (labelled normal)"),
                          ("bad_time", "lines with an unreadable --time-field (left out)"),
                          ("out_of_order", "lines earlier than the line before (kept in the current "
                                           "window)")):
            if stats.get(key):
                print(f"warning: {stats[key]} {what}", file=sys.stderr)

    utils.exit_on_user_error(run)


if __name__ == "__main__":
    main()
