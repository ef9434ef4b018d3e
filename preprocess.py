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

    # new logs onto the SAME event IDs; a line no template matches makes a new template with the next ID
    # (in outputs/today/parser_state.json; --match-only: ID vocab_size); format, masks, grouping: the state's
    python preprocess.py /logs/today/ --parser-state outputs/hdfs_raw/parser_state.json --output outputs/today
    python detect.py --checkpoint outputs/hdfs_raw/train/checkpoints/best_model.pt \
        outputs/today/sessions.jsonl --output outputs/today/detections.jsonl

    # parse only (no --session-key or --window): templates, parser state and loghub's structured CSV
    python preprocess.py ../shared/data/loghub/Linux_2k.log --output outputs/linux \
        --log-format '<Month> <Date> <Time> <Level> <Component>(\[<PID>\])?: <Content>' \
        --structured outputs/linux/structured.csv

Log formats are loghub's: <Field> placeholders, the text between them a regular expression (`\[`, optional
groups such as `(\[<PID>\])?`; an absent field reads as "") in which a run of spaces matches any whitespace,
matched on the stripped line. A field other than Content ends where the text after it first matches and is
never retried (loghub's lazy regex can take minutes on one line that does not fit). If none of the first
1000 lines match, the run stops, naming the first three.

Input: files or directories (plain or .gz; regular files, read again later for the raw lines behind
detections), streamed; a line ends at "\n", "\r\n" or a lone "\r". Memory holds the parser and the open
sessions or current windows, never the lines. Each user regex has a budget per line (REGEX_BUDGET_S).
Settings: config.py's PreprocessConfig defaults < `preprocess:` of --config < a --parser-state's grouping <
flags.

Output in --output: sessions.jsonl (session_id, event_ids, label, "lines": [[file index, first line,
count], ...]), sources.json (the files those indexes name, and the counts), templates.json (id, template,
count), parser_state.json (log format, masks, Drain settings, templates, prefix tree, grouping) and
config.yaml for `python train.py --config`. A parse-only run writes no sessions.jsonl or config.yaml.
--structured writes loghub's *_structured.csv columns: LineId, the format's fields, EventId, EventTemplate.

One parse at a time (utils.OutputLock), shown whole: every file goes into a new generation folder,
OUTPUT/.parse-<time>-<random>/, and once all are fsynced the symlink OUTPUT/current is pointed at it in one
atomic rename; the names users know (OUTPUT/sessions.jsonl, ...) are fixed symlinks to current/<name>. So
an interrupt or a kill at any step leaves the previous parse or the new one shown, never a mix. Older
generations are removed under the lock; a folder of plain files is first taken in as one.
"""
from __future__ import annotations

import argparse
import array
import collections
import contextlib
import csv
import gzip
import itertools
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

import utils
from config import Config, PreprocessConfig, check_values, save_config, set_value, settings_config
from logparse import (
    BAD_TIME,
    GROUPING,
    LINE_BLOCK,
    LINE_END,
    UNMATCHED,
    WATCHDOG,
    LineError,
    LineEvents,
    Parser,
    PatternTimeout,
    PreprocessError,
    Windows,
    block_lines,
    compile_regex,
    grouping_config,
    input_files,
    line_blocks,
    load_state,
    split_lines,
    time_text,
    timeout_error,
)

LABEL_VALUES = {"normal": 0, "0": 0, "false": 0, "anomaly": 1, "abnormal": 1, "1": 1, "true": 1}


def _label_rows(path: str, handle):
    """(line number, CSV row) of a --labels file, lines split as logs are, UTF-8 (a BOM dropped)."""
    def lines():
        number = 0
        for block in line_blocks(handle):
            try:
                texts = block_lines(block, "strict")
            except UnicodeDecodeError as error:
                at, bad = error.start, block[error.start:error.start + 4]
                start = max(block.rfind(b"\n", 0, at), block.rfind(b"\r", 0, at)) + 1  # of its line
                line = number + len(LINE_END.findall(block, 0, start)) + 1
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
    """The first label of `session` and its line ("Normal on line 3"), the file read again (a line number
    for every session would cost memory)."""
    try:
        handle.seek(0)
    except OSError:
        return "another on an earlier line"
    return next(f"{row[1].strip()} on line {number}" for number, row in _label_rows(path, handle)
                if len(row) >= 2 and row[0].strip() == session)


def read_labels(path: str) -> dict[str, int]:
    """session id -> 0/1 from a CSV of id, label (Normal/Anomaly, 0/1, true/false; any case); a first row
    with none of those is the header, blank lines are skipped."""
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


# ----------------------------------------------------------------------------- alerts back to raw lines
class RawLines:
    """The raw log line behind each event of a session, by its "lines" runs into `files`: plain files
    through a sparse index (the offset of every INDEX_EVERY-th line) and a seek, .gz files read through."""

    INDEX_EVERY = 1024

    def __init__(self, files: list[str]):
        self.files, self.indexes = [Path(f) for f in files], {}

    @classmethod
    def for_sessions(cls, path) -> RawLines | None:
        """From the sources.json next to sessions.jsonl (links followed to its generation), or None."""
        path = Path(path).resolve()
        sources = (path if path.is_dir() else path.parent) / "sources.json"
        try:
            return cls(json.loads(sources.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def line_of(runs, position: int) -> tuple[int, int] | None:
        """(file index, line number) of the event at `position`, or None (the end of session)."""
        with contextlib.suppress(TypeError, ValueError):
            for file_index, first, count in runs:
                if position < count:
                    return int(file_index), int(first) + position
                position -= count
        return None

    def fetch(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """The raw line of each (file index, line number) wanted; a file gone, unreadable or no longer a
        regular file (it would block) gives none."""
        found: dict[tuple[int, int], str] = {}
        by_file: dict[int, list[int]] = {}
        for file_index, line in wanted:
            if 0 <= file_index < len(self.files) and line >= 1:
                by_file.setdefault(file_index, []).append(line)
        for file_index, lines in by_file.items():
            # a log moved or rotated away: its misses are shown without their line
            with contextlib.suppress(OSError, EOFError, zlib.error):
                if self.files[file_index].is_file():
                    found.update({(file_index, n): text
                                  for n, text in self._read(self.files[file_index], sorted(lines))})
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
        """The byte offset of line k * INDEX_EVERY + 1, for each k the file reaches."""
        offsets, lines, position = array.array("q", [0]), 0, 0
        with open(file, "rb") as handle:
            for block in line_blocks(handle):
                ends = [match.end() for match in LINE_END.finditer(block)]
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


class EventNames:
    """The parser's template text of the events in an alert, for a reader who does not know the IDs: a
    miss's "actual" and "expected" get "actual_template" and "expected_templates" (an early alert's "event"
    "event_template"), the ID fields left as they are. An event without a template, or one the model never
    saw in training (at or above its vocab_size, or absent from its training data), is named unknown in
    words. `seen`: per ID below vocab_size, whether training had it (the model's seen_events)."""

    END = "<end of session>"
    NO_TEMPLATE = "<unknown: no template with this ID>"
    NO_MATCH = "<unknown: the line matched no template of the parser>"
    UNSEEN = "<unknown to the model, never seen in training> "

    def __init__(self, templates: dict[int, str], parser_vocab: int | None, vocab_size: int,
                 seen: list[bool] | None = None):
        self.templates, self.parser_vocab, self.vocab_size = templates, parser_vocab, vocab_size
        self.seen = seen

    @staticmethod
    def _table(path: Path) -> dict[int, str] | None:
        """ID -> template of a templates.json (preprocess.py's), or None where it is absent or not one."""
        try:
            table = json.loads(path.read_text())
            return {int(t["id"]): str(t["template"]) for t in table if isinstance(t["id"], int)}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def for_sessions(cls, path, vocab_size: int, seen=None) -> EventNames | None:
        """From the templates.json next to sessions.jsonl (links followed to its generation), or None."""
        path = Path(path).resolve()
        templates = cls._table((path if path.is_dir() else path.parent) / "templates.json")
        if not templates:
            return None
        return cls(templates, max(templates) + 1, vocab_size, seen)

    @classmethod
    def for_state(cls, state_path: str, vocab_size: int, seen=None) -> EventNames:
        """From a parser state (validated), with the templates.json beside it for templates Drain evicted."""
        state = load_state(state_path)
        templates = cls._table(Path(state_path).resolve().parent / "templates.json") or {}
        templates.update({t["id"]: t["template"] for t in state["templates"]})
        return cls(templates, state["vocab_size"], vocab_size, seen)

    def name(self, event) -> str:
        if not isinstance(event, int):
            return self.END if event == "<end>" else self.NO_TEMPLATE
        text = self.templates.get(event)
        if text is None:
            return self.NO_MATCH if event == self.parser_vocab else self.NO_TEMPLATE
        known = 0 <= event < self.vocab_size and (self.seen is None or bool(self.seen[event]))
        return text if known else self.UNSEEN + text

    def annotate(self, record: dict, key: str = "actual") -> None:
        """Add the template of record[key] and of each of record["expected"] (where there are some)."""
        if key in record:
            record[f"{key}_template"] = self.name(record[key])
        if "expected" in record:
            record["expected_templates"] = [self.name(event) for event in record["expected"]]


# ----------------------------------------------------------------------------- the run
def read_lines(files: list[Path]):
    """(file index, 1-based line number, line) of every file in turn, streamed."""
    for index, path in enumerate(files):
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as handle:
                for number, line in enumerate(split_lines(handle), start=1):
                    yield index, number, line
        except (OSError, EOFError, zlib.error) as error:  # permissions, a corrupt or truncated .gz
            raise PreprocessError(f"{path}: unreadable: {utils.one_line(error)}") from None


# A whole parse's groupers take lines as add(keys or time, event ID, line reference, abnormal) and yield
# finished groups as (session id, event IDs, line references, abnormal); close() yields the rest.
class Sessions:
    """Lines grouped by the session keys they name. A session stays open until the input ends, `idle`
    lines pass without it, or max_open are open and it is the least recently active (`closed_early`)."""

    def __init__(self, max_open: int, idle: int | None):
        self.max_open, self.idle, self.open = max_open, idle, collections.OrderedDict()
        self.seen = self.closed_early = self.closed_idle = self.no_key = self.lines = 0

    def add(self, keys: tuple, event: int, ref: int, abnormal: bool, extra=None):
        self.lines += 1
        while self.idle and self.open and next(iter(self.open.values()))[4] <= self.lines - self.idle:
            self.closed_idle += 1
            yield self._finish(*self.open.popitem(last=False))
        if not keys:
            self.no_key += 1
        for session_id in keys:
            state = self.open.get(session_id)
            if state is None:
                if len(self.open) >= self.max_open:
                    self.closed_early += 1
                    yield self._finish(*self.open.popitem(last=False))
                self.seen += 1
                state = self.open[session_id] = [self.seen, array.array("l"), array.array("q"), False, 0,
                                                 array.array("d"), array.array("d"), array.array("b")]
            else:
                self.open.move_to_end(session_id)  # most recently active last: the LRU end is first
            state[1].append(event)
            state[2].append(ref)
            state[3] = state[3] or abnormal
            state[4] = self.lines
            if extra is not None:   # (time, values) kept as flat arrays: open sessions stay small
                state[5].append(math.nan if extra[0] is None else extra[0])
                state[6].extend(extra[1])
                state[7].append(len(extra[1]))

    @staticmethod
    def _finish(session_id, state):
        times, flat, counts = state[5], state[6].tolist(), state[7]
        ends = list(itertools.accumulate(counts))
        extras = [(None if math.isnan(t) else t, flat[end - n:end]) for t, n, end in zip(times, counts, ends)]
        return session_id, state[1], state[2], state[3], extras

    def close(self):
        for session_id, state in sorted(self.open.items(), key=lambda item: item[1][0]):  # first seen first
            yield self._finish(session_id, state)
        self.open.clear()


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


def make_grouper(cfg: PreprocessConfig, parser: Parser,
                 parse_only: bool = False) -> Sessions | Windows | None:
    """The grouper the settings ask for; None for a parse-only run (`parse_only` allowed and neither
    --session-key nor --window given)."""
    fields = parser.regex.groupindex
    for flag, name in (("--label-field", cfg.label_field), ("--time-field", cfg.time_field)):
        if name is not None and not all(part in fields for part in name.split(",")):
            raise PreprocessError(f"{flag} {utils.short(name)}: not a field of the log format "
                                  f"({utils.short_text(', '.join(fields))})")
    if cfg.session_key is not None and cfg.window is not None or \
            cfg.session_key is None and cfg.window is None and not parse_only:
        raise PreprocessError("give either --session-key REGEX or --window count:SIZE[:STEP] / "
                              "time:SIZE[:STEP]")
    if cfg.session_key is not None:
        compile_regex(cfg.session_key, "--session-key")   # (LineEvents finds the keys)
        return Sessions(cfg.max_open_sessions, cfg.session_idle)
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


def iter_log_sessions(cfg: PreprocessConfig, parser: Parser, files: list[Path], stats: dict,
                      labels: dict | None = None, rows=None, parse_only: bool = False,
                      require_match: bool = False):
    """Sessions as sessions.jsonl holds them (dicts), streamed from raw log files (none in a parse-only
    run); counts go into `stats`, one CSV row per input line into `rows` when given."""
    grouper = make_grouper(cfg, parser, parse_only)
    lines = LineEvents(cfg, parser)   # (parse only: no key, no time)
    names, first_lines, first_parsed, first_bad_time = list(parser.regex.groupindex), [], "", ""
    writer = csv.writer(rows) if rows else None
    produced = 0

    def finished(groups):
        nonlocal produced
        for session_id, events, refs, abnormal, extras in groups:
            label = labels.get(session_id, 0) if labels is not None else int(abnormal)
            produced += 1
            stats["sessions"] += 1
            stats["abnormal"] += label
            stats["unlabelled"] += labels is not None and session_id not in labels
            session = {"session_id": session_id, "event_ids": list(events), "label": label,
                       "lines": line_runs(refs)}
            if lines.times:
                session["times"] = [extra[0] for extra in extras]
            if lines.values:
                session["values"] = [extra[1] for extra in extras]
            yield session

    with WATCHDOG:
        for file_index, number, line in read_lines(files):
            try:
                stats["lines"] += 1
                status, event, found = lines.read(line)
                if status == UNMATCHED:
                    stats["unmatched"] += 1
                    if len(first_lines) < 3:
                        first_lines.append(_sample(files, file_index, number, line))
                        stats["first_unmatched"] = first_lines[0]
                    if stats["parsed"] == 0 and stats["lines"] >= FAIL_FAST_LINES:
                        raise no_match_error(parser.log_format, first_lines, stats["lines"])
                    if writer:
                        writer.writerow([stats["lines"], ""])
                    continue
                match = lines.match
                stats["parsed"] += 1
                stats["unknown"] += not parser.learning and event >= parser.known_vocab
                first_parsed = first_parsed or _sample(files, file_index, number, line)
                if writer:
                    writer.writerow([stats["lines"], event, *(match.group(name) or "" for name in names)])
                if grouper is None:
                    continue
                if status == BAD_TIME:
                    stats["bad_time"] += 1
                    first_bad_time = first_bad_time or (f"{utils.short(time_text(cfg, match))}, "
                                                        f"{utils.one_line(lines.error, 80)}, on "
                                                        f"{_sample(files, file_index, number, line)}")
                    continue
                abnormal = cfg.label_field is not None and \
                    (match.group(cfg.label_field) or "") != cfg.normal_value
                yield from finished(grouper.add(found, event, file_index << 40 | number, abnormal,
                                                (lines.time, lines.numbers)))
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
                    if isinstance(grouper, Sessions) else {"out_of_order": grouper.out_of_order,
                                                           "restarts": grouper.restarts}))


def sessions_from_logs(state_path: str, inputs: list[str], stats: dict | None = None, **settings):
    """For detection on raw logs: sessions (dicts as in sessions.jsonl) through a saved parser state, with
    the grouping it was saved with unless `settings` (PreprocessConfig fields) say otherwise. Streamed."""
    state = load_state(state_path)
    cfg = grouping_config(state, settings)
    stats = stats if stats is not None else new_stats()
    return iter_log_sessions(cfg, Parser(cfg, state), input_files(inputs), stats)


def new_stats() -> dict:
    return collections.defaultdict(int, lines=0, parsed=0, unmatched=0, bad_time=0, unknown=0, sessions=0,
                                   abnormal=0, first_unmatched="")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def preprocess(cfg: PreprocessConfig, inputs: list[str], output: Path, state: dict | None = None,
               structured: str | None = None, config: Config | None = None, learn_new: bool = True) -> dict:
    """Parse and group `inputs` into a new generation of `output`, holding its lock, switched in at the end.
    `config`: the one config whose other sections go into config.yaml; `learn_new`: from a state, lines no
    template matches make new templates (else they get ID vocab_size)."""
    parser = Parser(cfg, state, learn_new=learn_new)
    parse_only = make_grouper(cfg, parser, parse_only=True) is None  # settings checked before any work
    labels = read_labels(cfg.labels) if cfg.labels else None
    files = input_files(inputs)
    inside = structured_name(output, structured)
    lock = place = None
    try:
        with utils.signals_held():   # a stop meanwhile comes once the lock is ours: it is released below
            lock = utils.OutputLock(output, logging.getLogger("preprocess"), flag="--output")
        remove_leftovers(output)
        adopt_plain_files(output)
        place = new_generation(output)
        stats = write_parse(place, output, cfg, parser, files, labels, parse_only,
                            (structured, inside), config or Config())
        switch_to(output, place)
        with utils.signals_held():   # the generation before, removed whole
            remove_leftovers(output)
    except BaseException as error:
        switched = place is not None and _current(output) == place.name
        if lock is not None:
            # under the lock, and not cut short by a second Ctrl-C: the generations not shown (this run's
            # unless it was switched in, a half-removed one), temp links; then the lock released
            with utils.signals_held(drop=True):
                try:
                    with contextlib.suppress(OSError):
                        remove_leftovers(output)
                finally:
                    lock.release()
        if place is None:
            raise
        if isinstance(error, OSError):
            raise _name_for_user(error, place, output, structured) from None
        if isinstance(error, utils.Stopped):
            shows = "this parse, whole" if switched else "the previous parse as it was (if there was one)"
            done = "finished" if switched else "did not finish"
            raise utils.Interrupted(f"{error}: the parse {done}: {output} shows {shows}",
                                    utils.signal_exit_code(str(error))) from None
        raise
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
    stats.update(templates=parser.vocab_size, new_templates=parser.vocab_size - parser.known_vocab
                 if parser.learn_new else 0, seconds=round(elapsed, 3), peak_rss_mb=peak_rss_mb(),
                 lines_per_s=round(stats["lines"] / max(elapsed, 1e-9)))
    if parse_only:
        stats["parse_only"] = True
    utils.save_json(place / "templates.json", parser.table())
    grouping = {k: getattr(cfg, k) for k in GROUPING}
    utils.save_json(place / "parser_state.json", {**parser.state(), "grouping": grouping})
    utils.save_json(place / "sources.json", {"files": [str(f.resolve()) for f in files],
                                             "stats": dict(stats)})
    if parser.learning and not parse_only:  # data with unknown IDs (>= vocab_size) is for detection only
        write_train_config(config, place, output, parser.vocab_size, window_overlap(cfg.window))
    return dict(stats)


def _as_text(write):
    """utils.atomic_write's writer for a `write` of text (UTF-8); no buffer, so a failed write raises once."""
    return lambda handle: write(types.SimpleNamespace(write=lambda text: handle.write(text.encode())))


def _name_for_user(error: OSError, place: Path, output: Path, structured: str | None) -> OSError:
    """A failed write names the file as the user knows it (OUTPUT/sessions.jsonl), not its generation; one
    that names no file (a write of the structured rows) names --structured."""
    name = str(error.filename or structured or "")
    if name.startswith(str(place) + os.sep):
        name = str(output / Path(name).name)
    return OSError(error.errno, error.strerror or str(error), name or None)


def write_structured(rows_path: Path, target: Path, parser: Parser) -> None:
    """loghub's *_structured.csv, each template as it stands at the end (Drain's change while it learns)."""
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


def window_overlap(spec: str | None) -> int:
    """How many windows on each side share lines with a window of --window SPEC (0 without windows, or with
    windows that do not overlap): data.overlap, which keeps the validation split apart from training."""
    if not spec:
        return 0
    windows = Windows(spec)
    return math.ceil(windows.size / windows.step) - 1


def write_train_config(config: Config, place: Path, output: Path, vocab_size: int, overlap: int = 0) -> None:
    """The one config with model.vocab_size, data.preprocessed_dir, data.overlap and training.output_dir set,
    paths through `output`'s fixed names (not resolved: they name the current parse, whichever it is)."""
    base = os.path.abspath(output)
    for dotted, value in (("model.vocab_size", vocab_size), ("data.overlap", overlap),
                          ("data.preprocessed_dir", os.path.join(base, "sessions.jsonl")),
                          ("training.output_dir", os.path.join(base, "train"))):
        set_value(config, dotted, value, "preprocess.py")
    check_values(config)
    save_config(config, place / "config.yaml")


# ----------------------------------------------------------------------------- the output folder
OUTPUT_FILES = ("sessions.jsonl", "sources.json", "templates.json", "parser_state.json", "config.yaml")


def structured_name(output: Path, structured: str | None) -> str | None:
    """The name of --structured inside a generation when it names a file directly in `output`, else None."""
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
    """Show generation `place`: a fixed link OUTPUT/NAME -> current/NAME for each of its files, then
    `current` replaced in one atomic rename."""
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
    """Plain files under the names users know (an old folder, a config.yaml an editor saved by rename)
    become a generation: what the folder shows hard-linked (or copied) into a new one shown as `current`,
    then each plain name replaced by its link, the same bytes at every moment."""
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
    add("--no-default-masks", action="store_false", dest="default_masks", default=None, help="do not apply "
        "the built-in masks (IP:port, UUID, hex, long hex ids, paths, block-like ids, numbers)")
    add("--similarity", type=float, help="Drain similarity threshold sim_th in [0, 1] (default 0.45)")
    add("--depth", type=int, help="Drain prefix-tree depth, >= 3 (default 4)")
    add("--max-templates", type=int, help="cap on templates held (drain3 max_clusters, least recently used "
        "evicted; an evicted template seen again gets a new ID); default: no cap")
    add("--parser-state", help="parser_state.json of an earlier run: match lines onto its event IDs; a "
        "line no template matches makes a new template with the next ID (kept in OUTPUT/parser_state.json, "
        "unknown to models until fed back with train.py --update); log format, masks and Drain settings "
        "come from it, and the grouping unless given")
    add("--match-only", action="store_true", help="with --parser-state: learn no new template (a line no "
        "template matches gets ID vocab_size)")
    add("--session-key", help=r"regex of session identifiers, e.g. 'blk_-?\d+' (a line naming several joins "
        r"each); with a capture group the id is the first group's text: 'sshd\[(\d+)\]' gives 24200")
    add("--window", help="count:SIZE[:STEP] (lines) or time:SIZE[:STEP] (seconds; needs --time-field)")
    add("--time-field", help="log-format field holding each line's time (default format: epoch seconds); "
        "several joined by a space: Date,Time; with --session-key each event's time is kept (\"times\")")
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
    add("--no-values", action="store_false", dest="values", default=None, help="do not keep each event's "
        "numeric parameters (the \"values\" of sessions.jsonl)")
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
        config = settings_config(base, [("parser state grouping", (state and state.get("grouping")) or {}),
                                        ("command line", flags)])
        if args.match_only and not args.parser_state:
            raise PreprocessError("--match-only goes with --parser-state (a new parse learns its templates)")
        stats = preprocess(config.preprocess, args.inputs, Path(args.output), state, args.structured, config,
                           learn_new=not args.match_only)
        print(f"{stats['lines']} lines: {stats['parsed']} parsed, {stats['unmatched']} not matching the log "
              "format"
              + (f", {stats['unknown']} lines of events the parser state did not know"
                 if args.parser_state else "")
              + f"; {stats['templates']} templates (vocab_size); "
              + ("parsed only (no --session-key or --window): no sessions.jsonl or config.yaml written"
                 if stats.get("parse_only") else
                 f"{stats['sessions']} sessions, {stats['abnormal']} abnormal")
              + f"; {stats['lines_per_s']:,} lines/s. Output in {args.output}")
        if stats["new_templates"]:
            first = state["vocab_size"]
            print(f"{stats['new_templates']} new templates (event IDs {first}..{stats['templates'] - 1}, in "
                  f"{args.output}/templates.json): unknown to a model trained on {args.parser_state} until "
                  f"it learns them: where they are normal, feed back sessions that hold them (train.py "
                  f"--update CHECKPOINT --feedback FILE --parser-state {args.output}/parser_state.json) and "
                  f"parse later logs with that parser state, so that they keep these IDs", file=sys.stderr)
        for key, what in (("sessions_closed_early", "sessions written early (raise --max-open-sessions)"),
                          ("unlabelled", "sessions missing from --labels (labelled normal)"),
                          ("bad_time", "lines with an unreadable --time-field (left out)"),
                          ("out_of_order", "lines earlier than the line before (kept in the current "
                                           "window)"),
                          ("restarts", "jumps back in time of more than a window (the log starts "
                                       "over there: the open windows closed, the next count from that "
                                       "line)")):
            if stats.get(key):
                print(f"warning: {stats[key]} {what}", file=sys.stderr)

    utils.exit_on_user_error(run)


if __name__ == "__main__":
    main()
