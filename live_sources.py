"""Live detection's input: the lines of files as they grow (FollowedFile: `tail -F`) or of standard input,
turned into the Items of live_sessions by LineParser. Raw log lines go through preprocess.py's saved parser
state with the code of a whole parse (logparse; RawParser, in a worker process with detect.parse_workers);
JSON and DeepLog text lines are checked as dataset.py's readers check them.

Example (a data file of whole sessions or of event lines, read to its end):

    import logging

    from config import load_config
    from live_sources import FollowedFile, LineParser

    logger = logging.getLogger("deeplog")
    source = FollowedFile("data/sample/new/sessions.jsonl", logger, follow=False)
    source.open()
    parser = LineParser(load_config(None), None, logger)   # (a parser state: raw log lines)
    lines = source.peek(1000)                                    # (line number, text), at most 1000
    items, taken, error = parser.items([(source.path, number, text) for number, text in lines])
    source.advance(taken)                                        # its place: the first line not taken
    print(items[0], taken, error)
"""
from __future__ import annotations

import json
import os
import select
import signal
import stat
import sys
import time
from collections import Counter
from pathlib import Path

import logparse
import utils
from cache import worker_start
from config import Config, reader_options
from dataset import MAX_EVENT_ID, DataError, text_event_ids, validate_record  # the readers' own checks
from live_sessions import Item
from logparse import BAD_TIME, NO_KEY, PARSED, UNMATCHED

READ_BYTES = 1 << 20    # read from a followed file at a time


# ----------------------------------------------------------------------------- live: lines in
class FollowedFile:
    """A file read as it grows, as `tail -F` (rotation: the old one read to its end, then the new one;
    truncation: read again from its start), lines split as preprocess.py splits them. `peek` gives lines
    without moving, `advance(n)` takes the first n: the saved place is always the start of a line."""

    def __init__(self, path: str, logger, follow: bool = True):
        self.path, self.logger, self.follow = path, logger, follow
        self.handle = None
        self.identity: tuple[int, int] | None = None
        self.offset, self.line = 0, 0      # where the next line not taken starts, and its number - 1
        self.ready: list[tuple[bytes, int]] = []   # whole lines read past offset: (text, bytes with its end)
        self.buffer = b""                  # and the bytes after them: a line without its end yet
        self.ended = False                 # (not following) the end was reached
        self.rotated = False               # the path names a new file: the old one's last lines first
        self.peeked = 0                    # lines given by peek and not yet taken (one block in flight)

    def place(self) -> dict:
        device, inode = self.identity or (0, 0)
        return {"path": self.path, "device": device, "inode": inode, "offset": self.offset, "line": self.line}

    def open(self, saved: dict | None = None) -> None:
        try:
            self.handle = open(self.path, "rb")  # noqa: SIM115 (kept open while followed)
        except FileNotFoundError:
            if not self.follow:
                raise DataError(f"{self.path}: no such file") from None
            return   # not there yet: looked for again at each poll
        except OSError as error:
            raise DataError(f"{self.path}: unreadable: {error.strerror or error}") from None
        info = os.fstat(self.handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{self.path}: not a regular file; pass - to read standard input")
        self.identity = (info.st_dev, info.st_ino)
        if saved is not None and (saved["device"], saved["inode"]) == self.identity:
            if info.st_size >= saved["offset"]:
                self.offset, self.line = saved["offset"], saved["line"]
                self.handle.seek(self.offset)
            else:
                self.logger.warning(f"{self.path} is shorter than the place saved (truncated while stopped): "
                                    "read from its start")
        elif saved is not None and saved["inode"]:
            self.logger.warning(f"{self.path} is another file than the one saved (rotated while stopped): "
                                f"read from its start; the old file's lines after line {saved['line']} are "
                                "not read")

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` whole lines after those already peeked and not yet taken: (line number, text)."""
        if self.handle is None:
            self.open()
            if self.handle is None:
                return []
        if len(self.ready) - self.peeked < limit and not self.rotated:
            data = self.handle.read(READ_BYTES)
            if data:
                self.buffer += data
                self._split(final=False)
            elif self.follow:
                if not self.peeked:   # (a moved or cut file is looked at only with nothing in flight)
                    self._check_moved()
            else:
                self.ended = True
                self._split(final=True)
        return self._give(limit)

    def _give(self, limit: int) -> list[tuple[int, str]]:
        first = self.peeked
        lines = [(self.line + first + i + 1, text.decode(errors="replace"))
                 for i, (text, _) in enumerate(self.ready[first:first + limit])]
        self.peeked += len(lines)
        return lines

    def _split(self, final: bool) -> None:
        """Move the whole lines of the buffer to `ready` (and, when `final`, a last one without its end)."""
        data = self.buffer
        if final:
            end = len(data)
        else:   # a "\r" at the very end may be the first half of "\r\n": its line waits
            held = data[:-1] if data.endswith(b"\r") else data
            end = max(held.rfind(b"\n"), held.rfind(b"\r")) + 1
        if end:
            # bytes.splitlines ends lines at \n, \r\n and \r only: preprocess.py's splitter
            self.ready.extend((piece.rstrip(b"\r\n"), len(piece))
                              for piece in data[:end].splitlines(keepends=True))
            self.buffer = data[end:]

    def advance(self, count: int) -> None:
        """Take the first `count` lines peeked; the others peeked are given again by the next peek."""
        self.offset += sum(size for _, size in self.ready[:count])
        del self.ready[:count]
        self.line += count
        self.peeked -= count
        if self.rotated and not self.ready:
            self._reopen()

    def pending(self) -> bool:
        return bool(self.ready or self.buffer)

    def _check_moved(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            return    # moved away and not yet recreated: keep reading the old one
        size = os.fstat(self.handle.fileno()).st_size
        if (info.st_dev, info.st_ino) != self.identity:
            self.buffer += self.handle.read()   # what was written to the old file before it moved
            self._split(final=True)             # its last line will never be finished: taken as it is
            self.logger.info(f"{self.path}: rotated; the new file is read from its start")
            self.rotated = True
            if not self.ready:
                self._reopen()
        elif size < self.offset:
            self.logger.warning(f"{self.path}: truncated to {size} bytes; read again from its start")
            self.handle.seek(0)
            self.offset, self.line, self.buffer, self.ready = 0, 0, b"", []

    def _reopen(self) -> None:
        self.handle.close()
        self.handle, self.identity, self.rotated = None, None, False
        self.offset, self.line, self.buffer, self.ready = 0, 0, b"", []
        self.open()


class StandardInput(FollowedFile):
    """Standard input: read as it comes (never waiting past the poll interval, so idle sessions still
    close and the place is still saved), to its end. It cannot be read again: no place to save."""

    def __init__(self, logger, poll_interval: float):
        super().__init__("-", logger, follow=False)
        self.poll_interval = poll_interval
        self.handle = sys.stdin.buffer

    def open(self, saved: dict | None = None) -> None:
        return None   # (never opened by name; its place() holds no device or inode)

    def peek(self, limit: int) -> list[tuple[int, str]]:
        wait = self.poll_interval
        # a pipe gives at most its buffer (64 KiB) a read: read on while more is there, up to a block
        while len(self.ready) - self.peeked < limit and not self.ended:
            ready, _, _ = select.select([self.handle], [], [], wait)
            if not ready:
                break
            data = os.read(self.handle.fileno(), READ_BYTES)
            if data:
                self.buffer += data
            else:
                self.ended = True
            self._split(final=self.ended)
            wait = 0
        return self._give(limit)


TIMEOUT = BAD_TIME + 1   # RawParser's own status beside LineEvents': a user regex stopped on the line


def parameters_of(record) -> tuple | None:
    """A whole session's (times, values), for the parameter-value model, where it has either."""
    return (record.times, record.values) if record.times is not None or record.values is not None else None


class RawParser:
    """The part of parsing raw log lines that needs no order (it can run in a worker process): logparse's
    LineEvents through the saved parser state. Per line: LineEvents.read's tuple or (TIMEOUT, message)."""

    def __init__(self, parser_state: str):
        try:
            state = logparse.load_state(parser_state)
            self.cfg = logparse.grouping_config(state)
            if self.cfg.window is None and self.cfg.session_key is None:
                raise logparse.PreprocessError(f"{parser_state}: a parse-only state (no session key, no "
                                               "window): it cannot group lines into sessions")
            self.lines = logparse.LineEvents(self.cfg, logparse.Parser(self.cfg, state),
                                             "the session key of --parser-state", times=False)
            self.lines.values = False   # live detection has no use for them yet (values.py: batch only)
        except (logparse.PreprocessError, utils.ConfigError) as error:
            raise utils.ConfigError(str(error)) from None

    def parse(self, texts: list[str]) -> list[tuple]:
        parsed, read = [], self.lines.read
        with logparse.WATCHDOG:
            for text in texts:
                try:
                    parsed.append(read(text))
                except logparse.PatternTimeout as error:
                    parsed.append((TIMEOUT, str(error)))
        return parsed


_WORKER_PARSER: RawParser | None = None


def start_parse_worker(parent: int, parser_state: str) -> None:
    worker_start(parent)   # dies with its parent, leaves Ctrl-C to it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a service stop (the whole group) is the parent's
    global _WORKER_PARSER
    _WORKER_PARSER = RawParser(parser_state)


def parse_in_worker(texts: list[str]) -> tuple[float, list[tuple]]:
    """The parse of a share of a block, and the seconds it took (the share is set from them)."""
    started = time.perf_counter()
    parsed = _WORKER_PARSER.parse(texts)
    return time.perf_counter() - started, parsed


class LineParser:
    """Input lines -> Items: raw log lines through the saved parser state (RawParser), other lines JSON (one
    event {"session_id": ..., "event_id": N} or a whole session) or DeepLog text (a whole session)."""

    def __init__(self, config: Config, parser_state: str | None, logger):
        self.options = reader_options(config)
        self.fields = (self.options["event_ids_field"], self.options["label_field"],
                       self.options["session_id_field"])
        self.skip_bad_records = config.data.skip_bad_records
        self.counts = Counter()
        self.first_bad: str | None = None
        self.raw = RawParser(parser_state) if parser_state else None
        self.cfg = self.raw.cfg if self.raw else None
        self.windows = logparse.Windows(self.cfg.window) if self.cfg and self.cfg.window else None
        self.logger = logger

    def items(self, lines: list[tuple[str, int, str]], parsed: list[tuple] | None = None
              ) -> tuple[list[Item], int, DataError | None]:
        """The Items of (path, line number, text) lines (raw ones parsed already, or here), how many lines
        they took, and the bad line that stopped them (None: all taken, or skipped with skip_bad_records)."""
        if self.raw is not None and parsed is None:
            parsed = self.raw.parse([text for _, _, text in lines])
        if parsed is not None and self.windows is None and all(p[0] != TIMEOUT for p in parsed):
            return self._keyed_items(lines, parsed), len(lines), None
        items: list[Item] = []
        for taken, (path, number, text) in enumerate(lines):
            self.counts["lines"] += 1
            try:
                items.extend(self._raw_line(path, number, text, parsed[taken]) if parsed is not None
                             else self._line(path, number, text))
            except DataError as error:
                if not self.skip_bad_records:
                    return items, taken, error
                self.counts["bad_records"] += 1
                self.first_bad = self.first_bad or str(error)
        return items, len(lines), None

    def _keyed_items(self, lines: list[tuple[str, int, str]], parsed: list[tuple]) -> list[Item]:
        """_raw_line for a whole block grouped by session keys, in one pass (the hot path of raw logs)."""
        statuses = Counter(p[0] for p in parsed)
        self.counts["lines"] += len(lines)
        for status, name in ((UNMATCHED, "unmatched"), (NO_KEY, "lines_without_key"), (BAD_TIME, "bad_time")):
            self.counts[name] += statuses[status]
        return [("event", p[2], [p[1]], f"{path}:{number}", text, None)
                for (path, number, text), p in zip(lines, parsed) if p[0] == PARSED]

    def _line(self, path: str, number: int, text: str) -> list[Item]:
        at = f"{path}:{number}"
        stripped = text.strip()
        if not stripped:
            return []
        if stripped.startswith("{"):
            return [self._json_line(path, number, stripped, at, text)]
        record = validate_record(Path(path), number, text_event_ids(Path(path), number, stripped.split()),
                           self.fields, None, "text")
        return [Item("session", (record.session_id,), record.event_ids, at, None)]

    def _json_line(self, path: str, number: int, text: str, at: str, raw: str) -> Item:
        where = f"{path}: line {number}"
        try:
            item = json.loads(text)
        except ValueError as error:
            raise DataError(f"{where}: not JSON ({error})") from None
        options = self.options
        if isinstance(item, dict) and options["event_ids_field"] not in item and "event_id" in item:
            event, session_id = item["event_id"], item.get(options["session_id_field"])
            if not isinstance(event, int) or isinstance(event, bool) or not 0 <= event <= MAX_EVENT_ID:
                raise DataError(f"{where}: event_id must be an integer in [0, 2**63), got "
                                f"{utils.short(event)}")
            if session_id is None:
                raise DataError(f"{where}: an event needs its {options['session_id_field']!r} "
                                f"(data.session_id_field)")
            return Item("event", (str(session_id),), [event], at, raw)
        record = validate_record(Path(path), number, item, self.fields, None, "jsonl")
        return Item("session", (record.session_id,), record.event_ids, at, None, parameters_of(record))

    def _raw_line(self, path: str, number: int, text: str, parsed: tuple) -> list[Item]:
        status = parsed[0]
        if status == TIMEOUT:
            raise utils.ConfigError(f"{parsed[1]} (at {path}:{number})")
        if status != PARSED:
            self.counts[("unmatched", "lines_without_key", "bad_time")[status - 1]] += 1
            return []
        _, event, keys_or_time = parsed
        at = f"{path}:{number}"
        if self.windows is None:
            return [("event", keys_or_time, [event], at, text, None)]   # (an Item: a plain tuple is cheaper)
        try:
            joined, closed = self.windows.place(keys_or_time)
        except logparse.LineError as error:
            raise DataError(f"{path}: line {number}: {error}") from None
        # named by k (a gap skips names), where a whole parse numbers the windows it writes in turn
        names = lambda ks: tuple(f"{self.windows.kind}-window-{k + 1}" for k in ks)  # noqa: E731
        return [Item(kind, names(ks), events, at, raw) for kind, ks, events, raw in
                (("close", closed, [], None), ("event", joined, [event], text)) if ks]

    def state(self) -> dict:
        return {"counts": dict(self.counts), "first_bad": self.first_bad,
                "windows": self.windows.state() if self.windows else None}

    def restore(self, state: dict) -> None:
        self.counts, self.first_bad = Counter(state["counts"]), state["first_bad"]
        if self.windows is not None and state["windows"] is not None:
            self.windows.restore(state["windows"])
