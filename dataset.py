"""Streaming readers for parsed log sessions, and the IterableDataset that feeds training.

Examples:

    python dataset.py data/sample                 # count sessions/windows per file, validate every record
    python dataset.py ../shared/data/hdfs/hdfs_train --vocab-size 29

    from dataset import iter_sessions
    for record in iter_sessions("data/sample", vocab_size=29):
        print(record.file, record.index, record.session_id, record.event_ids, record.label)

Formats (files read in sorted order; `.gz` of each read transparently):
    *.json   a top-level array of session objects, or an object holding that array under `json_array_key`
    *.jsonl  one session object per line
    other    DeepLog text: one session per line, event IDs separated by spaces (.txt, .log or no suffix)
A session object holds a list of integer IDs under `event_ids_field`, optionally `label` (0 normal,
1 abnormal) and `session_id`. JSON is streamed with ijson; no file is read whole into memory.

This module knows nothing of training: it reads, validates, splits, windows, shuffles and pads.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import json.scanner
import math
import os
import random
import re
import signal
import struct
import sys
from dataclasses import dataclass
from operator import contains, itemgetter
from pathlib import Path
from typing import Iterator

import ijson
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import utils
from config import MAX_VALUES, Config
from rules import CoOccurrenceRecorder, merge_co_occurrence
from tokens import IGNORE_INDEX, lay_out, special_tokens, window_table
from utils import UserError, excerpt, file_kind, one_line

_DEFAULTS = Config()  # the one place defaults live
_DATA = _DEFAULTS.data
JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt", ".log", "")
IJSON_BACKEND = ijson.backend  # "yajl2_c" when the C extension is available, else a slower pure-Python one
# ijson's C backend crashes the interpreter (a segfault, seen with ijson 3.6) on a JSON number longer than
# Python's int digit limit (4,300) instead of raising. A data file must never do that, so the readers lift
# the limit: a record with such an ID is then rejected by validation like any other bad ID.
sys.set_int_max_str_digits(0)


class DataError(UserError):
    """Bad input data, the message naming the file and the record (or line). `skippable`: a bad record that
    skip_bad_records would have skipped, not a fault of the file itself (which nothing skips)."""

    skippable = False


def skip_hint(error: BaseException, skip_bad_records: bool) -> str:
    """The advice " (--skip-bad-records skips such records)" where that would have skipped it, else ""."""
    if skip_bad_records or not getattr(error, "skippable", False):
        return ""
    return " (--skip-bad-records skips such records)"


@dataclass
class Record:
    file: str
    index: int  # 1-based record number in a .json array, line number in .jsonl and text files
    session_id: str
    event_ids: list[int]
    label: int
    lines: list | None = None  # preprocess.py's provenance: [[file index, first line, count], ...], else None
    times: list | None = None   # each event's time in seconds (None where unknown), for the parameter model
    values: list | None = None  # each event's numeric parameters (a list per event, at most MAX_VALUES)


def list_data_files(path: str | os.PathLike) -> list[Path]:
    """The readable data files under `path` (a file or a directory), sorted; DataError if none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} is {file_kind(path)}, not a regular file: the token cache needs a file it "
                        f"can read twice (keyed by its size and time, parsed in byte ranges, checked after), "
                        f"and so do the readers; write the data to a file first (e.g. ... > data.jsonl)")
    named = [p for p in path.iterdir() if not p.name.startswith(".") and _format_of(p)]
    special = next((p for p in sorted(named) if p.exists() and not p.is_file() and not p.is_dir()), None)
    if special is not None:   # a pipe or device among the data: never skipped without a word
        raise DataError(f"{special} is {file_kind(special)}, not a regular file: the data folder must hold "
                        f"files only (move it out, or write its data to a file)")
    files = sorted(p for p in named if p.is_file())
    if not files:
        raise DataError(f"{path}: directory holds no readable data file "
                        f"(*.json, *.jsonl, DeepLog text *.txt/*.log/no suffix, or .gz of these)")
    return files


def _format_of(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix
    if suffix in JSON_SUFFIXES:
        return suffix[1:]
    return "text" if suffix in TEXT_SUFFIXES else None


def _open(path: Path, mode: str = "rb"):
    return gzip.open(path, mode) if path.name.endswith(".gz") else open(path, mode)


# a session file nests 3 or 4 levels: [array under a key,] array, session object, event IDs
MAX_JSON_DEPTH = 32
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_OPENERS, _CLOSERS = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPENERS[[ord("["), ord("{")]], _CLOSERS[[ord("]"), ord("}")]] = 1, 1


class _DepthBoundedReader:
    """A binary file that refuses JSON nested deeper than MAX_JSON_DEPTH before ijson sees it (ijson's
    memory grows with the square of the depth). Each block is reduced at C speed to its quotes and brackets
    (escapes dropped first) and the depth outside strings tracked with numpy."""

    def __init__(self, handle, file: Path):
        self.handle, self.file = handle, file
        self.depth, self.in_string, self.skip_first, self.position = 0, False, False, 0

    def read(self, size: int = -1) -> bytes:
        block = self.handle.read(size)
        self._check(block, self.position, self.position + len(block))
        self.position += len(block)
        return block

    def _check(self, block: bytes, begin: int, end: int) -> None:
        if self.skip_first and block:  # the previous block ended with a backslash: it escapes this byte
            block, self.skip_first = block[1:], False
        if b"\\" in block:
            block = _ESCAPE.sub(b"", block)
            if block.endswith(b"\\"):
                block, self.skip_first = block[:-1], True
        structure = np.frombuffer(block.translate(None, _NOT_STRUCTURE), np.uint8)
        if not len(structure):
            return
        quotes = structure == ord('"')
        # a closing quote counts as inside: not a bracket
        outside = (np.cumsum(quotes) + self.in_string) % 2 == 0
        steps = (_OPENERS[structure] - _CLOSERS[structure]) * (outside & ~quotes)
        depths = self.depth + np.cumsum(steps, dtype=np.int64)
        if depths.max() > MAX_JSON_DEPTH:
            raise DataError(f"{self.file}: JSON nested deeper than {MAX_JSON_DEPTH} levels within bytes "
                            f"{begin:,}-{end:,} (a session file nests at most 4: "
                            f"[an array under a key,] the array, a session object, its event IDs)")
        self.depth, self.in_string = int(depths[-1]), bool((int(quotes.sum()) + self.in_string) % 2)


def iter_sessions(path, vocab_size: int | None = None, event_ids_field: str = _DATA.event_ids_field,
                  label_field: str = _DATA.label_field, session_id_field: str = _DATA.session_id_field,
                  json_array_key: str = _DATA.json_array_key, skip_bad_records: bool = _DATA.skip_bad_records,
                  counters: dict | None = None) -> Iterator[Record]:
    """Stream validated sessions from every data file under `path`. A bad record raises DataError; with
    skip_bad_records it is counted in counters["bad_records"] (the first message in "first_bad_record")."""
    counters = counters if counters is not None else {}
    counters.setdefault("bad_records", 0)
    for file in list_data_files(path):
        fmt = _format_of(file) or "text"
        fields = (event_ids_field, label_field, session_id_field)
        try:
            yield from _records(file, _numbered_items(file, fmt, json_array_key, None, 1), fmt, fields,
                                vocab_size, skip_bad_records, counters)
        except (OSError, EOFError, UnicodeDecodeError) as error:  # permissions, corrupt gzip, binary files
            raise DataError(f"{file}: unreadable: {one_line(error)}") from None


def _json_array_prefix(file: Path, array_key: str) -> str:
    """The ijson prefix of the session array: a top-level array, or one held under array_key."""
    with _open(file) as handle:
        head = handle.read(4096).lstrip()
    if not head:
        raise DataError(f"{file}: empty file")
    return "item" if head[:1] == b"[" else f"{array_key}.item"


def _iter_json_array(file: Path, array_key: str):
    prefix = _json_array_prefix(file, array_key)
    count = 0
    with _open(file) as handle:
        try:
            items = ijson.items(_DepthBoundedReader(handle, file), prefix, use_float=True)
            for count, item in enumerate(items, start=1):
                yield count, item
        except ijson.JSONError as error:
            raise DataError(f"{file}: malformed JSON after record {count} (at record {count + 1}): "
                            f"{one_line(error)}") from None
    _check_found(file, count, prefix, array_key)


def _check_found(file: Path, count: int, prefix: str, array_key: str) -> None:
    if count == 0 and prefix != "item":
        raise DataError(f"{file}: no session array found: expected a top-level array or an object "
                        f"with the array under {excerpt(array_key)} (data.json_array_key)")


_PLAIN_INTEGER = re.compile(r"-?[0-9]+")
_TEXT_BYTES = b"0123456789- \t\r\n\x0b\x0c"  # what a DeepLog text block may hold (int() takes more)


def text_event_ids(file: Path, line_no: int, tokens: list[str]) -> list[int]:
    event_ids = []
    for token in tokens:
        try:
            if not _PLAIN_INTEGER.fullmatch(token):  # int() also takes "+3", "1_0" and non-ASCII digits
                raise ValueError
            event_ids.append(int(token))
        except ValueError:
            raise DataError(f"{file}: line {line_no}: '{token[:40]}' is not an integer event ID "
                            f"(DeepLog text holds space-separated integers)") from None
    return event_ids


MAX_EVENT_ID = 2 ** 63 - 1   # IDs are held as int64 (an ID a model never saw is scored as unknown)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checked_times(where: str, times, events: int) -> list | None:
    """A session's optional "times": one number (seconds) or null per event."""
    if times is None:
        return None
    if not isinstance(times, list) or len(times) != events:
        raise DataError(f"{where}: \"times\" must be a list of one time per event ({events}), got "
                        f"{excerpt(times)}")
    bad = next((t for t in times if t is not None and not _is_number(t)), _MISSING)
    if bad is not _MISSING:
        raise DataError(f"{where}: \"times\" holds {excerpt(bad)}, not a finite number of seconds or null")
    return times


def checked_values(where: str, values, events: int) -> list | None:
    """A session's optional "values": one list of at most MAX_VALUES finite numbers per event."""
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != events:
        raise DataError(f"{where}: \"values\" must be a list of one list per event ({events}), got "
                        f"{excerpt(values)}")
    for numbers in values:
        if not isinstance(numbers, list) or len(numbers) > MAX_VALUES or not all(map(_is_number, numbers)):
            raise DataError(f"{where}: \"values\" holds {excerpt(numbers)}, not a list of at most "
                            f"{MAX_VALUES} finite numbers")
    return values


_MISSING = object()


def validate_record(file: Path, index: int, item, fields, vocab_size: int | None, fmt: str) -> Record:
    event_ids_field, label_field, session_id_field = fields
    where = f"{file}: {'record' if fmt == 'json' else 'line'} {index}"
    label, session_id, lines = 0, f"{file.name}:{index}", None
    if fmt == "text":
        events = item
    else:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a session object, got {type(item).__name__}")
        if event_ids_field not in item:
            raise DataError(f"{where}: missing field {excerpt(event_ids_field)} (data.event_ids_field)")
        events = item[event_ids_field]
        if not isinstance(events, list):
            raise DataError(f"{where}: {excerpt(event_ids_field)} must be a list of integers, "
                            f"got {type(events).__name__}")
        label = item.get(label_field, 0)
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{where}: {excerpt(label_field)} must be 0 (normal) or 1 (abnormal), "
                            f"got {excerpt(label)}")
        session_id = str(item.get(session_id_field, session_id))
        lines = item.get("lines")
        times, values = item.get("times"), item.get("values")
    if not events:
        raise DataError(f"{where}: empty session (no event IDs)")
    for event in events:
        if not isinstance(event, int) or isinstance(event, bool):
            raise DataError(f"{where}: event ID {excerpt(event)} is not an integer")
        if event < 0:
            raise DataError(f"{where}: event ID {excerpt(event)} is negative")
        if vocab_size is not None and event >= vocab_size:
            raise DataError(f"{where}: event ID {excerpt(event)} >= vocab_size {vocab_size} "
                            f"(raise model.vocab_size)")
        if event > MAX_EVENT_ID:
            raise DataError(f"{where}: event ID {excerpt(event)} is too large (IDs are 64-bit integers)")
    if fmt == "text":
        return Record(str(file), index, session_id, events, int(label))
    return Record(str(file), index, session_id, events, int(label),
                  lines if isinstance(lines, list) else None,
                  checked_times(where, times, len(events)), checked_values(where, values, len(events)))


# ----------------------------------------------------------------------------- the fast first pass
@dataclass
class SessionArrays:
    """A chunk of validated sessions as flat arrays: the unit of work of the first pass (the token cache)."""
    tokens: np.ndarray    # int64: every session's event IDs, back to back
    lengths: np.ndarray   # int64: events per session
    labels: np.ndarray    # uint8: 0 normal, 1 abnormal
    indexes: np.ndarray   # int64: record number (.json) or line number (.jsonl, text), as in messages


# (object, end index) of the JSON value at an index of a string: the C scanner inside json.loads
_SCAN_JSON = json.scanner.make_scanner(json.JSONDecoder())


class _Unparsable:
    """A message carried in place of an item: a JSONL line that is not JSON (so that skip_bad_records can
    skip it), or a reader process's DataError (DataLoader would wrap it in a traceback)."""

    def __init__(self, message: str):
        self.message = message


def _line_blocks(file: Path, byte_range: tuple[int, int] | None, first_line: int, block_bytes: int = 2 ** 18):
    """(number of the block's first line, its lines as bytes), about block_bytes at a time: those that start
    inside byte_range = (begin, end), first_line being the number of the line that holds byte `begin`."""
    with _open(file) as handle:
        begin, end = byte_range or (0, None)
        line_no = first_line
        if begin > 0:
            handle.seek(begin - 1)
            if handle.read(1) != b"\n":  # the line holding `begin` started in the previous range: skip it
                begin += len(handle.readline())
                line_no += 1
        position = begin
        while block := handle.readlines(block_bytes):
            if end is not None:
                sizes = np.fromiter(map(len, block), np.int64, len(block))
                # the lines starting before end
                keep = int(np.searchsorted(position + np.cumsum(sizes) - sizes, end))
                position += int(sizes.sum())
                if keep < len(block):
                    yield line_no, block[:keep]
                    return
            yield line_no, block
            line_no += len(block)


def _numbered_items(file: Path, fmt: str, array_key: str, byte_range, first_line: int):
    """(record number, raw item) of any format (text: lists of tokens; JSONL: maybe _Unparsable)."""
    if fmt == "json":
        yield from _iter_json_array(file, array_key)
        return
    for block_start, block in _line_blocks(file, byte_range, first_line):
        yield from _block_items(file, fmt, block_start, block)


def _block_items(file: Path, fmt: str, block_start: int, block: list[bytes]):
    for line_no, raw_line in enumerate(block, start=block_start):
        line = raw_line.decode()
        if fmt == "text":
            tokens = line.split()
            if tokens:
                yield line_no, tokens
            continue
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except (ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, or a number too long
            message = "nested too deeply" if isinstance(error, RecursionError) else one_line(error)
            yield line_no, _Unparsable(f"{file}: line {line_no}: malformed JSON: {message}")


class _RecheckFrom(Exception):
    """A chunk failed the fast checks: read again from this record on, one record at a time."""

    def __init__(self, records_done: int):
        self.records_done = records_done


def iter_session_arrays(file, vocab_size: int | None = None, event_ids_field: str = _DATA.event_ids_field,
                        label_field: str = _DATA.label_field, session_id_field: str = _DATA.session_id_field,
                        json_array_key: str = _DATA.json_array_key,
                        skip_bad_records: bool = _DATA.skip_bad_records, counters: dict | None = None,
                        byte_range: tuple[int, int] | None = None, first_line: int = 1,
                        chunk_records: int = 512) -> Iterator[SessionArrays]:
    """Validated sessions of one data file as chunks of flat arrays, the checks and messages of
    iter_sessions: a few C-speed passes a chunk; from the first chunk that fails them on, record by record,
    to name the bad record (or skip it). `byte_range`: as _line_blocks."""
    file = Path(file)
    fmt = _format_of(file) or "text"
    counters = counters if counters is not None else {}
    counters.setdefault("bad_records", 0)
    fields = (event_ids_field, label_field, session_id_field)
    checked = (fmt, fields, vocab_size, skip_bad_records, counters)
    try:
        try:
            if fmt == "json":
                yield from _json_array_chunks(file, json_array_key, fields, vocab_size, chunk_records)
                return
            for block_start, block in _line_blocks(file, byte_range, first_line):
                arrays = _lines_at_c_speed(block_start, block, fmt, fields, vocab_size)
                yield arrays if arrays is not None else \
                    _checked_arrays(file, list(_block_items(file, fmt, block_start, block)), *checked)
            return
        except _RecheckFrom as failed:
            recheck_from = failed.records_done
        numbered = itertools.islice(_iter_json_array(file, json_array_key), recheck_from, None)
        for chunk in iter(lambda: list(itertools.islice(numbered, chunk_records)), []):
            yield _checked_arrays(file, chunk, *checked)
    except (OSError, EOFError, UnicodeDecodeError) as error:  # permissions, corrupt gzip, binary files
        raise DataError(f"{file}: unreadable: {one_line(error)}") from None


def _json_array_chunks(file: Path, array_key: str, fields, vocab_size, chunk_records: int):
    """A .json array in checked chunks, each record's two fields taken by C-level iterators as it is
    parsed (no record object outlives its step); raises _RecheckFrom where a chunk fails."""
    event_ids_field, label_field, _ = fields
    prefix = _json_array_prefix(file, array_key)
    done = 0
    with _open(file) as handle:
        items = ijson.items(_DepthBoundedReader(handle, file), prefix, use_float=True)
        while True:
            try:
                chunk = list(itertools.islice(items, chunk_records))
                if not chunk:
                    break
                events = list(map(itemgetter(event_ids_field), chunk))
                labels = list(map(dict.get, chunk, itertools.repeat(label_field), itertools.repeat(0)))
                arrays = _arrays_at_c_speed(events, labels, np.arange(done + 1, done + 1 + len(chunk)),
                                            vocab_size) if _extras_valid(chunk, event_ids_field) else None
            except (KeyError, TypeError, ijson.JSONError):  # not an object, a missing field, malformed JSON
                arrays = None
            if arrays is None:
                raise _RecheckFrom(done)
            yield arrays
            done += len(chunk)
    _check_found(file, done, prefix, array_key)


def _lines_at_c_speed(block_start: int, block: list[bytes], fmt: str, fields,
                      vocab_size) -> SessionArrays | None:
    """A block of JSONL or text lines as SessionArrays when every line holds a valid session, else None:
    json.loads and bytes.split run over the whole block at C speed (a blank JSONL line fails it too)."""
    event_ids_field, label_field, _ = fields
    try:
        if fmt == "text":
            if b"".join(block).translate(None, _TEXT_BYTES):
                return None  # something besides plain integers: the slow reader names it
            events = list(map(bytes.split, block))
            kept = np.flatnonzero(np.fromiter(map(len, events), np.int64, len(events)))  # blank lines skipped
            if len(kept) < len(events):
                events = [events[i] for i in kept.tolist()]
            return _arrays_at_c_speed(events, None, kept + block_start, vocab_size, tokens_are_text=True)
        lines = list(map(bytes.decode, block))
        # json.loads costs three Python calls a line; its C scanner, called directly, none
        parsed = list(map(_SCAN_JSON, lines, itertools.repeat(0)))  # a StopIteration would end the list early
        ends = list(map(len, map(str.rstrip, lines, itertools.repeat(" \t\r\n"))))  # JSON's own whitespace
        if len(parsed) < len(lines) or list(map(itemgetter(1), parsed)) != ends:
            return None  # a line that is not exactly one JSON value (or a blank one)
        items = list(map(itemgetter(0), parsed))
        events = list(map(itemgetter(event_ids_field), items))
        labels = list(map(dict.get, items, itertools.repeat(label_field), itertools.repeat(0)))
        if not _extras_valid(items, event_ids_field):
            return None
    except (ValueError, KeyError, TypeError, RecursionError):  # ValueError: malformed JSON or encoding
        return None
    return _arrays_at_c_speed(events, labels, np.arange(block_start, block_start + len(block)), vocab_size)


def _extras_valid(items, event_ids_field: str) -> bool:
    """Whether the optional "times" and "values" of these session objects are valid (the slow reader names
    what is not): the fast first pass must refuse what validate_record refuses. Where no session has them
    (the usual case), one C-speed look per field."""
    if not any(map(contains, items, itertools.repeat("times"))) and \
            not any(map(contains, items, itertools.repeat("values"))):
        return True
    for item in items:
        if isinstance(item, dict) and ("times" in item or "values" in item):
            events = len(item[event_ids_field]) if isinstance(item.get(event_ids_field), list) else -1
            try:
                checked_times("", item.get("times"), events)
                checked_values("", item.get("values"), events)
            except DataError:
                return False
    return True


def _arrays_at_c_speed(events: list, labels: list | None, indexes: np.ndarray, vocab_size: int | None,
                       tokens_are_text: bool = False) -> SessionArrays | None:
    """SessionArrays when every session of the chunk is valid, else None. No Python loop over events:
    struct.pack converts and range-checks every ID in C, and refuses floats, strings and nulls."""
    if labels is not None and (set(map(type, labels)) != {int} or not set(labels) <= {0, 1}):
        return None
    small = vocab_size is not None and vocab_size <= 2 ** 16
    try:  # an event list that is not a list fails here too: len() of a number, or struct given its items
        lengths = np.fromiter(map(len, events), np.int64, len(events))
        flat = itertools.chain.from_iterable(events)
        packed = struct.pack(f"<{int(lengths.sum())}{'H' if small else 'q'}",
                             *(map(int, flat) if tokens_are_text else flat))
    except (struct.error, TypeError, ValueError, OverflowError):
        return None
    if not lengths.all():
        return None
    tokens = np.frombuffer(packed, dtype=np.uint16 if small else np.int64)
    if (not small and tokens.min() < 0) or (vocab_size is not None and tokens.max() >= vocab_size):
        return None
    if not tokens_are_text:  # struct takes JSON true/false for 1/0: look at the sessions holding a 0 or 1
        maybe_bool = np.add.reduceat((tokens <= 1).astype(np.int32), np.cumsum(lengths) - lengths)
        if any(set(map(type, events[i])) != {int} for i in np.flatnonzero(maybe_bool).tolist()):
            return None
    return SessionArrays(tokens, lengths, np.zeros(len(events), np.uint8) if labels is None else
                         np.array(labels, dtype=np.uint8), indexes)


def _record(file: Path, index: int, item, fields, vocab_size: int | None, fmt: str) -> Record:
    """A raw item of _numbered_items checked into a Record, or DataError naming file and record."""
    if isinstance(item, _Unparsable):
        raise DataError(item.message)
    if fmt == "text":
        item = text_event_ids(file, index, item)
    return validate_record(file, index, item, fields, vocab_size, fmt)


def _records(file: Path, items, fmt: str, fields, vocab_size, skip_bad_records: bool, counters: dict):
    """The Records of (index, raw item) pairs, a bad one raised as skippable or counted and skipped."""
    for index, item in items:
        try:
            yield _record(file, index, item, fields, vocab_size, fmt)
        except DataError as error:
            if not skip_bad_records:
                error.skippable = True
                raise
            counters["bad_records"] += 1
            counters.setdefault("first_bad_record", str(error))


def _checked_arrays(file: Path, items, *checked) -> SessionArrays:
    records = list(_records(file, items, *checked))
    return SessionArrays(np.array([e for r in records for e in r.event_ids], dtype=np.int64),
                         np.array([len(r.event_ids) for r in records], dtype=np.int64),
                         np.array([r.label for r in records], dtype=np.uint8),
                         np.array([r.index for r in records], dtype=np.int64))


# How split_draws assigns sessions to the validation split and its halves. Checkpoints record it: a
# checkpoint of another scheme cannot tell which sessions it trained on.
SPLIT_SCHEME = "splitmix64-v2"


def split_draws(file: str, indexes, seed: int) -> np.ndarray:
    """One uniform draw in [0, 1) per record, a hash of (seed, file name, record index), never of the epoch:
    splitmix64, vectorised; the same function decides the split everywhere."""
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{os.path.basename(file)}".encode(), digest_size=8).digest(),
                         "little")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = np.uint64(key) + np.asarray(indexes, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


TRAIN, CALIBRATION, EVALUATION, APART = 0, 1, 2, 3   # split_classes: the sides of the split
SPLIT_BLOCK = 32   # records per draw where records overlap (data.overlap > 0): at least 8 x (overlap + 1)


def split_classes(file: str, indexes, seed: int, validation_split: float, overlap: int = 0) -> np.ndarray:
    """Per record: TRAIN, or in the validation split its CALIBRATION half (fits the thresholds) or its
    EVALUATION half (halved by another draw than the split's, so neither half scores what the other fitted),
    or APART. Records that share lines with their `overlap` neighbours on each side (overlapping windows) are
    drawn per block of consecutive records, and the first `overlap` records of a block whose side differs
    from the block before are APART (neither trained on nor validated): no line is on two sides. With
    overlap 0 every record is its own block and nothing is apart."""
    indexes = np.asarray(indexes, dtype=np.int64)
    block = max(SPLIT_BLOCK, 8 * (overlap + 1)) if overlap else 1

    def side(blocks):
        held_out = split_draws(file, blocks, seed) < validation_split
        halves = np.where(split_draws(file, blocks, seed + 1) < 0.5, CALIBRATION, EVALUATION)
        return np.where(held_out, halves, TRAIN)
    blocks = indexes // block
    classes = side(blocks)
    if overlap:
        edge = (indexes % block < overlap) & (blocks > 0)
        classes[edge & (side(np.maximum(blocks - 1, 0)) != classes)] = APART
    return classes


def split_class(file: str, index: int, seed: int, validation_split: float, overlap: int = 0) -> int:
    return int(split_classes(file, [index], seed, validation_split, overlap)[0])


def is_validation(file: str, index: int, seed: int, validation_split: float, overlap: int = 0) -> bool:
    """Whether a record is in the validation split (either half): see split_classes."""
    return split_class(file, index, seed, validation_split, overlap) in (CALIBRATION, EVALUATION)


def make_windows(event_ids: list[int], vocab_size: int, max_seq_length: int, window_context: int):
    """Session -> training samples (inputs, targets) of at most max_seq_length positions (tokens.lay_out cut
    by tokens.window_table, a later window's context targets masked): every prediction trained once."""
    laid_out, _ = lay_out(np.asarray(event_ids, dtype=np.int64), np.array([len(event_ids)]), vocab_size)
    laid_out = laid_out.tolist()
    _, begins, ends, scored = window_table(np.array([len(event_ids) + 1]), max_seq_length, window_context)
    return [(laid_out[begin:end], [IGNORE_INDEX] * (first - begin) + laid_out[first + 1:end + 1])
            for begin, end, first in zip(begins.tolist(), ends.tolist(), scored.tolist())]


def merge_counts(counts: list[dict], disjoint: bool) -> dict:
    """Combine the count() of every rank (summed over disjoint file shards); `windows_per_rank` is what
    every rank can supply."""
    world_size = len(counts)
    if not disjoint:
        return {**counts[0], "windows_per_rank": counts[0]["windows"] // world_size}
    merged = {key: sum(c[key] for c in counts) for key in ("sessions", "abnormal_skipped", "bad_records",
                                                          "windows", "tokens")}
    first_bad = (c["first_bad_record"] for c in counts if "first_bad_record" in c)
    merged["first_bad_record"] = next(first_bad, None)
    merged["seen_targets"] = sorted(set().union(*(c["seen_targets"] for c in counts)))
    merged.update(merge_co_occurrence(counts))
    merged["windows_per_rank"] = min(c["windows"] for c in counts)
    return merged


def batch_to_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's inputs and targets on `device`, as int64. A token-cache batch's targets past each row's
    length and its first `context` ones are masked here, on the device, where it costs nothing (inputs past
    a row's length never count: the LSTM is causal)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True).long()
    targets = batch["targets"].to(device, non_blocking=True).long()
    if "context" in batch:
        positions = torch.arange(targets.shape[1], device=device)
        lengths = batch["lengths"].to(device, non_blocking=True)[:, None]
        context = batch["context"].to(device, non_blocking=True)[:, None]
        targets = targets.masked_fill((positions >= lengths) | (positions < context), IGNORE_INDEX)
    return input_ids, targets


def collate(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest member: inputs with pad_id, targets with IGNORE_INDEX (never in loss or metrics)."""
    longest = max(len(inputs) for inputs, _ in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, sample_targets) in enumerate(samples):
        input_ids[row, :len(inputs)] = torch.tensor(inputs)
        targets[row, :len(sample_targets)] = torch.tensor(sample_targets)
    lengths = torch.tensor([len(inputs) for inputs, _ in samples])
    return {"input_ids": input_ids, "targets": targets, "lengths": lengths}


class SessionDataset(IterableDataset):
    """Windows of normal sessions from one side of the split, streamed, shuffled through a buffer of
    `buffer_size`, seeded by (seed, epoch, rank) so an epoch replays identically (exact mid-epoch resume).
    Ranks split the files when there are enough, else the samples, at most `samples_per_rank` each. With
    `num_workers` reader processes (each every num_workers-th file) batches are merged round-robin."""

    def __init__(self, path, vocab_size: int, split: str = "train",
                 validation_split: float = _DATA.validation_split, seed: int = _DEFAULTS.training.seed,
                 overlap: int = _DATA.overlap, max_seq_length: int = _DATA.max_seq_length,
                 window_context: int = _DATA.window_context,
                 shuffle: bool = _DEFAULTS.lazy_loading.shuffle_buffer,
                 buffer_size: int = _DEFAULTS.lazy_loading.buffer_size, rank: int = 0, world_size: int = 1,
                 samples_per_rank: int | None = None, num_workers: int = _DEFAULTS.lazy_loading.num_workers,
                 **reader_options):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split}")
        if not 0 <= window_context < max_seq_length:
            raise ValueError("window_context must be in [0, max_seq_length)")
        self.path, self.vocab_size, self.split = path, vocab_size, split
        self.validation_split, self.seed, self.overlap = validation_split, seed, overlap
        self.max_seq_length, self.window_context = max_seq_length, window_context
        self.shuffle, self.buffer_size = shuffle, max(1, buffer_size)
        self.rank, self.world_size, self.samples_per_rank = rank, world_size, samples_per_rank
        self.reader_options = reader_options
        self.files = list_data_files(path)
        self.shard_by_file = world_size > 1 and len(self.files) >= world_size
        if self.shard_by_file:
            self.files = self.files[rank::world_size]
        self.num_workers = min(num_workers, len(self.files)) if len(self.files) > 1 else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _records(self, files: list[Path] | None = None, counters: dict | None = None) -> Iterator[Record]:
        """The normal sessions of this split, in file order; tallies into `counters` when given."""
        counters = counters if counters is not None else {}
        for key in ("sessions", "abnormal_skipped", "bad_records"):
            counters.setdefault(key, 0)
        records = (record for file in (self.files if files is None else files)
                   for record in iter_sessions(file, self.vocab_size, counters=counters,
                                               **self.reader_options))
        for record in records:
            if record.label != 0:  # DeepLog learns normal behaviour only
                counters["abnormal_skipped"] += 1
                continue
            side = split_class(record.file, record.index, self.seed, self.validation_split, self.overlap)
            if self.split != "all" and (side == APART or (side != TRAIN) != (self.split == "val")):
                continue
            counters["sessions"] += 1
            yield record

    def _windows(self, files: list[Path] | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """All windows of this split, in file order, before sharding and shuffling."""
        for record in self._records(files):
            yield from make_windows(record.event_ids, self.vocab_size, self.max_seq_length,
                                    self.window_context)

    def _parallel(self, mode: str, batch_size: int = 0):
        """Items from `num_workers` reader processes, each over every num_workers-th file, merged round-robin.
        A dedicated generator keeps DataLoader from drawing on the global RNG (exact resume)."""
        loader = DataLoader(_FileShardReader(self, mode, batch_size), batch_size=None,
                            num_workers=self.num_workers, generator=torch.Generator(), prefetch_factor=4,
                            worker_init_fn=_leave_signals_to_parent)
        for item in loader:
            if isinstance(item, _Unparsable):  # re-raised here as the one-line message it was
                raise DataError(item.message)
            yield item

    def __iter__(self):
        return self._samples(self._windows(), self.samples_per_rank, f"{self.seed}:{self.epoch}:{self.rank}",
                             self.buffer_size)

    def _samples(self, windows, limit: int | None, rng_key: str, buffer_size: int):
        """This rank's share of `windows`, at most `limit`, shuffled through a buffer seeded by `rng_key`."""
        shard = windows if self.shard_by_file else \
            (s for i, s in enumerate(windows) if i % self.world_size == self.rank)
        if limit is not None:
            shard = itertools.islice(shard, limit)
        if not self.shuffle:
            yield from shard
            return
        rng = random.Random(rng_key)
        buffer = []
        for sample in shard:
            if len(buffer) < buffer_size:
                buffer.append(sample)
                continue
            slot = rng.randrange(buffer_size)
            yield buffer[slot]
            buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer

    def count(self) -> dict:
        """One pass without shuffling: sessions, windows, predicted tokens, the target IDs and which event
        types occur together (CoOccurrenceRecorder's summary)."""
        if self.num_workers:
            merged = merge_counts(list(self._parallel("count")), disjoint=True)
            merged.pop("windows_per_rank")
            return merged
        return self._count()

    def _count(self, files: list[Path] | None = None) -> dict:
        windows = tokens = 0
        seen_targets: set[int] = set()
        co_occurrence = CoOccurrenceRecorder(self.vocab_size)
        counters: dict = {}
        for record in self._records(files, counters):
            co_occurrence.add_session(record.event_ids)
            for _, targets in make_windows(record.event_ids, self.vocab_size, self.max_seq_length,
                                           self.window_context):
                windows += 1
                real = [t for t in targets if t != IGNORE_INDEX]
                tokens += len(real)
                seen_targets.update(real)
        return {**counters, "windows": windows, "tokens": tokens, "seen_targets": sorted(seen_targets),
                **co_occurrence.summary()}

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[tuple[dict, int]]:
        """Padded batches with their position: the number of batches of this epoch done after this one."""
        _, pad_id, _, _ = special_tokens(self.vocab_size)
        source = self._parallel("batches", batch_size) if self.num_workers else \
            collated(iter(self), batch_size, pad_id, skip=start_batch)
        for done, batch in enumerate(source, start=1):
            if done > start_batch:
                yield batch, done


def collated(samples, batch_size: int, pad_id: int, skip: int = 0) -> Iterator[dict | None]:
    """Batches of `batch_size` samples; the first `skip` as None (a resumed epoch only counts them)."""
    chunk, done = [], 0
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            done += 1
            yield collate(chunk, pad_id) if done > skip else None
            chunk = []
    if chunk:
        yield collate(chunk, pad_id) if done + 1 > skip else None


def _leave_signals_to_parent(_worker_id: int) -> None:
    """Ctrl-C and SIGTERM are the training process's to handle (it stops at a step boundary and then
    shuts the readers down); a reader dying of them first would turn a clean stop into a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _FileShardReader(IterableDataset):
    """In a DataLoader worker, over every num_workers-th file: padded, shuffled batches, or one count."""

    def __init__(self, dataset: SessionDataset, mode: str, batch_size: int):
        self.dataset, self.mode, self.batch_size = dataset, mode, batch_size

    def __iter__(self):
        worker = get_worker_info()
        dataset, workers = self.dataset, worker.num_workers
        files = dataset.files[worker.id::workers]
        try:
            if self.mode == "count":
                yield dataset._count(files)
                return
            limit = dataset.samples_per_rank
            if limit is not None:  # this worker's part of the rank's share
                limit = limit // workers + (worker.id < limit % workers)
            samples = dataset._samples(dataset._windows(files), limit,
                                       f"{dataset.seed}:{dataset.epoch}:{dataset.rank}:{worker.id}",
                                       max(1, dataset.buffer_size // workers))
            yield from collated(samples, self.batch_size, special_tokens(dataset.vocab_size)[1])
        except DataError as error:
            yield _Unparsable(str(error))


def describe(path, vocab_size: int | None = None, **reader_options) -> Iterator[str]:
    """One line per data file under `path` (sessions, abnormal ones, lengths, largest ID), then a total."""
    total = {"files": 0, "sessions": 0, "abnormal": 0}
    for data_file in list_data_files(path):
        sessions = abnormal = max_id = 0
        shortest, longest = None, 0
        for arrays in iter_session_arrays(data_file, vocab_size, **reader_options):
            if not len(arrays.lengths):
                continue
            sessions += len(arrays.lengths)
            abnormal += int(arrays.labels.sum())
            shortest = min(shortest or 2 ** 62, int(arrays.lengths.min()))
            longest = max(longest, int(arrays.lengths.max()))
            max_id = max(max_id, int(arrays.tokens.max()))
        labels = "no labels (DeepLog text)" if _format_of(data_file) == "text" else \
            f"{abnormal} labelled abnormal, {sessions - abnormal} normal or unlabelled"
        yield (f"{data_file}: {sessions} sessions, {labels}, length {shortest or 0}..{longest}, "
               f"largest ID {max_id}")
        total = {"files": total["files"] + 1, "sessions": total["sessions"] + sessions,
                 "abnormal": total["abnormal"] + abnormal}
    if total["files"] > 1:
        yield (f"total: {total['sessions']} sessions in {total['files']} files, "
               f"{total['abnormal']} labelled abnormal")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Validate data files and count their sessions.")
    parser.add_argument("path", help="a data file or a directory of them")
    parser.add_argument("--vocab-size", type=int, default=None, help="reject IDs >= this")
    parser.add_argument("--event-ids-field", default=_DATA.event_ids_field,
                        help="field holding the event IDs (data.event_ids_field)")
    parser.add_argument("--label-field", default=_DATA.label_field,
                        help="field holding the label (data.label_field)")
    parser.add_argument("--json-array-key", default=_DATA.json_array_key,
                        help="key of the session array in a .json object (data.json_array_key)")
    cli = parser.parse_args(argv)

    def run() -> int:
        for line in describe(cli.path, cli.vocab_size, event_ids_field=cli.event_ids_field,
                             label_field=cli.label_field, json_array_key=cli.json_array_key):
            print(line, flush=True)
        return 0
    return utils.exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
