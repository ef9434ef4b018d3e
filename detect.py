r"""Detection: a verdict per session from a trained checkpoint, on finished files or on live logs as they
grow.

Examples:

    # finished files: one JSON line per session (what `evaluate.py --detect` gives, which runs this)
    python detect.py --checkpoint outputs/checkpoints/best_model.pt data/sample/new \
        --output outputs/verdicts.jsonl
    python detect.py --checkpoint outputs/hdfs_raw/train/checkpoints/best_model.pt /logs/today/ \
        --parser-state outputs/hdfs_raw/parser_state.json --output outputs/today/verdicts.jsonl

    # live: follow a growing raw log as `tail -F` does (rotation and truncation followed); an early alert as
    # soon as a line is surprising, the session's verdict when it closes (idle for --idle-lines lines)
    python detect.py --checkpoint outputs/hdfs_raw/train/checkpoints/best_model.pt /var/log/hdfs/hdfs.log \
        --parser-state outputs/hdfs_raw/parser_state.json --follow --output /var/lib/deeplog/alerts.jsonl
    kill -TERM <pid>            # saves its place and open sessions; the same command again continues
    # event IDs as they come, on standard input (JSONL {"session_id": ..., "event_id": ...} or whole
    # sessions, or DeepLog text lines); ends at the end of the input
    tail -F events.jsonl | python detect.py --checkpoint outputs/checkpoints/best_model.pt - --follow

Output lines (JSON). A verdict, one per session: session_id, score (the share of its predictions outside the
top-k), verdict, rule, min_probability, novel_event_set, novel_event_pairs, misses (for an abnormal one: the
first --max-misses events the rule found unlikely, each with its position, event, probability, the expected
events and, from raw logs, "at" FILE:LINE and "raw") and, when abnormal, event_ids. An early alert (live):
"alert": "early", the session, the rule that fired, the event's position, event, probability, expected
events, "at" and "raw". From raw logs (--parser-state, or preprocess.py's sessions.jsonl with its
templates.json beside) a miss also has "actual_template" and "expected_templates", an alert "event_template"
and "expected_templates": the template text of each event, "<end of session>", or why it is unknown
("<unknown: no template with this ID>", "<unknown to the model, never seen in training> TEMPLATE").

An early alert fires on the first event that already makes the final verdict abnormal whatever follows: an
event below the probability bound or outside the top-g, an event set no normal training session holds, or
two types that never shared one. So an alerted session is never found normal when it closes; the end bound,
count vector and score percentiles need the whole session and speak only in its verdict.

Live scoring keeps each open session's LSTM state and steps it by its new events only, cutting sessions into
the windows of training exactly as the batch scorer does (the same numbers: tests/test_detect.py).

Restart. With --output FILE, the place in each input and the open sessions are saved to FILE.state (--state)
atomically every detect.state_interval_s seconds and on SIGTERM/SIGINT; the same command again cuts FILE back
to what that state had written and continues, so the output is an uninterrupted run's, also after kill -9
(except sessions closed by --idle-seconds). --idle-lines and --idle-seconds may change on a restart: the
open sessions are kept and the new setting closes them from then on. Standard input is not restartable.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import gc
import gzip
import itertools
import json
import logging
import math
import multiprocessing
import os
import stat
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

import calibration as cal
import logparse
import preprocess
import utils
from checkpoint import CheckpointError, co_occurrence_of, load_trained
from config import (
    Config,
    reader_options,
    resolve_config,
)
from dataset import DataError, Record, iter_sessions, list_data_files, skip_hint
from live_sessions import LiveDetector, verdict_line
from live_sources import FollowedFile, LineParser, StandardInput, parse_in_worker, start_parse_worker
from live_state import LiveState
from rules import RULES, CoOccurrence, anomaly_scores, miss_bounds, verdicts
from scoring import MAX_CACHED, ChunkScorer, chunked, session_key

DEFAULT_IDLE_LINES = 100_000   # a live session no line names for this long is closed, where neither
                               # detect.idle_lines, the parser state's session_idle nor the training data's
                               # gaps say otherwise
IDLE_GAP_QUANTILE = 0.999      # derived default: this quantile of the training sessions' gaps in lines ...
IDLE_GAP_MARGIN = 2            # ... times this ...
MIN_IDLE_LINES = 100           # ... and never below this
GAP_SAMPLE_BYTES = 16 << 20    # the gaps are read from at most this much of the training data (its start)


# ----------------------------------------------------------------------------- finished files
def raw_log_records(parser_state: str, path: str) -> tuple[Iterator[Record], object]:
    """Sessions of raw log files (a file or a directory) parsed and grouped through preprocess.py's saved
    parser state, as Records with their line provenance, and the RawLines that resolves it."""
    try:
        files = logparse.input_files([path])
        logparse.load_state(parser_state)
    except logparse.PreprocessError as error:
        raise utils.ConfigError(str(error)) from None

    def records():
        try:
            for number, session in enumerate(preprocess.sessions_from_logs(parser_state, [path]), start=1):
                yield Record(path, number, str(session["session_id"]), session["event_ids"],
                             int(session.get("label", 0)), session.get("lines"))
        except logparse.PreprocessError as error:
            raise DataError(str(error)) from None

    return records(), preprocess.RawLines([str(f.resolve()) for f in files])


def score_files(model, calibration: dict, path, options: dict, rule: str, out, batch_size: int = 256,
                co_occurrence: CoOccurrence | None = None, chunk_size: int = 4096, max_misses: int = 3,
                max_cached: int = MAX_CACHED, out_name: str | None = None, records: Iterable | None = None,
                raw_lines=None, names=None) -> dict:
    """Stream sessions from `path` in chunks, one JSON line per session, each chunk flushed before the next
    is read; the "normal" and "abnormal" counts, "bad_records" and "first_bad_record". A bad record ends the
    stream after the sessions before it (PartialOutput), a failed write raises OutputFailed. `records`
    replaces reading `path`; `raw_lines` (preprocess.RawLines) names each miss's raw log line, `names`
    (preprocess.EventNames) the template text of its events (both found beside preprocess.py's sessions.jsonl
    when `records` is None)."""
    totals = Counter()
    out_name = out_name or getattr(out, "name", "the output")
    co_occurrence = co_occurrence or CoOccurrence(model.vocab_size)
    scorer = ChunkScorer(model, [calibration["top_k"], calibration["top_g"]], batch_size, co_occurrence,
                         max_cached, "detecting")
    stopped: list[DataError] = []
    counters: dict = {}
    if records is None:
        records = iter_sessions(path, None, **{**options, "counters": counters})
        raw_lines = raw_lines or preprocess.RawLines.for_sessions(path)
        names = names or preprocess.EventNames.for_sessions(path, model.vocab_size, seen_list(model))
    try:
        for chunk in chunked(_until_data_error(records, stopped), chunk_size):
            text, verdict_counts = verdict_lines(chunk, model, scorer, calibration, rule, co_occurrence,
                                                 max_misses, raw_lines, names)
            try:   # counted while a stop signal still waits: the count always matches the output
                write_chunk(out, text, then=lambda counts=verdict_counts: totals.update(counts))
            except OSError as error:
                raise OutputFailed(error.errno, f"{out_name}: cannot write ({error.strerror or error}): the "
                                                f"output is partial, it holds the first "
                                                f"{sum(totals.values())} sessions") from None
    except utils.Stopped as signal_name:   # never inside a write: write_chunk holds signals back
        raise utils.Interrupted(f"{signal_name}: {out_name} is partial: it holds the first "
                                f"{sum(totals.values())} sessions, as whole lines",
                                utils.signal_exit_code(str(signal_name))) from None
    if stopped:
        hint = skip_hint(stopped[0], options.get("skip_bad_records", False))
        raise PartialOutput(f"{stopped[0]}; the {sum(totals.values())} sessions before it were written: the "
                            f"output is partial{hint}")
    return {**totals, "bad_records": counters.get("bad_records", 0),
            "first_bad_record": counters.get("first_bad_record")}


def verdict_lines(chunk: list, model, scorer, calibration: dict, rule: str, co_occurrence, max_misses: int,
                  raw_lines, names=None) -> tuple[str, Counter]:
    """The JSON lines of a chunk of Records, one per session, and how many of each verdict."""
    top_k = calibration["top_k"]
    bound, end_bound = miss_bounds(calibration, rule)
    distinct, scores, _ = scorer([record.event_ids for record in chunk])
    abnormal = verdicts(scores, calibration, rule)
    anomaly = anomaly_scores(scores, top_k)
    flagged = [s for s, a in zip(distinct, abnormal) if a]
    explained = model.diagnose(flagged, top_k, max_misses, log_prob_bound=bound,
                               end_log_prob_bound=end_bound) if flagged else []
    reasons = dict(zip(flagged, explained))
    index = {session: i for i, session in enumerate(distinct)}
    # the pairs behind an event_pair verdict: which two event types never shared a training session
    unseen_pairs = {s: co_occurrence.unseen_pairs(s, max_misses) for s, a, novel in
                    zip(distinct, abnormal, scores["novel_pair"]) if a and novel}
    # each session's own copy of its misses: identical sessions can come from different raw lines
    misses = [[dict(miss) for miss in reasons.get(session_key(record.event_ids), [])] for record in chunk]
    odd = parameter_findings(model, chunk, rule)
    if raw_lines is not None:
        raw_lines.annotate(list(zip((record.lines for record in chunk), misses)) +
                           [(record.lines, [found]) for record, found in zip(chunk, odd) if found])
    if names is not None:
        for miss in itertools.chain.from_iterable(misses):
            names.annotate(miss)
        for found in filter(None, odd):
            names.annotate(found, "event")
    lines, verdict_counts = [], Counter()
    for record, record_misses, found in zip(chunk, misses, odd):
        i = index[session_key(record.event_ids)]
        lines.append(verdict_line(record.session_id, record.event_ids, i, scores, abnormal, anomaly, rule,
                                  unseen_pairs.get(distinct[i], []), record_misses, found))
        verdict_counts["abnormal" if abnormal[i] or found else "normal"] += 1
    return "".join(lines), verdict_counts


def parameter_findings(model, chunk: list, rule: str) -> list[dict | None]:
    """Per Record: what the parameter-value model (values.py) found odd in its times or values, where the
    checkpoint has one, the session carries them, the rule is 'combined' and the parameter rule flags it;
    else None."""
    parameter_model = getattr(model, "parameter_model", None)
    if parameter_model is None or rule != "combined":
        return [None] * len(chunk)
    return [parameter_model.odd(record.event_ids, record.times, record.values) for record in chunk]


def seen_list(model) -> list[bool]:
    """Per event ID below vocab_size: whether the model's training had it."""
    return model.seen_events[:model.vocab_size].tolist()


def event_names(parser_state: str | None, model):
    """The template text of events for alerts, from --parser-state (None without one)."""
    if parser_state is None:
        return None
    try:
        return preprocess.EventNames.for_state(parser_state, model.vocab_size, seen_list(model))
    except logparse.PreprocessError as error:
        raise utils.ConfigError(str(error)) from None


class OutputFailed(OSError):
    """Writing the --detect output failed (a full disk): the output holds the sessions written before."""


def write_chunk(out, text: str, then=None) -> None:
    """Write `text` to `out` and flush it, to a file or pipe straight to the descriptor (a failure leaves
    nothing buffered; a regular file is cut back to whole lines). `then()` runs once it is written, before a
    stop signal held back meanwhile is let through."""
    try:
        descriptor = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO and the like: io.UnsupportedOperation
        out.write(text)
        out.flush()
        if then is not None:
            then()
        return
    out.flush()
    regular = stat.S_ISREG(os.fstat(descriptor).st_mode)
    start = os.lseek(descriptor, 0, os.SEEK_CUR) if regular else 0
    data = memoryview(text.encode())
    # a stop signal waits until the chunk is written: the output never ends in half a line (held by its
    # handler, not the mask: torch's threads would take a masked signal and the handler run mid-write)
    with utils.signals_held():
        try:
            while data:
                data = data[os.write(descriptor, data):]
            if then is not None:
                then()
        except OSError:
            if regular:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, start)
                    os.lseek(descriptor, start, os.SEEK_SET)
            raise


class PartialOutput(DataError):
    """Bad data ended --detect after some sessions were written."""


def _until_data_error(records, stopped: list):
    """The records up to the first bad one, which is kept in `stopped` instead of raised at once: the
    sessions read before it are still scored and written."""
    try:
        yield from records
    except DataError as error:
        stopped.append(error)


def _open_output(path, mode: str):
    try:
        return open(path, mode)  # noqa: SIM115 (closed by the caller)
    except OSError as error:
        raise utils.ConfigError(f"--output {path}: cannot write ({error.strerror})") from None


def run_batch(args, model, calibration: dict, co_occurrence, config: Config, logger) -> int:
    """Finished files (and evaluate.py --detect): one JSON line per session to --output (or stdout), then
    what was found and skipped."""
    ev = config.evaluation
    records, raw_lines = (raw_log_records(args.parser_state, args.detect) if args.parser_state
                          else (None, None))
    if records is None:
        list_data_files(args.detect)   # a missing input is an error before any output file exists
    out = _open_output(args.output, "w") if args.output else sys.stdout
    try:
        totals = score_files(model, calibration, args.detect, reader_options(config), ev.decision_rule,
                             out, ev.batch_size, co_occurrence, max_misses=config.detect.max_misses,
                             records=records, raw_lines=raw_lines,
                             names=event_names(args.parser_state, model),
                             out_name=f"--output {args.output}" if args.output else "stdout")
    finally:
        if args.output:
            out.close()  # nothing left to write: score_files() flushed every chunk, or cut back a failed one
    logger.info(f"Detection ({ev.decision_rule} rule) on {args.detect}: {totals.get('abnormal', 0)} "
                f"abnormal, {totals.get('normal', 0)} normal sessions")
    if config.data.skip_bad_records:
        first = f"; the first: {totals['first_bad_record']}" if totals["bad_records"] else ""
        log = logger.warning if totals["bad_records"] else logger.info
        plural = "" if totals["bad_records"] == 1 else "s"
        log(f"Skipped {totals['bad_records']} bad record{plural} (--skip-bad-records){first}")
    return 0


# ----------------------------------------------------------------------------- live: the run
# lines from the sources (live_sources), fed to the open sessions (live_sessions, their model stepped by
# live_scorer), the output written, the place saved (live_state)
def open_live_output(path: str | None, state: dict | None, state_path: Path | None):
    """The output, appended to: cut back to what the saved state had written, or new."""
    if path is None:
        return sys.stdout
    target = Path(path)
    size = target.stat().st_size if target.exists() else None
    if state is None and size:
        where = f"no state ({state_path}) says where that run ended" if state_path else \
            "standard input keeps no state to continue from"
        raise utils.ConfigError(f"--output {path} exists and holds {size} bytes, but {where}: move it away "
                                "(or give the --state of the run that wrote it)")
    if state is not None:
        if size is None or size < state["output_bytes"]:
            raise utils.ConfigError(f"--output {path} is shorter ({size or 0} bytes) than its state "
                                    f"{state_path} says was written ({state['output_bytes']}): it was "
                                    "changed; move both away to start over")
        with open(target, "r+b") as handle:
            handle.truncate(state["output_bytes"])
    return _open_output(path, "a")


class LiveRun:
    """One live detection: lines from the sources, parsed into Items, fed to the detector, the output
    written; the place saved (with the output's length) at intervals, on a stop and at the end."""

    def __init__(self, detector: LiveDetector, sources: list[FollowedFile], parser: LineParser, out,
                 state: LiveState | None, block_lines: int, pool=None):
        self.detector, self.sources, self.parser, self.out = detector, sources, parser, out
        self.state, self.block_lines, self.pool = state, block_lines, pool
        # the blocks read ahead, oldest first: (lines, the pool's parse of a share under way, the rest's
        # parse done here, its (seconds, lines)); with a pool, two, so that it never waits for this process
        self.ahead: collections.deque = collections.deque()
        self.share = 0.8    # of each block's lines parsed by the pool (adjusted as it goes: _balance)
        self.taken, self.first_at, self.last_at = 0, None, None   # lines taken, when (the speed logged)
        self.busy = 0.0   # seconds of the steps that took lines: reading, parsing, scoring, writing

    def _read_ahead(self):
        """The next block's lines, the pool's share of their parse under way, the rest done here meanwhile."""
        lines = []
        for index, source in enumerate(self.sources):
            lines.extend((index, number, text) for number, text in source.peek(self.block_lines - len(lines)))
            if len(lines) >= self.block_lines:
                break
        if not lines or self.pool is None:
            return lines, None, None, (0.0, 0)
        texts = [text for _, _, text in lines]
        cut = int(len(texts) * self.share)
        parsing = self.pool.submit(parse_in_worker, texts[:cut])
        started = time.perf_counter()
        own = self.parser.raw.parse(texts[cut:])
        return lines, parsing, own, (time.perf_counter() - started, len(texts) - cut)

    def step(self) -> int:
        """Score the lines that have come (at most block_lines), write what they brought; the number of
        lines taken. With a pool, the next block is sent to it before this one's parse is waited for."""
        began = time.monotonic()
        if not self.ahead:
            self.ahead.append(self._read_ahead())
        if self.pool is not None and self.ahead[-1][0]:
            self.ahead.append(self._read_ahead())
        lines, parsing, own, own_parse = self.ahead.popleft()
        parsed, pool_parse = None, None
        waited = time.monotonic()
        if parsing is not None:
            pool_parse, parsed = parsing.result()
            pool_parse = (pool_parse, len(parsed))
            parsed += own
        waited = time.monotonic() - waited
        items, taken, error = self.parser.items([(self.sources[i].path, n, t) for i, n, t in lines], parsed)
        texts = self.detector.feed(items) + self.detector.close_idle(time.time())
        self.write(texts)
        for index, count in Counter(i for i, _, _ in lines[:taken]).items():
            self.sources[index].advance(count)
        if error is not None:
            self.ahead.clear()
            self.save()
            hint = skip_hint(error, False)
            raise DataError(f"{error}; the lines before it are scored and the place saved{hint}")
        if taken:
            self.first_at = self.first_at or began
            self.last_at, self.taken = time.monotonic(), self.taken + taken
            self.busy += self.last_at - began
        if pool_parse is not None and lines:
            self._balance(pool_parse, own_parse, time.monotonic() - began - waited, len(lines))
        return taken

    def _balance(self, pool_parse: tuple, own_parse: tuple, step_seconds: float, lines: int) -> None:
        """The pool's share of the next blocks, so that its parse takes as long as this process's step:
        share x pool = rest + (1 - share) x own, per line."""
        per_line = lambda part: part[0] / part[1] if part[1] else None  # noqa: E731
        pool, own = per_line(pool_parse), per_line(own_parse)
        own = pool if own is None else own
        if pool is None or own is None:
            return
        rest = max(0.0, step_seconds - own_parse[0]) / lines   # scoring, writing, reading
        target = min(1.0, max(0.0, (rest + own) / (pool + own)))
        self.share = 0.7 * self.share + 0.3 * target

    def speed(self) -> str:
        """The lines taken per second of work: time spent waiting for input (a quiet log) is left out."""
        if not self.taken or self.busy <= 0:
            return ""
        span = self.last_at - self.first_at
        return (f"; {self.taken:,} lines in {self.busy:.1f} s of reading, parsing and scoring ({span:.1f} s "
                f"from the first read to the last scored, waiting for input included): "
                f"{self.taken / self.busy:,.0f} lines/s")

    def finished(self) -> bool:
        return not self.ahead and all(s.ended and not s.pending() for s in self.sources)

    def write(self, texts: list[str]) -> None:
        if texts:
            write_chunk(self.out, "".join(texts))

    def save(self) -> None:
        if self.state is None:
            return
        self.out.flush()
        os.fsync(self.out.fileno())   # the lines the state counts are on disk before the state says so
        self.state.save(self.detector, self.sources, self.parser, os.fstat(self.out.fileno()).st_size)

    def run(self, stop: utils.StopSignal, interval: float, poll: float) -> None:
        saved_at = time.monotonic()
        while True:
            taken = self.step()
            if stop.received:
                self.save()
                where = f"; the place and {len(self.detector.open)} open sessions are saved in " \
                        f"{self.state.path}: the same command continues" if self.state else ""
                raise utils.Interrupted(f"{stop.received}{where}", stop.exit_code)
            if self.finished():
                self.write(self.detector.close_all())
                self.save()
                return
            if time.monotonic() - saved_at >= interval:
                self.save()
                saved_at = time.monotonic()
            if taken == 0:
                time.sleep(poll)


# ----------------------------------------------------------------------------- live: when a session is idle
def _add_gaps(gaps: Counter, line: bytes) -> None:
    """Count the gaps of one JSONL session line's "lines" runs ([[file index, first line, count], ...]);
    nothing where it has none, or they are not of that form."""
    try:
        session = json.loads(line)
        runs = session.get("lines") if isinstance(session, dict) else None
        if not isinstance(runs, list):
            return
        found, ones, previous = [], 0, None
        for index, first, count in runs:
            if not (type(index) is int and type(first) is int and type(count) is int and count >= 1):
                return
            if previous is not None and previous[0] == index and first > previous[1]:
                found.append(first - previous[1])
            previous = (index, first + count - 1)
            ones += count - 1   # (within a run: the next line each)
    except (ValueError, TypeError):
        return
    gaps.update(found)
    if ones:
        gaps[1] += ones


def session_gaps(path, budget: int = GAP_SAMPLE_BYTES) -> Counter:
    """How often each gap in lines (1: the next line) lies between consecutive events of one session, from
    the line positions preprocess.py writes with each session ("lines": [[file index, first line, count],
    ...]) in the JSONL files of `path` (a file or a directory), their first `budget` bytes. Two events in
    different files leave their gap out (the files' lengths are not known here). Empty where no session has
    line positions (data not written by preprocess.py) or none has two events."""
    gaps: Counter = Counter()
    try:
        files = [f for f in list_data_files(path) if f.name.endswith((".jsonl", ".jsonl.gz"))]
    except (DataError, OSError):
        return gaps
    for file in files:
        try:
            with (gzip.open if file.name.endswith(".gz") else open)(file, "rb") as handle:
                for line in handle:
                    budget -= len(line)
                    _add_gaps(gaps, line)
                    if budget <= 0:
                        return gaps
        except (OSError, EOFError, zlib.error):
            continue
    return gaps


def keyed_share(path: Path) -> float | None:
    """The share of a parse's lines that named a session, from the sources.json preprocess.py wrote beside
    its sessions (`path`: the sessions file or its folder); None where there is none, or it does not say."""
    folder = path if path.is_dir() else path.parent
    try:
        stats = json.loads((folder / "sources.json").read_text())["stats"]
        keyed = stats["parsed"] - stats["bad_time"] - stats["lines_without_key"]
        share = keyed / stats["lines"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return share if 0 < share <= 1 else None


def gap_quantile(gaps: Counter, quantile: float) -> int:
    """The smallest gap at or above which lies `quantile` of the counted gaps (at least one gap)."""
    wanted, seen = quantile * sum(gaps.values()), 0
    for gap in sorted(gaps):
        seen += gaps[gap]
        if seen >= wanted:
            return gap
    return max(gaps)


def live_idle_lines(config: Config, parser: LineParser, parser_state: str | None) -> tuple[int | None, str]:
    """The live idle_lines and where it comes from: detect.idle_lines (--idle-lines) where given; with
    window grouping none (a window closes when a line past it comes); else the parser state's
    session_idle (the grouping training had); else derived from the training data's own gaps, where it
    holds preprocess.py's line positions (data.preprocessed_dir of the checkpoint, else the sessions.jsonl
    beside the parser state): the IDLE_GAP_QUANTILE of the gaps in lines between a session's consecutive
    events, times IDLE_GAP_MARGIN, at least MIN_IDLE_LINES; else DEFAULT_IDLE_LINES. The gaps count every
    raw line, the live clock only the lines that name a session: they are scaled by the share of such lines
    in the parse (its sources.json), or left as they are (longer) where it does not say."""
    if config.detect.idle_lines is not None:
        return config.detect.idle_lines, "detect.idle_lines"
    if parser.windows is not None:
        return None, "window grouping"
    if parser.cfg is not None and parser.cfg.session_idle:
        return parser.cfg.session_idle, "the parser state's session_idle"
    places = [config.data.preprocessed_dir]
    if parser_state:
        places.append(str(Path(parser_state).resolve().parent / "sessions.jsonl"))
    looked = {}
    for place in places:
        path = Path(place).resolve()
        if path in looked or not path.exists():
            continue
        looked[path] = place
        gaps = session_gaps(path)
        if gaps:
            high, share = gap_quantile(gaps, IDLE_GAP_QUANTILE), keyed_share(path)
            value = max(MIN_IDLE_LINES, math.ceil(high * (share or 1) * IDLE_GAP_MARGIN))
            scaled = f" x {share:.2f} (the share of lines naming a session)" if share else ""
            return value, (f"derived from the training data: {IDLE_GAP_QUANTILE:.1%} of the "
                           f"{sum(gaps.values()):,} gaps between a session's consecutive lines in {place} "
                           f"are at most {high:,} lines;{scaled} x {IDLE_GAP_MARGIN}, at least "
                           f"{MIN_IDLE_LINES:,}")
    where = " or ".join(looked.values()) or " or ".join(places) + " (not found)"
    return DEFAULT_IDLE_LINES, (f"the default: the training data ({where}) holds no line positions of "
                                f"sessions to derive it from (preprocess.py's \"lines\")")


def idle_text(idle_lines: int | None, idle_seconds: float | None) -> str:
    return f"{f'{idle_lines:,}' if idle_lines else 'no limit of'} idle lines" \
        f"{f', {idle_seconds:g} idle seconds' if idle_seconds else ''}"


def live_identity(args, rule: str, detect_config) -> dict:
    """What a saved state must share with the run that goes on from it (live_state.CHANGEABLE aside)."""
    resolved = lambda path: None if path is None else str(Path(path).resolve())  # noqa: E731
    return {"checkpoint": resolved(args.checkpoint), "inputs": [resolved(p) for p in args.paths],
            "parser_state": resolved(args.parser_state), "calibration": resolved(args.calibration),
            "rule": rule, "output": resolved(args.output),
            "idle_lines": detect_config.idle_lines, "idle_seconds": detect_config.idle_seconds,
            "max_session_events": detect_config.max_session_events}


def run_live(args, model, calibration: dict, co_occurrence, config: Config, stop: utils.StopSignal,
             logger) -> int:
    """--follow: score lines as they come, until a stop signal (files) or the end of standard input."""
    dc, rule = config.detect, config.evaluation.decision_rule
    parser = LineParser(config, args.parser_state, logger)
    dc.idle_lines, idle_from = live_idle_lines(config, parser, args.parser_state)
    if "-" in args.paths and len(args.paths) > 1:
        raise utils.ConfigError("standard input (-) is read alone: give it as the only PATH")
    state_path = Path(args.state) if args.state else Path(args.output + ".state") if args.output else None
    if args.paths == ["-"]:
        state_path = None
    state = LiveState(state_path, live_identity(args, rule, dc)) if state_path else None
    lock = out = pool = run = None
    try:   # the lock released, the pool ended and the output closed whatever stops the run, setup included
        if state_path is not None:   # one detector per state: a second one on it is refused, naming the first
            with utils.signals_held():   # (a stop meanwhile comes inside the try, once the lock is ours)
                lock = utils.OutputLock(state_path.parent, logger, "--output (or --state)",
                                        f".{state_path.name}.lock")
        detector = LiveDetector(model.cpu(), calibration, rule, co_occurrence, dc.idle_lines, dc.idle_seconds,
                                dc.max_session_events, dc.max_misses, dc.prefix_nodes,
                                event_names(args.parser_state, model))
        saved = state.load(detector.scorer.columns, model.state_names) if state else None
        sources = [StandardInput(logger, dc.poll_interval_s)] if args.paths == ["-"] else \
            [FollowedFile(path, logger) for path in args.paths]
        for index, source in enumerate(sources):
            source.open(saved["sources"][index] if saved else None)
        if saved:
            detector.load_state_dict(saved["detector"])
            parser.restore(saved["parser"])
            logger.info(f"Continuing from {state_path}: {len(detector.open)} open sessions, "
                        f"{', '.join(f'{s.path} line {s.line}' for s in sources)}")
        out = open_live_output(args.output, saved, state_path)
        if saved and state.changed(saved):   # kept open, closed by the new setting from now on
            before = saved["identity"]
            kept = len(detector.open)
            closed = detector.close_idle_lines()   # (those already idle by it: now, not at the next line)
            if closed:
                write_chunk(out, "".join(closed))
            was, now = (idle_text(before.get("idle_lines"), before.get("idle_seconds")),
                        idle_text(dc.idle_lines, dc.idle_seconds))
            logger.info(f"The idle setting changed from {was} to {now}: "
                        f"the {kept:,} open sessions saved are kept and close by the new setting from now on "
                        f"({kept - len(detector.open):,} of them already idle by it closed now)")
        if parser.raw is not None and dc.parse_workers:
            pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("fork"), initializer=start_parse_worker,
                initargs=(os.getpid(), args.parser_state))
        run = LiveRun(detector, sources, parser, out, state, dc.block_lines, pool)
        logger.info(f"Live detection ({rule} rule) on {', '.join(args.paths)}: sessions close after "
                    f"{idle_text(dc.idle_lines, dc.idle_seconds)}"
                    f"{f', {dc.max_session_events} events' if dc.max_session_events else ''} (idle lines: "
                    f"{idle_from})")
        # The cycle collector would rescan every open session again and again: what is alive now is set
        # aside and old generations collected ten times more rarely (lines hold no cycles): 35-47k -> 44-57k
        # lines/s.
        gc.freeze()
        gc.set_threshold(700, 100, 1000)
        stop.raise_now = False   # from here a stop signal ends the loop at a step's end, with the place saved
        try:
            run.run(stop, dc.state_interval_s, dc.poll_interval_s)
        except BrokenProcessPool:
            if not stop.received:
                raise utils.ConfigError("the parsing worker process died (killed? out of memory?): the place "
                                        "of the last step is saved; run the same command again") from None
            run.save()
            raise utils.Interrupted(f"{stop.received}; the place is saved in {state_path}",
                                    stop.exit_code) from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if lock is not None:
            lock.release()
        if run is not None:
            log_live_totals(detector, parser, run.speed(), logger)
        if out is not None and out is not sys.stdout:
            out.close()
    return 0


def log_live_totals(detector: LiveDetector, parser: LineParser, speed: str, logger) -> None:
    totals, counts = detector.totals, parser.counts
    skipped = ", ".join(f"{counts[name]:,} {name.replace('_', ' ')}" for name in
                        ("unmatched", "lines_without_key", "bad_time", "bad_records") if counts[name])
    logger.info(f"Live detection: {counts['lines']:,} lines, {totals['early_alerts']:,} early alerts, "
                f"{totals['abnormal']:,} abnormal and {totals['normal']:,} normal sessions closed, "
                f"{len(detector.open):,} open{f'; skipped: {skipped}' if skipped else ''}{speed}")
    if parser.first_bad:
        logger.warning(f"The first bad record skipped: {parser.first_bad}")


# ----------------------------------------------------------------------------- entry point
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint written by train.py")
    add("paths", nargs="+", metavar="PATH", help="sessions to score: a data file or directory (JSONL, JSON, "
        "DeepLog text), raw log files with --parser-state; with --follow, files to follow or - (standard "
        "input)")
    add("--output", help="write the JSON lines here (default: stdout)")
    add("--follow", action="store_true", help="live: read the files as they grow (tail -F), early alerts, "
        "restartable")
    add("--parser-state", help="PATH holds raw log lines, parsed and grouped through this parser_state.json "
        "of preprocess.py (the event IDs of training)")
    add("--calibration", help="use thresholds from this calibration.json (default: the checkpoint's)")
    add("--rule", choices=RULES, help="decision rule (default: evaluation.decision_rule)")
    add("--config", help="a config.yaml whose detect: section replaces the checkpoint's (prefix_nodes, "
        "parse_workers, ...); flags override it")
    add("--state", help="with --follow: where the place and open sessions are saved (default: OUTPUT.state)")
    add("--idle-lines", type=int, help="with --follow: close a session no line named for this many lines "
        "(detect.idle_lines; default: the parser state's session_idle, else derived from the training data's "
        "gaps, else 100,000); the idle settings may change on a restart")
    add("--idle-seconds", type=float, help="with --follow: ... or for this many seconds "
        "(detect.idle_seconds)")
    add("--max-session-events", type=int, help="with --follow: close a session at this many events "
        "(detect.max_session_events)")
    add("--state-interval", type=float, help="with --follow: save the place this often, in seconds "
        "(detect.state_interval_s)")
    add("--max-misses", type=int, help="misses shown per abnormal verdict (detect.max_misses)")
    add("--skip-bad-records", action="store_true", help="skip and count bad records instead of stopping "
        "(data.skip_bad_records)")
    args = parser.parse_args(argv)
    live_only = [f"--{name.replace('_', '-')}" for name in ("state", "idle_lines", "idle_seconds",
                                                            "max_session_events", "state_interval")
                 if getattr(args, name) is not None]
    if live_only and not args.follow:
        parser.error(f"{live_only[0]} is for live detection: add --follow")
    if not args.follow and (len(args.paths) > 1 or args.paths == ["-"]):
        parser.error("without --follow, give one PATH (a file or a directory); standard input needs --follow")
    return args


def main(argv=None):
    args = parse_args(argv)
    logger = logging.getLogger("deeplog")
    stop = utils.StopSignal(raise_now=True)   # until the live loop: a stop signal ends the work at once
    return utils.exit_on_user_error(lambda: run(args, stop, logger), logger)


def run(args, stop: utils.StopSignal, logger) -> int:
    utils.setup_logger(None, logger=logger)
    logger.handlers[0].setStream(sys.stderr)   # stdout may carry the JSON lines
    device = torch.device("cuda" if torch.cuda.is_available() and not args.follow else "cpu")
    model, checkpoint = load_trained(args.checkpoint, device)
    co_occurrence = co_occurrence_of(checkpoint)
    flags = (("rule", "evaluation.decision_rule"), ("idle_lines", "detect.idle_lines"),
             ("idle_seconds", "detect.idle_seconds"), ("max_misses", "detect.max_misses"),
             ("max_session_events", "detect.max_session_events"),
             ("state_interval", "detect.state_interval_s"))
    config = resolve_config(args.config, [(f"--{flag.replace('_', '-')}", {dotted: getattr(args, flag)})
                                          for flag, dotted in flags], stored=checkpoint["config"],
                            sections=("detect",))
    config.data.skip_bad_records = config.data.skip_bad_records or args.skip_bad_records
    calibration = cal.load_calibration(args.calibration) if args.calibration else \
        checkpoint.get("calibration")
    if calibration is None:
        raise CheckpointError(f"{args.checkpoint}: holds no calibration (its training was stopped "
                                    "before the end, or ran with evaluate_after_training false): calibrate "
                                    "with evaluate.py --calibrate-on DIR, then --calibration")
    if args.follow:
        # one thread: a live step scores a few thousand rows at most, where waking a second thread costs
        # more than it brings (60 ms instead of 2 ms a step beside another busy process, measured)
        torch.set_num_threads(1)
        return run_live(args, model, calibration, co_occurrence, config, stop, logger)
    args.detect = args.paths[0]
    return run_batch(args, model, calibration, co_occurrence, config, logger)


if __name__ == "__main__":
    sys.exit(main())
