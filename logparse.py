"""Raw log lines to events, for preprocess.py (a whole parse) and live detection (detect.py --follow): the log
format as a regex, masks, user regexes on a CPU budget, the Drain parser and its state as plain JSON
(validated where loaded; never drain3's jsonpickle), lines split in blocks, and per line what grouping needs
(LineEvents) and windows fed line by line. Nothing needs torch.

Examples:

    from logparse import LineEvents, Parser, grouping_config, load_state
    state = load_state("outputs/parsed/parser_state.json")
    cfg = grouping_config(state)   # the grouping saved with it
    lines = LineEvents(cfg, Parser(cfg, state))
    print(lines.read("081109 203615 148 INFO dfs.DataNode: Receiving block blk_1"))  # (0, event, ('blk_1',))
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import re
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

from drain3 import TemplateMiner
from drain3.drain import LogCluster, Node
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

import utils
from config import MAX_VALUES, PreprocessConfig, settings_config

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


# The settings that group lines, saved in the parser state (so detection groups new logs the same way)
GROUPING = ("session_key", "session_idle", "window", "time_field", "time_format", "label_field",
            "normal_value", "values")


def line_values(content: str) -> list[float]:
    """The numeric parameters of a line's content, in order, at most MAX_VALUES: each word that is a finite
    number (an integer, a decimal, an exponent; a comma, semicolon or full stop after it allowed), never a
    part of an identifier, an address, a path, a date or a time of day (blk_-42, 10.0.0.1:80, HTTP/1.1,
    2017-05-16, 12:30:00). Word by word rather than one regex: twice as fast, and parsing speed matters."""
    found = []
    for word in content.split():
        if not (word[0].isdigit() or word[0] == "-"):
            continue
        if word[-1] in ",;.":
            word = word[:-1]
        try:
            value = float(word)
        except ValueError:
            continue
        if math.isfinite(value) and "_" not in word:
            found.append(value)
            if len(found) == MAX_VALUES:
                break
    return found


class PreprocessError(utils.UserError):
    """Bad input or settings; the message says which."""


class LineError(PreprocessError):
    """A PreprocessError about the log line being grouped; the parse adds which line it is."""


# ----------------------------------------------------------------------------- user regexes, on a budget
# A user's regex (--mask, --session-key, --log-format's text) can backtrack without end on a line it does not
# fit ((a+)+$ on 40 a's and a b takes days). Each call has a budget, REGEX_BUDGET_S, enforced by a SIGALRM
# watchdog (the stdlib matcher checks signals while it backtracks; the `regex` package's timeout= costs a
# sixth of the parse, RE2 refuses lookarounds). Calls each slower than one tick add up too: past SLOW_BUDGET_S
# of them (main-thread CPU time) within SLOW_WINDOW_S the run stops. Built-in masks are linear: no watchdog.
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
    """While armed (a `with` block in the main thread; they nest) SIGALRM ticks every _TICK_S; a tick that
    finds the same UserRegex call (serial number) running REGEX_BUDGET_S after it first saw it raises
    PatternTimeout inside it. Where it cannot arm (not the main thread, the alarm in use) no budget."""

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


WATCHDOG = _Watchdog()


class UserRegex:
    """A compiled user regex whose calls run on the watchdog's budget, named `flag` `shown` in messages.
    findall gives each match's first capture group where the regex has one (the whole match where that
    group took no part or matched nothing), else the whole matches: `sshd\\[(\\d+)\\]` finds "24200"."""

    __slots__ = ("regex", "flag", "shown", "_all")

    def __init__(self, regex: re.Pattern, flag: str, shown: str | None = None):
        self.regex, self.flag, self.shown = regex, flag, regex.pattern if shown is None else shown
        # re's findall gives the whole matches where the regex has no groups (one C call, no match objects)
        self._all = regex.findall if not regex.groups else \
            lambda text: [m.group(1) or m.group(0) for m in regex.finditer(text)]

    @property
    def pattern(self) -> str:
        return self.regex.pattern

    def _run(self, call, *args):
        watch = WATCHDOG
        watch.serial += 1
        watch.running = self
        try:
            return call(*args)
        finally:
            watch.running = None

    def match(self, text: str):
        return self._run(self.regex.match, text)

    def sub(self, replacement: str, text: str) -> str:
        return self._run(self.regex.sub, replacement, text)

    def findall(self, text: str) -> list[str]:
        return self._run(self._all, text)


def timeout_error(error: PatternTimeout, where: str) -> PreprocessError:
    """The one line for a user regex stopped by the watchdog on the log line `where` (file:line)."""
    took = f"no result after {REGEX_BUDGET_S:g} s on {where}" if error.slow_s is None else \
        f"{error.slow_s:.1f} s in calls of over {_TICK_S:g} s each on one line within {SLOW_WINDOW_S:g} s " \
        f"(the last on {where})"
    return PreprocessError(f"{error.flag} {utils.short(error.pattern)}: {took}, so the run stops: a pattern "
                           "whose repeats nest or overlap, such as (a+)+ or (a|aa)*, backtracks exponentially"
                           " on a line it almost fits; write each repeat once (a+ for (a+)+)")


# ----------------------------------------------------------------------------- parsing
# Log formats are loghub's: <Field> placeholders, the text between them a regex where a run of spaces matches
# any whitespace, matched on the stripped line. loghub's lazy `.*?` fields backtrack without bound on a line
# that does not fit; here a field other than Content ends where the fixed text after it first matches, in an
# atomic group (about one pass a line). Content stays lazy, as does a field with no fixed text after it.
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
    """What may come right after a field that the group opening `rest` follows, as a regex: the group's
    leading text, and if the group is optional the text after it; None where that is no fixed text."""
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
BUILT_IN_MASKS = ("|".join(f"(?:{m})" for m in DEFAULT_MASKS[:-1]), DEFAULT_MASKS[-1])


def make_miner(drain: dict, masks: list[str], flag: str = "--mask") -> TemplateMiner:
    """drain3's TemplateMiner with these settings and masks, the user's on the watchdog's budget (`flag`)."""
    config = TemplateMinerConfig()  # in code: no drain3.ini is read
    config.drain_sim_th, config.drain_depth = drain["sim_th"], drain["depth"]
    config.drain_max_children, config.drain_max_clusters = drain["max_children"], drain["max_clusters"]
    config.masking_instructions = []
    for mask in masks:
        instruction = MaskingInstruction(compile_regex(mask, flag).pattern, "*")
        if mask not in BUILT_IN_MASKS:
            instruction.regex = UserRegex(instruction.regex, flag)  # what its mask() calls .sub on
        config.masking_instructions.append(instruction)
    return TemplateMiner(config=config)


# Parser's memos, a word's masked form (fast_masker) and (matching only) a masked content's event ID: values
# that never repeat fill them, so each is emptied when full; what repeats (a template's words) comes back.
MEMO_ENTRIES = 1 << 14


def fast_masker(masker):
    """drain3's masker.mask, the same result, faster: the built-in alternation (BUILT_IN_MASKS[0]) word by
    word, each word's result remembered (no part of it matches a space, and its look-arounds read a space as
    the text's edge, so the words' results joined are the text's; tests/test_detect.py checks it). Other
    masks are applied as drain3 applies them."""
    prefix, suffix = masker.mask_prefix, masker.mask_suffix
    words: dict[str, str] = {}
    steps = []
    for instruction in masker.masking_instructions:
        if instruction.regex.pattern == BUILT_IN_MASKS[0]:
            steps.append((instruction.regex.sub, prefix + instruction.mask_with + suffix))
        else:
            steps.append((instruction, None))

    def by_word(sub, replacement: str, text: str) -> str:
        if len(words) >= MEMO_ENTRIES:
            words.clear()
        out = []
        for word in text.split(" "):
            masked = words.get(word)
            if masked is None:
                # ASCII digits alone are one number (or long hex) whole: the alternation's result without
                # running it, and not remembered (sizes, counters: they rarely repeat)
                if word.isdecimal() and word.isascii():
                    masked = replacement
                else:
                    masked = words[word] = sub(replacement, word)
            out.append(masked)
        return " ".join(out)

    def mask(text: str) -> str:
        for step, replacement in steps:
            text = by_word(step, replacement, text) if replacement is not None else \
                step.mask(text, prefix, suffix)
        return text

    return mask


def _tree_to_json(node: Node) -> dict:
    return {"clusters": list(node.cluster_ids), "children": {k: _tree_to_json(c) for k, c in
                                                             node.key_to_child_node.items()}}


def _tree_from_json(data: dict) -> Node:
    node = Node()
    node.cluster_ids = list(data["clusters"])
    node.key_to_child_node = {k: _tree_from_json(c) for k, c in data["children"].items()}
    return node


class Parser:
    """Drain3 with dense event IDs (ID = drain3's cluster ID - 1). Learning (state None) creates templates.
    From a saved state it matches; a line matching no template gets the unknown ID vocab_size, or, with
    learn_new (preprocess.py: new message types after a deployment), a template of its own with the next ID,
    which the parser's new state keeps and a model learns by feedback. Calls drain3's Drain directly
    (TemplateMiner's calls add a profiler's work to every line)."""

    def __init__(self, cfg: PreprocessConfig, state: dict | None = None, learn_new: bool = False):
        self.learning = state is None
        self.learn_new = learn_new and not self.learning
        self.known_vocab = 0 if state is None else state["vocab_size"]   # IDs the state had
        if state is None:
            # the default masks as one alternation: one scan of the line instead of one per mask (faster,
            # same result: each alternative starts where no earlier one could)
            masks = list(cfg.masks) + (list(BUILT_IN_MASKS) if cfg.default_masks else [])
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
        self.counts = [0] * (state.get("vocab_size", 0) + (not self.learning))   # (matching: unknown's too)
        for event_id, template in self.templates.items():
            drain.id_to_cluster[event_id + 1] = LogCluster(template.split(), event_id + 1)
        drain.clusters_counter = state.get("vocab_size", 0)
        if state["tree"] is not None:  # the very tree Drain grew, so matching behaves exactly as it did
            drain.root_node = _tree_from_json(state["tree"])
        self._drain, self._mask = drain, fast_masker(self.miner.masker)
        self._event_of: dict[str, int] = {}   # (matching) masked content -> event ID: the tree walked once

    def match(self, line: str) -> re.Match | None:
        """The log format's fields of a line, matched as loghub does: on the line stripped of whitespace."""
        return self._format.match(line.strip())

    @property
    def vocab_size(self) -> int:
        return self.miner.drain.clusters_counter  # IDs issued, evicted templates' included

    def parse(self, content: str) -> int:
        """The event ID of a line's Content: learning, of the template it joins or creates; else of the
        template it matches (as TemplateMiner.match with full_search_strategy="fallback") or vocab_size."""
        masked = self._mask(content)
        if self.learning:
            cluster, change = self._drain.add_log_message(masked)
            event_id = cluster.cluster_id - 1
            if change != "none":
                self.templates[event_id] = cluster.get_template()
                if event_id == len(self.counts):
                    self.counts.append(0)
        else:
            event_id = self._event_of.get(masked)
            if event_id is None:
                cluster = self._drain.match(masked, full_search_strategy="fallback")
                if cluster is None and self.learn_new:
                    cluster, _ = self._drain.add_log_message(masked)
                    self.templates[cluster.cluster_id - 1] = cluster.get_template()
                    self.counts += [0] * (self.vocab_size + 1 - len(self.counts))
                event_id = self.vocab_size if cluster is None else cluster.cluster_id - 1
                if len(self._event_of) >= MEMO_ENTRIES:
                    self._event_of.clear()
                self._event_of[masked] = event_id
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
# Every key is checked where the file is read: a damaged state is one PreprocessError naming the file and
# the key, never a traceback or IDs silently shifted.
STATE_KEYS = ("format", "version", "log_format", "masks", "drain", "vocab_size", "templates", "tree")
DRAIN_KEYS = ("sim_th", "depth", "max_children", "max_clusters")
MAX_VOCAB = 10_000_000  # event IDs a state may issue (the model holds an embedding row per ID)


def load_state(path: str) -> dict:
    """A parser_state.json written by preprocess.py once every key is checked (types, ranges, templates
    against vocab_size, the prefix tree's shape, the grouping); else PreprocessError naming the file."""
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
    """The grouping saved with a state: keys of the `preprocess:` section, fields of its log format."""
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
        value = getattr(cfg, key)
        _need(value is None or all(name in fields for name in value.split(",")), f"grouping.{key}",
              f"null or a field of log_format ({', '.join(fields)})", value)
    if cfg.window is not None:
        Windows(cfg.window)
    if cfg.session_key is not None:
        compile_regex(cfg.session_key, "grouping.session_key")


# ----------------------------------------------------------------------------- input
def input_files(paths: list[str]) -> list[Path]:
    """The log files named: each file, and the files of each directory (sorted, hidden ones left out).
    Refused: a missing name, an empty directory, no regular file (its lines are read again later)."""
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


# One line splitter for logs, --labels and the raw lines shown later: a line ends at "\n", "\r\n" or a lone
# "\r" (universal newlines), so line N of a parse is line N of its provenance.
LINE_END = re.compile(rb"\r\n|\r|\n")
LINE_END_TEXT = re.compile(LINE_END.pattern.decode())
LINE_BLOCK = 2 ** 20


def line_blocks(handle, block_bytes: int = LINE_BLOCK):
    r"""The bytes of a binary handle in blocks of whole lines of about `block_bytes` (a "\r" that ends a read
    waits: the next may begin with its "\n"); a longer line is a block of its own."""
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
    """The lines of a block of whole lines, decoded as UTF-8 (`errors` as bytes.decode), without line ends."""
    text = block.decode("utf-8", errors)
    lines = LINE_END_TEXT.split(text) if "\r" in text else text.split("\n")
    if not lines[-1]:
        lines.pop()  # what follows the last line end
    return lines


def split_lines(handle, block_bytes: int = LINE_BLOCK):
    """Every line of a binary handle from where it stands, decoded, without its line end."""
    for block in line_blocks(handle, block_bytes):
        yield from block_lines(block)


# ----------------------------------------------------------------------------- grouping
# One line at a time, the same for a whole parse (preprocess.py) and live detection (detect.py --follow).
PARSED, UNMATCHED, NO_KEY, BAD_TIME = range(4)   # what LineEvents.read says of a line


def grouping_config(state: dict, settings: dict | None = None) -> PreprocessConfig:
    """The grouping saved in a parser state, `settings` (PreprocessConfig fields) over it, checked."""
    try:
        return settings_config(None, [("parser state grouping", state.get("grouping", {})),
                                      ("settings", settings or {})]).preprocess
    except utils.ConfigError as error:
        raise PreprocessError(str(error)) from None


class LineEvents:
    """Raw log lines -> what grouping needs. read(line): (PARSED, event, keys | time | None), (NO_KEY, event,
    ()), (BAD_TIME, event, None) or (UNMATCHED, None, None); keys each once, in order. `times`: read
    --time-field on lines grouped by key too (a whole parse drops such a line with a bad time)."""

    def __init__(self, cfg: PreprocessConfig, parser: Parser, key_flag: str = "--session-key",
                 times: bool = True):
        self.cfg, self.parser, self.key = cfg, parser, None
        if cfg.session_key is not None and cfg.window is None:
            self.key = UserRegex(compile_regex(cfg.session_key, "--session-key"), key_flag)
        self.times = cfg.time_field is not None and (times or self.key is None)
        self.values = cfg.values
        self.match: re.Match | None = None
        self.time: float | None = None   # the last line's time (with `times`) and numeric parameters
        self.numbers: list[float] = []
        self.error: ValueError | None = None   # (the last bad time's)

    def read(self, line: str) -> tuple:
        match = self.match = self.parser.match(line)
        if match is None:
            return UNMATCHED, None, None
        # a field in an optional group (loghub's (\[<PID>\])?) is None where absent: read as ""
        content = match.group("Content") or ""
        event = self.parser.parse(content)
        found = None
        if self.values:
            self.numbers = line_values(content)
        if self.times:
            try:
                found = self.time = line_time(self.cfg, match)
            except ValueError as error:
                self.error = error
                return BAD_TIME, event, None
        if self.key is not None:
            keys = self.key.findall(line)
            found = tuple(keys) if len(keys) < 2 else tuple(dict.fromkeys(keys))   # each once, in order
            if not found:
                return NO_KEY, event, found
        return PARSED, event, found


class Windows:
    """Sliding or tumbling windows over line counts or times: window k covers [k*step, k*step + size) from
    the first line's position, computed from k so the arithmetic cannot stall; a line earlier than the one
    before counts at that one's position (`out_of_order`), unless it is more than a window earlier: then the
    log starts over (logs concatenated, a clock set back), every open window closes and the windows count
    from that line (`restarts`), so that no window spans the jump. place() says which windows a line joins and
    closes; a whole parse's add() also holds the lines and yields each window as it closes, close() a last
    partial one. Refused: bad SIZE/STEP, SIZE/STEP above MAX_OVERLAP, a time too large for float windows."""

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
        self.origin = self.last = None     # the first line's position (count or time); the line before's
        self.count = self.out_of_order = self.restarts = 0
        self.opened = collections.deque()  # k of the windows joined and not yet closed, ascending
        self.lines = collections.deque()   # add(): (position, event, ref, abnormal) of the lines held
        self.covered, self.written = None, 0   # add(): the end of the last window written; windows written

    def state(self) -> dict:
        return {"origin": self.origin, "last": self.last, "count": self.count, "opened": list(self.opened)}

    def restore(self, state: dict) -> None:
        self.origin, self.last, self.count = state["origin"], state["last"], state["count"]
        self.opened = collections.deque(state["opened"])

    def place(self, when) -> tuple[range, list[int]]:
        """(k of the windows the next line joins, k of those it closes) for its time `when` (None: count)."""
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
        size, step, opened = self.size, self.step, self.opened
        closed = []
        if self.last is not None and self.last - position > size:   # time jumped back: start over
            self.restarts += 1
            closed.extend(opened)
            opened.clear()
            self.origin, position = self.origin + position, 0
        elif self.last is not None and position < self.last:
            self.out_of_order += 1
            position = self.last
        self.last = position
        while opened and opened[0] * step + size <= position:
            closed.append(opened.popleft())
        # the windows k with k * step <= position < k * step + size, by the very comparisons (a float
        # quotient can be one off)
        first = max(0, int((position - size) // step) + 1)
        while first > 0 and (first - 1) * step + size > position:
            first -= 1
        while first * step + size <= position:
            first += 1
        last = int(position // step)
        while (last + 1) * step <= position:
            last += 1
        while last >= 0 and last * step > position:
            last -= 1
        if last >= first and (not opened or last > opened[-1]):
            opened.extend(range(first if not opened else max(first, opened[-1] + 1), last + 1))
        return range(first, last + 1), closed

    def add(self, when, event: int, ref: int, abnormal: bool, extra=None):
        restarts = self.restarts
        joined, closed = self.place(when)
        lines = self.lines
        for k in closed:   # (every line held is past the windows before k)
            end = k * self.step + self.size
            yield self._window(list(itertools.takewhile(lambda line, end=end: line[0] < end, lines)))
            self.covered = end
            while lines and lines[0][0] < (k + 1) * self.step:   # in no later window
                lines.popleft()
        if self.restarts != restarts:   # the windows count from this line: positions from it
            lines.clear()
            self.covered = None
        if joined:
            lines.append((self.last, event, ref, abnormal, extra))

    def _window(self, inside: list):
        self.written += 1
        return (f"{self.kind}-window-{self.written}", [x[1] for x in inside], [x[2] for x in inside],
                any(x[3] for x in inside), [x[4] for x in inside])

    def close(self):
        if self.lines and (self.covered is None or self.lines[-1][0] >= self.covered):
            yield self._window(list(self.lines))
        self.lines.clear()


def time_text(cfg: PreprocessConfig, match: re.Match) -> str:
    """The text of --time-field: one field, or several named with commas (Date,Time), joined by a space."""
    return " ".join(match.group(name) or "" for name in cfg.time_field.split(","))


def line_time(cfg: PreprocessConfig, match: re.Match) -> float:
    """The line's --time-field in seconds (--time-format read as UTC, else epoch seconds), or ValueError."""
    value = time_text(cfg, match)
    when = datetime.strptime(value, cfg.time_format).replace(tzinfo=timezone.utc).timestamp() \
        if cfg.time_format else float(value)
    if not math.isfinite(when):
        raise ValueError("not a finite number")
    return when
