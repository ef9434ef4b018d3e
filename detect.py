r"""Detection: a verdict per session from a trained checkpoint, on finished files or on live logs as they
grow.

Examples:

    # finished files: one JSON line per session (what `evaluate.py --detect` gives, which runs this)
    python detect.py --checkpoint outputs/checkpoints/best_model.pt data/sample/sessions.jsonl \
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
top-k), verdict ("normal"/"abnormal"), rule, min_probability, novel_event_set, novel_event_pairs, misses
(for an abnormal one: the first --max-misses events the rule found unlikely, each with its position, the
actual event, its probability, the events the model expected and, from raw logs, "at" FILE:LINE and "raw",
the log line) and, when abnormal, event_ids. An early alert (live mode): "alert": "early", the session, the
rule that fired, the event's position, the event, its probability, the expected events, "at" and "raw".

What an early alert promises: the rules of the calibrated decision rule, applied as far as the session has
gone, where what has gone cannot be undone later: an event less likely than the probability bound (an event
never seen in training counts as the verdict counts it), an event outside the top-g, a set of event types
that no normal training session holds as a subset (so the final set cannot be one of theirs), or two types
that never shared a training session. Each of them makes the final verdict abnormal: an alerted session is
never found normal when it closes. The end-of-session bound, the count vector and the score percentiles need
the whole session and speak only in its verdict. One early alert per session: its first such event.

Live scoring. Each open session keeps its LSTM state; the lines that came since the last step are scored
together, each session stepped by its new events only, so a line costs the same however long its session is.
Sessions are cut into the windows of training (data.max_seq_length, data.window_context) exactly as the
batch scorer cuts them: the numbers are the batch scorer's (tests/test_detect.py).

Restart. With --output FILE, the place in each input (path, inode, offset, line) and the open sessions are
saved to FILE.state (--state) atomically every detect.state_interval_s seconds and on SIGTERM/SIGINT; the
same command again truncates FILE back to what that state had written and continues from there, so the
output is the one an uninterrupted run writes, also after kill -9. (Sessions closed by --idle-seconds depend
on the clock and are the exception.) Standard input cannot be re-read: it is not restartable.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import gc
import json
import logging
import math
import os
import select
import signal
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import calibration as cal
import utils
from checkpoint import CheckpointError
from config import Config, check_values, config_from_dict, load_config, reader_options, set_value
from dataset import MAX_EVENT_ID, DataError, Record, iter_sessions, skip_hint
from evaluate import MAX_CACHED, ChunkScorer, chunked, known_co_occurrence, load_model, session_key
from model import LOGIT_BUDGET, DeepLog
from rules import RULES, CoOccurrence, anomaly_scores, miss_bounds, verdicts

MIN_ROWS = 8            # LSTM and head batches are padded to this many rows: below it the CPU kernels round
                        # differently (one row takes another path), so a session's numbers would depend on
                        # which others came with it; with it they do not, and a restart repeats a run exactly
DEFAULT_IDLE_LINES = 100_000   # a live session no line names for this long is closed (else detect.idle_lines)
READ_BYTES = 1 << 20    # read from a followed file at a time
STATE_FORMAT = "deeplog-detect-state"
STATE_VERSION = 2   # 2: the open sessions as flat tensors


# ----------------------------------------------------------------------------- finished files
def raw_log_records(parser_state: str, path: str) -> tuple[Iterator[Record], object]:
    """Sessions of raw log files (a file or a directory) parsed and grouped through preprocess.py's saved
    parser state, as Records with their line provenance, and the RawLines that resolves it."""
    import preprocess  # only this path needs Drain3

    try:
        files = preprocess.input_files([path])
        preprocess.load_state(parser_state)
    except preprocess.PreprocessError as error:
        raise utils.ConfigError(str(error)) from None

    def records():
        try:
            for number, session in enumerate(preprocess.sessions_from_logs(parser_state, [path]), start=1):
                yield Record(path, number, str(session["session_id"]), session["event_ids"],
                             int(session.get("label", 0)), session.get("lines"))
        except preprocess.PreprocessError as error:
            raise DataError(str(error)) from None

    return records(), preprocess.RawLines([str(f.resolve()) for f in files])


def score_files(model, calibration: dict, path, options: dict, rule: str, out, batch_size: int = 256,
                co_occurrence: CoOccurrence | None = None, chunk_size: int = 4096, max_misses: int = 3,
                max_cached: int = MAX_CACHED, out_name: str | None = None, records: Iterable | None = None,
                raw_lines=None) -> dict:
    """Stream sessions from `path` in chunks and write one JSON line per session, each chunk flushed
    before the next is read. Memory holds one chunk and the score cache. Returns the number of "normal"
    and "abnormal" verdicts and, as the reader counted them, the "bad_records" skipped (with
    skip_bad_records) and the "first_bad_record"'s message (None when none was skipped).

    A bad record (without skip_bad_records) ends the stream: the sessions before it are written first, then
    PartialOutput says how many. A failed write (a full disk) raises OutputFailed naming `out_name` and
    the cause, and saying how many sessions the output holds: whole lines only (see write_chunk).
    `records` replaces reading `path` (raw logs through preprocess.py); with `raw_lines` (a
    preprocess.RawLines, or the one of a sources.json next to `path`), each miss of a session from
    preprocess.py names its raw log line ("at", "raw")."""
    totals = Counter()
    out_name = out_name or getattr(out, "name", "the output")
    co_occurrence = co_occurrence or CoOccurrence(model.vocab_size)
    scorer = ChunkScorer(model, [calibration["top_k"], calibration["top_g"]], batch_size, co_occurrence,
                         max_cached, "detecting")
    stopped: list[DataError] = []
    counters: dict = {}
    if records is None:
        records = iter_sessions(path, None, **{**options, "counters": counters})
        import preprocess  # knows the provenance format of the sessions it writes
        raw_lines = raw_lines or preprocess.RawLines.for_sessions(path)
    try:
        for chunk in chunked(_until_data_error(records, stopped), chunk_size):
            text, verdict_counts = verdict_lines(chunk, model, scorer, calibration, rule, co_occurrence,
                                                 max_misses, raw_lines)
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
                  raw_lines) -> tuple[str, Counter]:
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
    if raw_lines is not None:
        raw_lines.annotate(list(zip((record.lines for record in chunk), misses)))
    lines, verdict_counts = [], Counter()
    for record, record_misses in zip(chunk, misses):
        i = index[session_key(record.event_ids)]
        lines.append(verdict_line(record.session_id, record.event_ids, i, scores, abnormal, anomaly, rule,
                                  unseen_pairs.get(distinct[i], []), record_misses))
        verdict_counts["abnormal" if abnormal[i] else "normal"] += 1
    return "".join(lines), verdict_counts


def verdict_line(session_id: str, events, i: int, scores: dict, abnormal: np.ndarray, anomaly: np.ndarray,
                 rule: str, unseen_pairs: list, misses: list) -> str:
    """One session's verdict as a JSON line, the same in batch and live detection. An abnormal one also
    carries its event IDs, so that an operator can hand it back as normal (train.py --update --feedback)."""
    flagged = bool(abnormal[i])
    return json.dumps({
        "session_id": session_id, "score": round(float(anomaly[i]), 6),
        "verdict": "abnormal" if flagged else "normal", "rule": rule,
        "min_probability": float(math.exp(scores["min_log_prob"][i])),
        "novel_event_set": bool(scores["novel_set"][i]), "novel_event_pairs": unseen_pairs,
        "misses": misses, **({"event_ids": list(events)} if flagged else {})}) + "\n"


class OutputFailed(OSError):
    """Writing the --detect output failed (a full disk): the output holds the sessions written before."""


def write_chunk(out, text: str, then=None) -> None:
    """Write `text` to `out` and flush it. To a file or pipe it goes straight to the file descriptor, so that
    a failure leaves nothing in Python's buffer to be written when the file is closed, and a regular file is
    cut back to its length before this chunk: the output then holds whole lines only, the earlier chunks.
    `then()` runs once the text is written, before a stop signal held back meanwhile is let through (a
    count of what was written then never misses the last chunk)."""
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
    # a stop signal waits until the chunk is written: the output never ends in half a line
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
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
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class PartialOutput(DataError):
    """Bad data ended --detect after some sessions were written."""


def _until_data_error(records, stopped: list):
    """The records up to the first bad one, which is kept in `stopped` instead of raised at once: the
    sessions read before it are still scored and written."""
    try:
        yield from records
    except DataError as error:
        stopped.append(error)




def run_batch(args, model, calibration: dict, co_occurrence, config: Config, logger) -> int:
    """Finished files (and evaluate.py --detect): one JSON line per session to --output (or stdout), then
    what was found and skipped."""
    ev = config.evaluation
    try:
        out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115 (closed below, not stdout)
    except OSError as error:
        raise utils.ConfigError(f"--output {args.output}: cannot write ({error.strerror})") from None
    records, raw_lines = (raw_log_records(args.parser_state, args.detect) if args.parser_state
                          else (None, None))
    try:
        totals = score_files(model, calibration, args.detect, reader_options(config), ev.decision_rule,
                             out, ev.batch_size, co_occurrence, max_misses=config.detect.max_misses,
                             records=records, raw_lines=raw_lines,
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




# ----------------------------------------------------------------------------- live: the model, stepped
class Scored(NamedTuple):
    """The predictions a step scored, one row each: the session's slot, the position (0 = its first event, n =
    its end), the actual event's raw ID, its rank and log-probability; `expected` holds the model's top-k
    events of the watched rows (row index -> IDs, best first)."""
    slot: np.ndarray
    position: np.ndarray
    target: np.ndarray
    rank: np.ndarray
    log_prob: np.ndarray
    expected: dict


class LiveScorer:
    """The model run over many open sessions, each by the events that came since the last step. A session
    holds a slot: its LSTM state (h, c) and its score columns, the very ones DeepLog.session_scores computes
    for a whole session, so that its verdict at the end is the batch verdict. The state after the last
    input gives the prediction of the next event, scored when it comes; at a window boundary of training
    (model.window_table), a new window starts from a fresh state over its context, as the batch scorer's.
    Sessions begin in the PrefixTrie, whose states many share, and take a state of their own when they leave
    it. Rows with rank >= watch_rank, a log-probability below watch_log_prob (end_watch_log_prob for the end
    of a session) or named in a step's watch_extra get the model's top-k events ("expected")."""

    COLUMNS = {"predictions": 0.0, "max_rank": -1.0, "min_log_prob": math.inf, "min_event_log_prob": math.inf,
               "min_seen_event_log_prob": math.inf, "end_log_prob": 0.0, "loss_sum": 0.0,
               "loss_count": 0.0, "unknown": 0.0}

    def __init__(self, model: DeepLog, top_k: int, top_ks=(), watch_rank: int | None = None,
                 watch_log_prob: float | None = None, end_watch_log_prob: float | None = None,
                 prefix_nodes: int = 0):
        self.model = model.eval()
        self.top_k = top_k
        self.ks = sorted({top_k, *top_ks})
        self.watch_rank = top_k if watch_rank is None else watch_rank
        self.watch_log_prob, self.end_watch_log_prob = watch_log_prob, end_watch_log_prob
        self.start = {**self.COLUMNS, **{f"misses_at_{k}": 0.0 for k in self.ks}}
        layers, hidden = model.lstm.num_layers, model.lstm.hidden_size
        self.h, self.c = torch.zeros(layers, 0, hidden), torch.zeros(layers, 0, hidden)
        self.columns = {name: np.zeros(0) for name in self.start}
        self.node_of = np.zeros(0, dtype=np.int64)   # each slot's place in the trie; -1: a state of its own
        self.free: list[int] = []
        self.context, self.length = model.window_context, model.max_seq_length
        self.stride = self.length - self.context
        self.head_rows = max(MIN_ROWS, LOGIT_BUDGET // model.num_classes)
        self.positions = model.scoring_tokens()
        _, self.fresh = self._run(torch.full((1, 1), model.start_id), None)   # after the start token
        self.trie = PrefixTrie(self, prefix_nodes) if prefix_nodes > 1 else None

    # -------------------------------------------------------------- slots
    def _grow(self, needed: int) -> None:
        old = self.h.size(1)
        new = max(needed, 2 * old, 64)
        extra = torch.zeros(self.h.size(0), new - old, self.h.size(2))
        self.h, self.c = torch.cat([self.h, extra], 1), torch.cat([self.c, extra], 1)
        for name in self.columns:
            self.columns[name] = np.concatenate([self.columns[name], np.zeros(new - old)])
        self.node_of = np.concatenate([self.node_of, np.full(new - old, -1, dtype=np.int64)])
        self.free.extend(range(new - 1, old - 1, -1))

    def allocate(self) -> int:
        """A slot for a new session: at the trie's root (else the state after the start token), the columns
        of no prediction."""
        if not self.free:
            self._grow(self.h.size(1) + 1)
        slot = self.free.pop()
        if self.trie is not None:
            self.node_of[slot] = 0
        else:
            self.node_of[slot] = -1
            self.h[:, slot], self.c[:, slot] = self.fresh[0][:, 0], self.fresh[1][:, 0]
        for name, value in self.start.items():
            self.columns[name][slot] = value
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def _own_states(self, slots: np.ndarray) -> None:
        """Sessions leave the trie: each takes its node's state into its slot."""
        slots = np.asarray(slots, dtype=np.int64)
        on_trie = slots[self.node_of[slots] >= 0]
        if len(on_trie):
            index, nodes = torch.from_numpy(on_trie), torch.from_numpy(self.node_of[on_trie])
            self.h[:, index], self.c[:, index] = self.trie.h[:, nodes], self.trie.c[:, nodes]
            self.node_of[on_trie] = -1

    def state_of(self, slots: list[int]) -> dict:
        """The sessions' states (their node's, on the trie: restored, they go on with states of their own,
        the same numbers) and columns."""
        index = torch.tensor(slots, dtype=torch.long)
        h, c = self.h[:, index].clone(), self.c[:, index].clone()
        nodes = self.node_of[np.asarray(slots, dtype=np.int64)]
        on_trie = torch.from_numpy(nodes >= 0)
        if bool(on_trie.any()):
            h[:, on_trie] = self.trie.h[:, torch.from_numpy(nodes[nodes >= 0])]
            c[:, on_trie] = self.trie.c[:, torch.from_numpy(nodes[nodes >= 0])]
        return {"h": h, "c": c,
                "columns": {name: torch.from_numpy(column[slots].copy())
                            for name, column in self.columns.items()}}

    def restore(self, state: dict) -> list[int]:
        """Slots for saved sessions (state_of's dict), in its order."""
        slots = [self.allocate() for _ in range(state["h"].size(1))]
        self.node_of[slots] = -1
        index = torch.tensor(slots, dtype=torch.long)
        self.h[:, index], self.c[:, index] = state["h"], state["c"]
        for name, column in state["columns"].items():
            self.columns[name][slots] = column.numpy()
        return slots

    def columns_of(self, slots: list[int]) -> dict[str, np.ndarray]:
        return {name: column[slots].copy() for name, column in self.columns.items()}

    # -------------------------------------------------------------- the model
    def _run(self, inputs: torch.Tensor, state):
        rows = inputs.size(0)
        if rows < MIN_ROWS:
            pad = MIN_ROWS - rows
            inputs = torch.cat([inputs, inputs[:1].expand(pad, -1)])
            if state is not None:
                state = tuple(torch.cat([s, s[:, :1].expand(-1, pad, -1)], 1).contiguous() for s in state)
        outputs, (h, c) = self.model.advance(inputs, state)
        return outputs[:rows], (h[:, :rows], c[:, :rows])

    def token(self, event: int) -> int:
        """A raw ID as the model reads and scores it: one it never had is unk_id (as DeepLog.encode)."""
        return event if event < self.model.vocab_size else self.model.unk_id

    def _segments(self, n0: int, n1: int) -> list[tuple[int, int, bool]]:
        """The inputs n0+1..n1 (input q is the event at position q - 1) as runs [begin, end) of one window
        each: (begin, end, fresh). A run that starts a window (input q = k * stride + context, q >= length)
        is fresh: it re-reads the window's context first."""
        cuts = []
        first = max(n0 + 1, self.length)
        if first <= n1:
            q = first + (-(first - self.context)) % self.stride
            cuts = list(range(q, n1 + 1, self.stride))
        bounds = [n0 + 1, *[q for q in cuts if q > n0 + 1], n1 + 1]
        return [(a, b, a in cuts) for a, b in zip(bounds, bounds[1:])]

    @torch.no_grad()
    def advance(self, work: list[tuple[int, list, int]], watch_extra: set[tuple[int, int]]) -> Scored:
        """Score the new events of sessions and step their states: `work` holds (slot, events, n0) where
        events[n0:] came since the last step. The event at position p is scored against the prediction of
        the state after input p (the start token, then events[:p]); the rows go into the columns."""
        parts = []
        if self.trie is not None:
            work, walked = self.trie.walk(work, watch_extra)
            parts.append(walked)
        if work:
            parts.append(self._advance_own(work, watch_extra))
        scored = merge(parts)
        self._accumulate(scored.slot, scored.rank, scored.log_prob, end=False)
        return scored

    def _advance_own(self, work: list[tuple[int, list, int]], watch_extra) -> Scored:
        slots = np.array([w[0] for w in work], dtype=np.int64)
        hidden = [self.h[-1, torch.from_numpy(slots)]]       # each session's pending prediction
        meta = [(slots, np.array([w[2] for w in work], dtype=np.int64),
                 np.array([w[1][w[2]] for w in work], dtype=np.int64))]
        groups = collections.defaultdict(list)
        for slot, events, n0 in work:
            n1 = len(events)
            for begin, end, fresh in self._segments(n0, n1):
                first_input = begin - (self.context if fresh else 0)
                groups[(end - first_input, fresh)].append((slot, begin, end, end == n1 + 1, events,
                                                           first_input))
        finals = []
        for (width, fresh), segments in groups.items():
            rows = max(MIN_ROWS, self.positions // width)
            for at in range(0, len(segments), rows):
                self._run_segments(segments[at:at + rows], width, fresh, hidden, meta, finals)
        for index, h, c in finals:   # after every run: a session's runs all started from its old state
            self.h[:, index], self.c[:, index] = h, c
        slot, position, target = (np.concatenate(parts) for parts in zip(*meta))
        extra = watched_rows(slot, position, watch_extra)
        rank, log_prob, expected = self.head(torch.cat(hidden), self._targets(target), self.watch_log_prob,
                                             extra)
        return Scored(slot, position, target, rank, log_prob, expected)

    def _targets(self, events: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(events < self.model.vocab_size, events, self.model.unk_id))

    def _run_segments(self, segments, width: int, fresh: bool, hidden: list, meta: list,
                      finals: list) -> None:
        skip = self.context if fresh else 0
        inputs = torch.tensor([[self.token(e) for e in events[first - 1:end - 1]]
                               for _, _, end, _, events, first in segments], dtype=torch.long)
        index = torch.tensor([s[0] for s in segments], dtype=torch.long)
        state = None if fresh else (self.h[:, index], self.c[:, index])
        outputs, (h, c) = self._run(inputs, state)
        last = np.array([s[3] for s in segments])
        # output j of a run is the prediction of position begin + j - skip; a session's last one waits for
        # its next event (or its end)
        keep = np.ones((len(segments), width - skip), dtype=bool)
        keep[:, -1] = ~last
        hidden.append(outputs[:, skip:][torch.from_numpy(keep)])
        begins = np.array([s[1] for s in segments], dtype=np.int64)
        positions = (begins[:, None] + np.arange(width - skip))[keep]
        targets = np.fromiter((e for _, begin, end, is_last, events, _ in segments
                               for e in events[begin:end - is_last]), dtype=np.int64, count=len(positions))
        meta.append((np.repeat(index.numpy(), keep.sum(1)), positions, targets))
        if last.any():
            chosen = torch.from_numpy(last)
            finals.append((index[chosen], h[:, chosen], c[:, chosen]))

    @torch.no_grad()
    def end(self, slots: list[int], lengths: list[int]) -> Scored:
        """Score the end of these sessions (of `lengths` events: the position of their end) into their
        columns."""
        index = np.array(slots, dtype=np.int64)
        end_id = self.model.end_id
        on_trie = self.node_of[index] >= 0
        hidden = self.h[-1, torch.from_numpy(index)]
        if on_trie.any():
            nodes = torch.from_numpy(self.node_of[index[on_trie]])
            hidden[torch.from_numpy(on_trie)] = self.trie.h[-1, nodes]
        rank, log_prob, expected = self.head(hidden, torch.full((len(index),), end_id),
                                             self.end_watch_log_prob, np.zeros(len(index), dtype=bool))
        self._accumulate(index, rank, log_prob, end=True)
        return Scored(index, np.array(lengths, dtype=np.int64), np.full(len(index), end_id), rank, log_prob,
                      expected)

    def head(self, hidden: torch.Tensor, targets: torch.Tensor, watch_log_prob: float | None,
             extra: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Ranks and log-probabilities (float64) of targets from top-layer states, and the expected events of
        the watched rows, in slices of at most LOGIT_BUDGET logits (padded to MIN_ROWS)."""
        model = self.model
        ranks, log_probs, expected = [], [], {}
        for at in range(0, len(hidden), self.head_rows):
            rows = hidden[at:at + self.head_rows]
            count = len(rows)
            if count < MIN_ROWS:
                rows = torch.cat([rows, rows[:1].expand(MIN_ROWS - count, -1)])
            logits = model.head(rows)[:count]
            rank, log_prob = model.ranks_from_logits(logits.unsqueeze(1), targets[at:at + count, None])
            rank, log_prob = rank[:, 0].numpy(), log_prob[:, 0].double().numpy()
            watched = (rank >= self.watch_rank) | extra[at:at + count]
            if watch_log_prob is not None:
                watched |= log_prob < watch_log_prob
            if watched.any():
                chosen = np.flatnonzero(watched)
                top = logits[torch.from_numpy(chosen)].topk(min(self.top_k, model.num_classes),
                                                            dim=-1).indices
                expected.update(zip((chosen + at).tolist(), top.tolist()))
            ranks.append(rank)
            log_probs.append(log_prob)
        return (np.concatenate(ranks) if ranks else np.zeros(0, np.int64),
                np.concatenate(log_probs) if log_probs else np.zeros(0), expected)

    def _accumulate(self, slot, rank, log_prob, end: bool) -> None:
        """The columns of session_scores, summed in float64 as there."""
        columns, finite = self.columns, np.isfinite(log_prob)
        size = len(columns["predictions"])
        add = lambda name, weights: columns[name].__iadd__(  # noqa: E731
            np.bincount(slot, weights=weights, minlength=size))
        add("predictions", None)
        add("loss_count", finite.astype(np.float64))
        add("unknown", (~finite).astype(np.float64))
        add("loss_sum", -np.where(finite, log_prob, 0.0))
        for k in self.ks:
            add(f"misses_at_{k}", (rank >= k).astype(np.float64))
        group_extreme(columns["max_rank"], slot, rank.astype(np.float64), np.maximum)
        group_extreme(columns["min_log_prob"], slot, log_prob, np.minimum)
        if end:
            columns["end_log_prob"][slot] = log_prob
        else:
            group_extreme(columns["min_event_log_prob"], slot, log_prob, np.minimum)
            group_extreme(columns["min_seen_event_log_prob"], slot, np.where(finite, log_prob, math.inf),
                          np.minimum)


def group_extreme(column: np.ndarray, slot: np.ndarray, values: np.ndarray, extreme) -> None:
    """column[s] = extreme(column[s], the min (np.minimum) or max (np.maximum) of values where slot == s):
    np.minimum.at's result by one sort (ufunc.at took 3 ms a step, measured)."""
    if not len(slot):
        return
    order = np.lexsort((values, slot))
    slots, ordered = slot[order], values[order]
    edge = np.empty(len(slots), dtype=bool)
    if extreme is np.minimum:   # the first of each slot's run holds its least value
        edge[0] = True
        np.not_equal(slots[1:], slots[:-1], out=edge[1:])
    else:                       # the last its greatest
        edge[-1] = True
        np.not_equal(slots[1:], slots[:-1], out=edge[:-1])
    column[slots[edge]] = extreme(column[slots[edge]], ordered[edge])


def watched_rows(slot: np.ndarray, position: np.ndarray, watch_extra: set) -> np.ndarray:
    if not watch_extra:
        return np.zeros(len(slot), dtype=bool)
    return np.fromiter(((s, p) in watch_extra for s, p in zip(slot.tolist(), position.tolist())), dtype=bool,
                       count=len(slot))


def merge(parts: list[Scored]) -> Scored:
    """Scored rows of several parts as one, the expected events' row numbers moved with them."""
    if len(parts) == 1:
        return parts[0]
    expected, offset = {}, 0
    for part in parts:
        expected.update((row + offset, top) for row, top in part.expected.items())
        offset += len(part.slot)
    return Scored(*(np.concatenate([getattr(part, name) for part in parts])
                    for name in ("slot", "position", "target", "rank", "log_prob")), expected)


class PrefixTrie:
    """The LSTM states of the event prefixes sessions begin with, shared: a session starts at the root (the
    start token) and each event moves it to that event's child, whose state is computed once for every
    session that ever opens that way, and the score of an event after a prefix is kept with the prefix. Real
    logs repeat how their sessions begin (HDFS's 5,855 normal sessions: 114,561 events, 9,534 distinct
    prefixes), so most lines cost a lookup instead of an LSTM step. Bounded: at most `capacity` prefixes,
    none beyond the first window (max_seq_length - 1 events); a session whose next prefix is not kept
    leaves with its state and is stepped on its own from there. The numbers are the same either way (a
    state is a state, computed by the same kernels: see MIN_ROWS)."""

    def __init__(self, scorer: LiveScorer, capacity: int):
        self.scorer, self.capacity = scorer, capacity
        layers, hidden = scorer.fresh[0].size(0), scorer.fresh[0].size(2)
        self.h, self.c = torch.zeros(layers, capacity, hidden), torch.zeros(layers, capacity, hidden)
        self.h[:, :1], self.c[:, :1] = scorer.fresh
        self.lengths = [0]                             # events of each node's prefix
        # (node, token) -> (child node, the token's rank and log-probability after node, expected | None)
        self.edges: dict[tuple[int, int], tuple] = {}

    def walk(self, work: list[tuple[int, list, int]], watch_extra) -> tuple[list, Scored]:
        """Move the sessions on the trie by their new events, a round of one event each at a time; the work
        left for their own states (those that left, and the others), and the rows scored here."""
        node_of = self.scorer.node_of
        vocab_size, unk_id = self.scorer.model.vocab_size, self.scorer.model.unk_id
        places = node_of[np.array([w[0] for w in work], dtype=np.int64)].tolist() if work else []
        rest = [w for w, node in zip(work, places) if node < 0]
        # [slot, events, position, node]: plain lists in the loop (a numpy scalar per event costs more)
        active = [[slot, events, n0, node] for (slot, events, n0), node in zip(work, places) if node >= 0]
        rows: list[tuple] = []
        expected: dict[int, list] = {}
        leaving, edges = [], self.edges
        tried: set[tuple[int, int]] = set()   # moves _extend was asked for
        while active:   # a round: each session on the trie moves by one event
            still, pending = [], []
            for entry in active:
                slot, events, position, node = entry
                event = events[position]
                move = (node, event if event < vocab_size else unk_id)
                edge = edges.get(move)
                if edge is None:
                    if move in tried:   # no room, or past the first window: leaves, scored from its own state
                        leaving.append((slot, events, position))
                        node_of[slot] = node
                    else:               # added with the round's others at its end, taken in the next round
                        pending.append(move)
                        still.append(entry)
                    continue
                child, rank, log_prob, top = edge
                if top is None and watch_extra and (slot, position) in watch_extra:
                    top = self._expected(node)
                if top is not None:
                    expected[len(rows)] = top
                rows.append((slot, position, event, rank, log_prob))
                entry[3] = child
                if position + 1 < len(events):
                    entry[2] = position + 1
                    still.append(entry)
                else:
                    node_of[slot] = child
            if pending:
                self._extend(pending)
                tried.update(pending)
            active = still
        if leaving:
            self.scorer._own_states(np.array([slot for slot, _, _ in leaving]))
        columns = list(zip(*rows)) if rows else [[]] * 5
        scored = Scored(*(np.array(column, dtype=dtype) for column, dtype in
                          zip(columns, (np.int64, np.int64, np.int64, np.int64, np.float64))), expected)
        return rest + leaving, scored

    def _extend(self, moves: list[tuple[int, int]]) -> None:
        """Edges for the moves that may have one (room left, within the first window): the child's state in
        one batched LSTM step, and the event's score after the parent in one pass of the head."""
        wanted = [m for m in dict.fromkeys(moves) if self.lengths[m[0]] + 1 < self.scorer.length]
        wanted = wanted[:max(0, self.capacity - len(self.lengths))]
        if not wanted:
            return
        scorer = self.scorer
        nodes = torch.tensor([node for node, _ in wanted], dtype=torch.long)
        tokens = torch.tensor([tok for _, tok in wanted], dtype=torch.long)
        _, (h, c) = scorer._run(tokens[:, None], (self.h[:, nodes], self.c[:, nodes]))
        rank, log_prob, expected = scorer.head(self.h[-1, nodes], tokens, scorer.watch_log_prob,
                                               np.zeros(len(wanted), dtype=bool))
        first = len(self.lengths)
        self.h[:, first:first + len(wanted)], self.c[:, first:first + len(wanted)] = h, c
        for row, (node, tok) in enumerate(wanted):
            self.edges[(node, tok)] = (first + row, int(rank[row]), float(log_prob[row]), expected.get(row))
            self.lengths.append(self.lengths[node] + 1)

    def _expected(self, node: int) -> list[int]:
        logits = self.scorer.model.head(self.h[-1, node:node + 1].expand(MIN_ROWS, -1))[0]
        return logits.topk(min(self.scorer.top_k, self.scorer.model.num_classes)).indices.tolist()


# ----------------------------------------------------------------------------- live: sessions and verdicts
class Item(NamedTuple):
    """What one input line brings: "event" (one event for each session in keys), "session" (a whole session:
    scored and closed at once) or "close" (the grouping closes these keys: a window has passed); where it is
    (FILE:LINE) and the raw line, for alerts."""
    kind: str
    keys: tuple
    events: list
    at: str
    raw: str | None


class LiveSession:
    __slots__ = ("session_id", "slot", "first_seq", "events", "misses", "alerted", "last_seq", "last_time",
                 "types", "known", "candidates", "refs", "n0")

    def __init__(self, session_id: str, slot: int, first_seq: int):
        self.session_id, self.slot, self.first_seq = session_id, slot, first_seq
        self.events: list[int] = []
        self.misses: list[dict] = []
        self.alerted = False
        self.last_seq, self.last_time = 0, 0.0
        self.types: set[int] = set()
        self.known = 0                  # its types below vocab_size, as bits (event_pair)
        self.candidates: int | None = None   # training sets holding every type so far, as bits (event_set)
        self.refs: list | None = None   # this step's new events: (seq, at, raw) each
        self.n0 = 0                     # events before this step


class EarlyRules:
    """The parts of the decision rule that can speak before a session ends (see the module's docstring),
    with what they need: the probability bound, top_g, an index of the training sets by event type, the
    training pairs."""

    def __init__(self, calibration: dict, rule: str, co_occurrence: CoOccurrence):
        parts = calibration["combined_rules"] if rule == "combined" else [rule]
        self.event_bound = calibration["log_probability_bound"] if "probability" in parts else None
        # as the verdict: an event never seen in training counts for the bound where the calibration says so
        self.unseen_counts = calibration["log_end_probability_bound"] is None or \
            bool(calibration["unseen_events_flag"])
        self.top_g = calibration["top_g"] if "top_g" in parts else None
        # Python ints as bit sets: a session's candidates are one AND per new type, its unseen pairs one
        # AND NOT (a numpy intersection per type cost more than the LSTM, measured)
        self.sets: dict[int, int] | None = None       # event -> the training sets holding it
        if "event_set" in parts and co_occurrence.sets is not None:
            holders = collections.defaultdict(list)
            for index, types in enumerate(co_occurrence.sets):
                for event in types:
                    holders[event].append(index)
            self.sets = {event: bits(indexes) for event, indexes in holders.items()}
        self.partners: dict[int, int] | None = None   # event -> the types it shared a training session with
        if "event_pair" in parts and co_occurrence.pairs is not None:
            first, second = np.divmod(co_occurrence.pairs, co_occurrence.vocab_size)
            together = collections.defaultdict(list)
            for a, b in zip(first.tolist(), second.tolist()):
                together[a].append(b)
                together[b].append(a)
            self.partners = {event: bits(others) for event, others in together.items()}
        self.vocab_size = co_occurrence.vocab_size

    def fires(self, rank: np.ndarray, log_prob: np.ndarray) -> np.ndarray:
        """Per scored event: the rule that fires ("" none)."""
        fired = np.full(len(rank), "", dtype=object)
        if self.top_g is not None:
            fired[rank >= self.top_g] = "top_g"
        if self.event_bound is not None:
            counted = np.isfinite(log_prob) | self.unseen_counts
            fired[(log_prob < self.event_bound) & counted] = "probability"
        return fired

    def new_types(self, session: LiveSession) -> list[tuple[int, str, list | None]]:
        """The session's new events of a type it had not held, checked against the training sets and pairs:
        (position, rule, pair) where one fires; the types join the session's."""
        found = []
        if session.types.issuperset(session.events[session.n0:]):   # (most steps: nothing new, in C)
            return found
        for position in range(session.n0, len(session.events)):
            event = session.events[position]
            if event in session.types:
                continue
            if self.sets is not None and session.candidates != 0:
                holders = self.sets.get(event, 0)
                session.candidates = holders if session.candidates is None else session.candidates & holders
                if session.candidates == 0:   # no training set holds every type so far
                    found.append((position, "event_set", None))
            if self.partners is not None and 0 <= event < self.vocab_size:
                unseen = session.known & ~self.partners.get(event, 0)
                if unseen:
                    other = (unseen & -unseen).bit_length() - 1   # the lowest type it never met
                    found.append((position, "event_pair", sorted([other, event])))
                session.known |= 1 << event
            session.types.add(event)
        return found


def bits(indexes) -> int:
    """A set of small non-negative integers as the bits of one Python int."""
    flags = np.zeros(max(indexes) + 1, dtype=bool)
    flags[indexes] = True
    return int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")


class LiveDetector:
    """Open sessions, fed the Items of the lines as they come; returns the output lines each step wrote, in
    the order of the lines that caused them (so that how lines were split into steps never shows)."""

    def __init__(self, model: DeepLog, calibration: dict, rule: str, co_occurrence: CoOccurrence,
                 idle_lines: int | None, idle_seconds: float | None, max_session_events: int | None,
                 max_misses: int, prefix_nodes: int = 0):
        self.calibration, self.rule, self.co_occurrence = calibration, rule, co_occurrence
        self.top_k = calibration["top_k"]
        self.early = EarlyRules(calibration, rule, co_occurrence)
        self.count_rule = "count_vector" in (calibration["combined_rules"] if rule == "combined" else [rule])
        # a miss of the verdict's record, as DeepLog.diagnose counts one: outside the top-k or, under the
        # probability rule, below its bound (the end of session: below its own bound, where there is one)
        self.bound, end_bound = miss_bounds(calibration, rule)
        self.end_bound = None if self.bound is None else end_bound if end_bound is not None else self.bound
        self.watch_rank = min(self.top_k, self.early.top_g or self.top_k)
        bounds = [b for b in (self.bound, self.early.event_bound) if b is not None]
        self.scorer = LiveScorer(model, self.top_k, [calibration["top_g"]], self.watch_rank,
                                 max(bounds) if bounds else None, self.end_bound, prefix_nodes)
        self.idle_lines, self.idle_seconds = idle_lines, idle_seconds
        self.max_session_events, self.max_misses = max_session_events, max_misses
        self.open: collections.OrderedDict[str, LiveSession] = collections.OrderedDict()  # least recent first
        self.seq = 0                     # event lines so far: the clock of idle_lines and of the output order
        self.idle_due = 0                # the first seq at which the least recent session can be idle
        self.totals = Counter()

    # -------------------------------------------------------------- a step
    def feed(self, items: list[Item], now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        output: list[tuple] = []
        touched: dict[int, LiveSession] = {}
        closing: list[tuple[int, int, LiveSession]] = []
        opened, idle_lines, max_events = self.open, self.idle_lines, self.max_session_events
        seq, due = self.seq, self.idle_due
        for kind, keys, events, at, raw in items:
            if kind == "close":
                closing.extend((seq, 0, opened.pop(key)) for key in keys if key in opened)
                continue
            seq += 1
            if idle_lines and seq >= due:   # (due: no session can be idle before it; looked at only then)
                while opened:
                    oldest = next(iter(opened.values()))
                    if oldest.last_seq > seq - idle_lines:
                        due = oldest.last_seq + idle_lines
                        break
                    closing.append((seq, 0, opened.popitem(last=False)[1]))
                else:
                    due = seq + idle_lines
            ref = (seq, at, raw)
            for key in keys:
                session = opened.get(key) if kind == "event" else None
                if session is None:
                    session = LiveSession(key, self.scorer.allocate(), seq)
                    if kind == "event":
                        opened[key] = session
                else:
                    opened.move_to_end(key)
                if session.refs is None:
                    session.refs, session.n0 = [], len(session.events)
                    touched[id(session)] = session
                session.events += events
                if len(events) == 1:
                    session.refs.append(ref)
                else:
                    session.refs += [ref] * len(events)
                session.last_seq, session.last_time = seq, now
                if kind == "session" or (max_events and len(session.events) >= max_events):
                    if kind == "event":
                        del opened[key]
                    closing.append((seq, 2, session))
        self.seq, self.idle_due = seq, due
        if touched:
            self._score(list(touched.values()), output)
        self._close(closing, output)
        output.sort(key=lambda entry: entry[:3])
        return [entry[3] for entry in output]

    def close_idle(self, now: float) -> list[str]:
        """Close the sessions no line named for idle_seconds (wall-clock time)."""
        if not self.idle_seconds:
            return []
        idle = [key for key, session in self.open.items() if session.last_time <= now - self.idle_seconds]
        return self._closed([(self.seq, 0, self.open.pop(key)) for key in idle])

    def close_all(self) -> list[str]:
        """The end of the input: every open session, first seen first."""
        sessions = sorted(self.open.values(), key=lambda s: s.first_seq)
        self.open.clear()
        return self._closed([(self.seq, 3, session) for session in sessions])

    def _closed(self, closing) -> list[str]:
        output: list[tuple] = []
        self._close(closing, output)
        output.sort(key=lambda entry: entry[:3])
        return [entry[3] for entry in output]

    def _score(self, sessions: list[LiveSession], output: list) -> None:
        """Score the step's new events; the first misses go into each session's record, the first event
        an early rule fires on into an alert."""
        found = {id(s): self.early.new_types(s) if not s.alerted else [] for s in sessions}
        extra = {(s.slot, position) for s in sessions for position, _, _ in found[id(s)]}
        work = [(s.slot, s.events, s.n0) for s in sessions]
        scored = self.scorer.advance(work, extra)
        by_slot = {s.slot: s for s in sessions}
        rows = np.array(sorted(scored.expected), dtype=np.int64)
        if len(rows):   # the watched rows of each session in position order
            rows = rows[np.lexsort((scored.position[rows], scored.slot[rows]))]
        fired = self.early.fires(scored.rank[rows], scored.log_prob[rows]) if len(rows) else []
        row_of, alerts = {}, {}
        for row, rule in zip(rows.tolist(), fired):
            session, position = by_slot[int(scored.slot[row])], int(scored.position[row])
            row_of[(session.slot, position)] = row
            if self._is_miss(scored.rank[row], scored.log_prob[row], self.bound) and \
                    len(session.misses) < self.max_misses:
                session.misses.append(self._miss(session, scored, row, position))
            if rule and not session.alerted and id(session) not in alerts:
                alerts[id(session)] = (position, rule, None)
        for session in sessions:
            candidates = [alerts[id(session)]] if id(session) in alerts else []
            candidates += found[id(session)]
            if candidates and not session.alerted:
                position, rule, pair = min(candidates, key=lambda c: c[0])
                session.alerted = True
                row = row_of.get((session.slot, position))
                output.append(self._alert(session, position, rule, pair, scored, row))
            session.refs = None

    def _is_miss(self, rank, log_prob, bound: float | None) -> bool:
        return bool(rank >= self.top_k or (bound is not None and log_prob < bound))

    def _label(self, token: int):
        return "<end>" if token == self.scorer.model.end_id else int(token)

    def _miss(self, session: LiveSession, scored: Scored, row: int, position: int) -> dict:
        miss = {"position": position,
                "actual": session.events[position] if position < len(session.events) else "<end>",
                "probability": float(math.exp(scored.log_prob[row])),
                "expected": [self._label(t) for t in scored.expected[row]]}
        if session.refs is not None and position >= session.n0:
            _, at, raw = session.refs[position - session.n0]
            miss["at"] = at
            if raw is not None:
                miss["raw"] = raw
        return miss

    def _alert(self, session: LiveSession, position: int, rule: str, pair, scored: Scored, row) -> tuple:
        seq, at, raw = session.refs[position - session.n0]
        alert = {"alert": "early", "session_id": session.session_id, "rule": rule, "position": position,
                 "event": session.events[position]}
        if row is not None:
            alert["probability"] = float(math.exp(scored.log_prob[row]))
            alert["expected"] = [self._label(t) for t in scored.expected[row]]
        if pair is not None:
            alert["pair"] = pair
        alert["at"] = at
        if raw is not None:
            alert["raw"] = raw
        self.totals["early_alerts"] += 1
        return seq, 1, session.session_id, json.dumps(alert) + "\n"

    def _close(self, closing: list[tuple[int, int, LiveSession]], output: list) -> None:
        """Verdicts: the end of each session scored, then the rules on its whole record (verdicts,
        the batch verdict's own function)."""
        if not closing:
            return
        sessions = [entry[2] for entry in closing]
        slots = [s.slot for s in sessions]
        ended = self.scorer.end(slots, [len(s.events) for s in sessions])
        for row, session in enumerate(sessions):
            if self._is_miss(ended.rank[row], ended.log_prob[row], self.end_bound) and \
                    len(session.misses) < self.max_misses:
                session.misses.append(self._miss(session, ended, row, len(session.events)))
        scores = self.scorer.columns_of(slots)
        events = [s.events for s in sessions]
        scores["novel_set"], scores["novel_pair"] = self.co_occurrence.novel(events)
        # (the nearest training session's counts: only where the rule reads them, the search is not cheap)
        scores["count_distance"] = self.co_occurrence.distance(events) if self.count_rule else \
            np.zeros(len(events))
        abnormal = verdicts(scores, self.calibration, self.rule)
        anomaly = anomaly_scores(scores, self.top_k)
        for i, ((seq, phase, session), flagged) in enumerate(zip(closing, abnormal.tolist())):
            unseen = self.co_occurrence.unseen_pairs(session.events, self.max_misses) \
                if flagged and scores["novel_pair"][i] else []
            text = verdict_line(session.session_id, session.events, i, scores, abnormal, anomaly, self.rule,
                                unseen, session.misses if flagged else [])
            output.append((seq, phase, i, text))
            self.totals["abnormal" if flagged else "normal"] += 1
            self.scorer.release(session.slot)

    # -------------------------------------------------------------- saved and restored
    def state_dict(self) -> dict:
        """The open sessions (least recently active first) and the counters, flat: one tensor per field
        (their events end to end), so that a save costs a few objects, not a few per session."""
        sessions = list(self.open.values())
        long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        with_misses = [i for i, s in enumerate(sessions) if s.misses]
        return {"seq": self.seq, "totals": dict(self.totals), "keys": list(self.open),
                "first_seq": long([s.first_seq for s in sessions]),
                "last_seq": long([s.last_seq for s in sessions]),
                "last_time": torch.tensor([s.last_time for s in sessions], dtype=torch.float64),
                "alerted": torch.tensor([s.alerted for s in sessions], dtype=torch.bool),
                "lengths": long([len(s.events) for s in sessions]),
                "events": long([e for s in sessions for e in s.events]),
                "misses": {"sessions": with_misses, "misses": [sessions[i].misses for i in with_misses]},
                "model": self.scorer.state_of([s.slot for s in sessions])}

    def load_state_dict(self, state: dict) -> None:
        """A state_dict's sessions back (checked by state_problem first)."""
        self.seq, self.totals = state["seq"], Counter(state["totals"])
        slots = self.scorer.restore(state["model"])
        events = state["events"].tolist()
        ends = np.cumsum(state["lengths"].numpy()).tolist()
        misses = dict(zip(state["misses"]["sessions"], state["misses"]["misses"]))
        columns = zip(state["keys"], slots, state["first_seq"].tolist(), state["last_seq"].tolist(),
                      state["last_time"].tolist(), state["alerted"].tolist(), [0, *ends[:-1]], ends)
        for i, (key, slot, first_seq, last_seq, last_time, alerted, begin, end) in enumerate(columns):
            session = LiveSession(key, slot, first_seq)
            session.events, session.misses = events[begin:end], misses.get(i, [])
            session.alerted, session.last_seq, session.last_time = alerted, last_seq, last_time
            self.early.new_types(session)   # its types and candidate sets, from its events (n0 = 0)
            self.open[key] = session
        self.idle_due = 0   # looked at again on the next line


# ----------------------------------------------------------------------------- live: lines in
class FollowedFile:
    """A file read as it grows, with `tail -F` semantics: when the path names another file (rotation), the
    old one is read to its end and the new one from its start; when the file shrinks below the place read
    (truncation, copytruncate), it is read again from its start. Lines end at "\\n", "\\r\\n" or a lone "\\r",
    as preprocess.py splits them; a last line without its end waits for it. `peek` gives lines without
    moving; `advance(n)` takes the first n: the saved place is always the start of a line not yet taken."""

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

    def unpeek(self) -> None:
        self.peeked = 0

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

    def place(self) -> dict:
        return {"path": "-", "device": 0, "inode": 0, "offset": self.offset, "line": self.line}

    def open(self, saved: dict | None = None) -> None:
        return None

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
        first = self.peeked
        lines = [(self.line + first + i + 1, text.decode(errors="replace"))
                 for i, (text, _) in enumerate(self.ready[first:first + limit])]
        self.peeked += len(lines)
        return lines


class LiveWindows:
    """preprocess.py's --window grouping as lines come: window k covers [k * step, k * step + size) of the
    line count or of the time from the first line; a line joins every window that covers it, and a window
    closes when a line past its end arrives (or at the end of the input)."""

    def __init__(self, spec: str):
        import preprocess  # its checks of SIZE and STEP

        checked = preprocess.Windows(spec)
        self.kind, self.size, self.step = checked.kind, checked.size, checked.step
        self.max_time = checked.max_time
        self.origin: float | None = None
        self.last: float | None = None
        self.count = 0
        self.opened: collections.deque[int] = collections.deque()   # windows opened and not yet closed

    def state(self) -> dict:
        return {"origin": self.origin, "last": self.last, "count": self.count, "opened": list(self.opened)}

    def restore(self, state: dict) -> None:
        self.origin, self.last, self.count = state["origin"], state["last"], state["count"]
        self.opened = collections.deque(state["opened"])

    def key(self, k: int) -> str:
        return f"{self.kind}-window-{k + 1}"

    def place(self, when: float | None) -> tuple[list[str], list[str]]:
        """(windows this line joins, windows it closes)."""
        import preprocess

        if self.kind == "count":
            position = float(self.count)
        elif -self.max_time <= when <= self.max_time:
            position = when
        else:
            raise preprocess.LineError(f"--window: a time of {when:g} s is too coarse as a float for windows "
                                       f"of {min(self.size, self.step):g} s")
        self.count += 1
        if self.origin is None:
            self.origin = position
        position = max(position - self.origin, self.last if self.last is not None else 0.0)  # no step back
        self.last = position
        low = max(0, math.floor((position - self.size) / self.step) + 1)
        while low > 0 and (low - 1) * self.step + self.size > position:
            low -= 1
        high = math.floor(position / self.step)
        closed = []
        while self.opened and self.opened[0] * self.step + self.size <= position:
            closed.append(self.key(self.opened.popleft()))
        joined = [k for k in range(low, high + 1) if k * self.step + self.size > position]
        for k in joined:
            if not self.opened or k > self.opened[-1]:
                self.opened.append(k)
        return [self.key(k) for k in joined], closed


PARSED, UNMATCHED, NO_KEY, BAD_TIME, TIMEOUT = range(5)   # what RawParser.parse says of a line


class RawParser:
    """The part of parsing raw log lines that needs no order, so that it can run in a worker process while
    the scoring runs here (detect.parse_workers): the log format, the template (Drain's tree of the saved
    parser state, matching only, the masked form's ID remembered), the session keys or the time. Per line:
    (PARSED, event, keys or time) or (UNMATCHED | NO_KEY | BAD_TIME,) or (TIMEOUT, message)."""

    def __init__(self, parser_state: str):
        import preprocess

        try:
            state = preprocess.load_state(parser_state)
            self.cfg = preprocess.settings_config(None, [("parser state grouping",
                                                          state.get("grouping", {}))]).preprocess
            self.parser = preprocess.Parser(self.cfg, state)
            self.key = None
            if self.cfg.window is None and self.cfg.session_key is not None:
                regex = preprocess.compile_regex(self.cfg.session_key, "--session-key")
                self.key = preprocess.UserRegex(regex, "the session key of --parser-state")
            elif self.cfg.window is None:
                raise preprocess.PreprocessError(f"{parser_state}: a parse-only state (no session key, no "
                                                 "window): it cannot group lines into sessions")
        except (preprocess.PreprocessError, utils.ConfigError) as error:
            raise utils.ConfigError(str(error)) from None
        self._event_of: dict[str, int] = {}   # masked content -> event ID: Drain's tree walked once per form
        self._mask = fast_masker(self.parser.miner.masker)
        if self.key is not None and not self.key.regex.groups:   # findall gives the matches themselves
            self._keys = self._find_keys
        elif self.key is not None:
            self._keys = lambda text: [m.group(0) for m in self.key.finditer(text)]

    def _find_keys(self, text: str) -> list[str]:
        """The session keys of a line: UserRegex.finditer's result by findall (a key regex without groups),
        on the watchdog's budget as UserRegex's calls are."""
        import preprocess

        watch = preprocess._WATCHDOG
        watch.serial += 1
        watch.running = self.key
        try:
            return self.key.regex.findall(text)
        finally:
            watch.running = None

    def parse(self, texts: list[str]) -> list[tuple]:
        import preprocess

        parsed = []
        with preprocess._WATCHDOG:
            for text in texts:
                try:
                    parsed.append(self._line(text))
                except preprocess.PatternTimeout as error:
                    parsed.append((TIMEOUT, str(error)))
        return parsed

    def _line(self, text: str) -> tuple:
        match = self.parser.match(text)
        if match is None:
            return (UNMATCHED,)
        event = self._event(match.group("Content") or "")
        if self.key is not None:
            found = self._keys(text)
            keys = tuple(found) if len(found) < 2 else tuple(dict.fromkeys(found))   # each key once
            return (PARSED, event, keys) if keys else (NO_KEY,)
        if not self.cfg.time_field:
            return PARSED, event, None
        import preprocess

        try:
            return PARSED, event, preprocess._line_time(self.cfg, match)
        except ValueError:
            return (BAD_TIME,)

    def _event(self, content: str) -> int:
        """Parser.parse of a saved state (match only), with the masked form's ID remembered."""
        miner = self.parser.miner
        masked = self._mask(content)
        event = self._event_of.get(masked)
        if event is None:
            cluster = miner.drain.match(masked, full_search_strategy="fallback")
            event = self.parser.vocab_size if cluster is None else cluster.cluster_id - 1
            if len(self._event_of) >= 1_000_000:   # forms that never repeat: bounded memory
                self._event_of.clear()
            self._event_of[masked] = event
        return event


def fast_masker(masker):
    """drain3's masker.mask, the same result, faster: preprocess.py's built-in alternation of masks is
    applied word by word (words split at " "), each word's result remembered. None of its parts can match
    a space, and to each of its look-arounds a space reads as the start or the end of the text does, so the
    words' results joined are the whole text's (tests/test_detect.py checks it on the loghub samples); the
    words repeat (a template's own words, small numbers) where whole lines never do. Other masks (the
    user's, the run of <*>) are applied as drain3 applies them."""
    import preprocess

    prefix, suffix = masker.mask_prefix, masker.mask_suffix
    words: dict[str, str] = {}
    steps = []
    for instruction in masker.masking_instructions:
        if instruction.regex.pattern == preprocess._BUILT_IN_MASKS[0]:
            steps.append((instruction.regex.sub, prefix + instruction.mask_with + suffix))
        else:
            steps.append((instruction, None))

    def by_word(sub, replacement: str, text: str) -> str:
        if len(words) >= 1_000_000:   # words that never repeat: bounded memory
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


_WORKER_PARSER: RawParser | None = None


def _start_parse_worker(parent: int, parser_state: str) -> None:
    from cache import _worker_start  # dies with its parent, leaves Ctrl-C to it

    _worker_start(parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a service stop (the whole group) is the parent's
    global _WORKER_PARSER
    _WORKER_PARSER = RawParser(parser_state)


def _parse_in_worker(texts: list[str]) -> tuple[float, list[tuple]]:
    """The parse of a share of a block, and the seconds it took (the share is set from them)."""
    started = time.perf_counter()
    parsed = _WORKER_PARSER.parse(texts)
    return time.perf_counter() - started, parsed


class LineParser:
    """Input lines -> Items. Raw log lines go through the saved parser state (preprocess.py's: the same
    templates, masks and grouping as training; RawParser, here or in a worker process); other lines are
    JSON (one event {"session_id": ..., "event_id": N} or a whole session, as data files hold them) or
    DeepLog text (a whole session)."""

    def __init__(self, config: Config, parser_state: str | None, logger):
        self.options = reader_options(config)
        self.fields = (self.options["event_ids_field"], self.options["label_field"],
                       self.options["session_id_field"])
        self.skip_bad_records = config.data.skip_bad_records
        self.counts = Counter()
        self.first_bad: str | None = None
        self.raw = RawParser(parser_state) if parser_state else None
        self.cfg = self.raw.cfg if self.raw else None
        self.windows = LiveWindows(self.cfg.window) if self.cfg and self.cfg.window else None
        self.logger = logger

    def items(self, lines: list[tuple[str, int, str]], parsed: list[tuple] | None = None
              ) -> tuple[list[Item], int, DataError | None]:
        """The Items of (path, line number, text) lines (raw ones parsed already, or here), how many lines
        they took, and the bad line that stopped them (None: all taken). A bad line is skipped and counted
        with data.skip_bad_records."""
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
        return [("event", p[2], [p[1]], f"{path}:{number}", text)
                for (path, number, text), p in zip(lines, parsed) if p[0] == PARSED]

    def _line(self, path: str, number: int, text: str) -> list[Item]:
        at = f"{path}:{number}"
        stripped = text.strip()
        if not stripped:
            return []
        if stripped.startswith("{"):
            return [self._json_line(path, number, stripped, at, text)]
        from dataset import _text_event_ids, _validate  # the readers' own checks, message for message

        record = _validate(Path(path), number, _text_event_ids(Path(path), number, stripped.split()),
                           self.fields, None, "text")
        return [Item("session", (record.session_id,), record.event_ids, at, None)]

    def _json_line(self, path: str, number: int, text: str, at: str, raw: str) -> Item:
        from dataset import _validate

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
        record = _validate(Path(path), number, item, self.fields, None, "jsonl")
        return Item("session", (record.session_id,), record.event_ids, at, None)

    def _raw_line(self, path: str, number: int, text: str, parsed: tuple) -> list[Item]:
        import preprocess

        status = parsed[0]
        if status == TIMEOUT:
            raise utils.ConfigError(f"{parsed[1]} (at {path}:{number})")
        if status != PARSED:
            self.counts[("unmatched", "lines_without_key", "bad_time")[status - 1]] += 1
            return []
        _, event, keys_or_time = parsed
        at = f"{path}:{number}"
        if self.windows is None:
            return [("event", keys_or_time, [event], at, text)]   # (an Item: a plain tuple is cheaper)
        try:
            joined, closed = self.windows.place(keys_or_time)
        except preprocess.LineError as error:
            raise DataError(f"{path}: line {number}: {error}") from None
        return ([Item("close", tuple(closed), [], at, None)] if closed else []) + \
            ([Item("event", tuple(joined), [event], at, text)] if joined else [])

    def state(self) -> dict:
        return {"counts": dict(self.counts), "first_bad": self.first_bad,
                "windows": self.windows.state() if self.windows else None}

    def restore(self, state: dict) -> None:
        self.counts, self.first_bad = Counter(state["counts"]), state["first_bad"]
        if self.windows is not None and state["windows"] is not None:
            self.windows.restore(state["windows"])


# ----------------------------------------------------------------------------- live: the place, saved
class LiveState:
    """The state file's one owner. save() writes it atomically (torch.save of tensors and plain types, never
    pickled objects); load() reads it with weights_only and checks it before anything resumes from it: a
    damaged one, or one another command wrote, is one clear error, never a run that silently starts
    elsewhere."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity

    def save(self, detector: LiveDetector, sources: list[FollowedFile], parser: LineParser,
             output_bytes: int) -> None:
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "identity": self.identity,
                 "output_bytes": output_bytes, "sources": [source.place() for source in sources],
                 "parser": parser.state(), "detector": detector.state_dict()}
        utils.atomic_write(self.path, lambda handle: torch.save(state, handle))

    def load(self, columns) -> dict | None:
        """The saved state, checked (its sessions' score columns must be `columns`), or None if none."""
        if not self.path.exists():
            return None
        again = f"remove {self.path} (and the output it belongs to) to start over"
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (any unreadable file: one message, never a traceback)
            raise utils.ConfigError(f"{self.path}: not a readable detect.py state ({dataset_line(error)}); "
                                    f"{again}") from None
        problem = state_problem(state, self.identity, columns)
        if problem:
            raise utils.ConfigError(f"{self.path}: {problem}; {again}")
        return state


def dataset_line(error: BaseException) -> str:
    from dataset import one_line

    return one_line(error, 160)


def state_problem(state, identity: dict, columns) -> str | None:
    """What is wrong with a loaded state (None: nothing): its form, and whether this command wrote it."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return "not a detect.py state"
    if state.get("version") != STATE_VERSION:
        return f"state version {utils.short(state.get('version'))}, this detect.py reads {STATE_VERSION}"
    saved = state.get("identity")
    if not isinstance(saved, dict):
        return "no 'identity'"
    for key, value in identity.items():
        if saved.get(key) != value:
            return (f"written by a run with {key} {utils.short(saved.get(key))}, not {utils.short(value)} as "
                    f"now: give that run's command again")
    detector, sources = state.get("detector"), state.get("sources")
    checks = [("output_bytes", isinstance(state.get("output_bytes"), int) and state["output_bytes"] >= 0),
              ("sources", isinstance(sources, list) and len(sources) == len(identity["inputs"]) and all(
                  isinstance(s, dict) and all(isinstance(s.get(k), int) and s[k] >= 0
                                              for k in ("device", "inode", "offset", "line"))
                  for s in sources)),
              ("parser", isinstance(state.get("parser"), dict) and
               isinstance(state["parser"].get("counts"), dict)),
              ("detector", isinstance(detector, dict) and isinstance(detector.get("seq"), int) and
               isinstance(detector.get("totals"), dict))]
    for key, ok in checks:
        if not ok:
            return f"'{key}' is damaged"
    return sessions_problem(detector, columns)


def sessions_problem(detector: dict, columns) -> str | None:
    """What is wrong with a saved detector's open sessions (LiveDetector.state_dict, its score columns
    named `columns`), None if nothing."""
    keys = detector.get("keys")
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys) and
            len(set(keys)) == len(keys)):
        return "the open sessions' keys are damaged"
    count = len(keys)
    for name, dtype in (("first_seq", torch.long), ("last_seq", torch.long), ("last_time", torch.float64),
                        ("alerted", torch.bool), ("lengths", torch.long)):
        value = detector.get(name)
        if not (isinstance(value, torch.Tensor) and value.dtype == dtype and value.shape == (count,)):
            return f"the open sessions' {name!r} is damaged"
    lengths, events = detector["lengths"], detector.get("events")
    if not (isinstance(events, torch.Tensor) and events.dtype == torch.long and events.dim() == 1 and
            bool((lengths > 0).all()) and len(events) == int(lengths.sum()) and bool((events >= 0).all())):
        return "the open sessions' events are damaged"
    misses = detector.get("misses")
    if not (isinstance(misses, dict) and isinstance(misses.get("sessions"), list) and
            isinstance(misses.get("misses"), list) and len(misses["sessions"]) == len(misses["misses"]) and
            all(isinstance(i, int) and 0 <= i < count for i in misses["sessions"]) and
            all(isinstance(m, list) and all(isinstance(d, dict) for d in m) for m in misses["misses"])):
        return "the open sessions' misses are damaged"
    model = detector.get("model")
    if not (isinstance(model, dict) and all(isinstance(model.get(k), torch.Tensor) and model[k].dim() == 3 and
                                            model[k].size(1) == count for k in ("h", "c")) and
            isinstance(model.get("columns"), dict) and set(model["columns"]) == set(columns) and
            all(isinstance(v, torch.Tensor) and v.shape == (count,) for v in model["columns"].values())):
        return "the open sessions' model state is damaged"
    return None


def open_live_output(path: str | None, state: dict | None, state_path: Path | None):
    """The output, appended to: cut back to what the saved state had written (what came after it is
    written again from the saved place), or new."""
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
    try:
        return open(target, "a")  # noqa: SIM115 (closed by the caller)
    except OSError as error:
        raise utils.ConfigError(f"--output {path}: cannot write ({error.strerror})") from None


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

    def _read_ahead(self):
        """The next block's lines, and their parse: the share sent to the pool under way there, the rest
        done here now (while the pool works)."""
        lines = []
        for index, source in enumerate(self.sources):
            lines.extend((index, number, text) for number, text in source.peek(self.block_lines - len(lines)))
            if len(lines) >= self.block_lines:
                break
        if not lines or self.pool is None:
            return lines, None, None, (0.0, 0)
        texts = [text for _, _, text in lines]
        cut = int(len(texts) * self.share)
        parsing = self.pool.submit(_parse_in_worker, texts[:cut])
        started = time.perf_counter()
        own = self.parser.raw.parse(texts[cut:])
        return lines, parsing, own, (time.perf_counter() - started, len(texts) - cut)

    def step(self) -> int:
        """Score the lines that have come (at most block_lines), write what they brought; the number of
        lines taken. With a pool, the next block is read and sent to it before this one's parse is waited
        for, and scored while it parses that one."""
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
        if pool_parse is not None and lines:
            self._balance(pool_parse, own_parse, time.monotonic() - began - waited, len(lines))
        return taken

    def _balance(self, pool_parse: tuple, own_parse: tuple, step_seconds: float, lines: int) -> None:
        """The pool's share of the next blocks, so that its parse takes as long as this process's step
        (scoring plus its own share of the parse, the wait for the pool not counted): share x pool = rest +
        (1 - share) x own, per line."""
        per_line = lambda part: part[0] / part[1] if part[1] else None  # noqa: E731
        pool, own = per_line(pool_parse), per_line(own_parse)
        own = pool if own is None else own
        if pool is None or own is None:
            return
        rest = max(0.0, step_seconds - own_parse[0]) / lines   # scoring, writing, reading
        target = min(1.0, max(0.0, (rest + own) / (pool + own)))
        self.share = 0.7 * self.share + 0.3 * target

    def speed(self) -> str:
        if not self.taken or self.last_at <= self.first_at:
            return ""
        seconds = self.last_at - self.first_at
        return f"; {self.taken:,} lines in {seconds:.1f} s from the first read to the last scored: " \
               f"{self.taken / seconds:,.0f} lines/s"

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


def live_identity(args, rule: str, detect_config) -> dict:
    resolved = lambda path: None if path is None else str(Path(path).resolve())  # noqa: E731
    return {"checkpoint": resolved(args.checkpoint), "inputs": [resolved(p) for p in args.paths],
            "parser_state": resolved(args.parser_state), "calibration": resolved(args.calibration),
            "rule": rule, "output": resolved(args.output),
            "idle_lines": detect_config.idle_lines, "max_session_events": detect_config.max_session_events}


def run_live(args, model, calibration: dict, co_occurrence, config: Config, stop: utils.StopSignal,
             logger) -> int:
    """--follow: score lines as they come, until a stop signal (files) or the end of standard input."""
    dc, rule = config.detect, config.evaluation.decision_rule
    parser = LineParser(config, args.parser_state, logger)
    if dc.idle_lines is None and parser.windows is None:
        dc.idle_lines = (parser.cfg.session_idle if parser.cfg is not None else None) or DEFAULT_IDLE_LINES
    if "-" in args.paths and len(args.paths) > 1:
        raise utils.ConfigError("standard input (-) is read alone: give it as the only PATH")
    state_path = Path(args.state) if args.state else Path(args.output + ".state") if args.output else None
    if args.paths == ["-"]:
        state_path = None
    state = LiveState(state_path, live_identity(args, rule, dc)) if state_path else None
    if state_path is not None:   # one detector per state: a second one on it is refused, naming the first
        lock = utils.OutputLock(state_path.parent, logger, "--output (or --state)",
                                f".{state_path.name}.lock")
    detector = LiveDetector(model.cpu(), calibration, rule, co_occurrence, dc.idle_lines, dc.idle_seconds,
                            dc.max_session_events, dc.max_misses, dc.prefix_nodes)
    saved = state.load(detector.scorer.columns) if state else None
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
    pool = None
    if parser.raw is not None and dc.parse_workers:
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork"), initializer=_start_parse_worker,
            initargs=(os.getpid(), args.parser_state))
    run = LiveRun(detector, sources, parser, out, state, dc.block_lines, pool)
    logger.info(f"Live detection ({rule} rule) on {', '.join(args.paths)}: sessions close after "
                f"{dc.idle_lines or 'no limit of'} idle lines"
                f"{f', {dc.idle_seconds:g} idle seconds' if dc.idle_seconds else ''}"
                f"{f', {dc.max_session_events} events' if dc.max_session_events else ''}")
    # Python's cycle collector would scan every open session's events and refs again and again (a full
    # collection after every 100 young ones by default): what is alive now is set aside (freeze), and the
    # older generations are collected ten times more rarely; the lines' objects hold no cycles, refcounting
    # frees them. Measured on the live benchmark: 35-47k -> 44-57k lines/s.
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
        if state_path is not None:
            lock.release()
        log_live_totals(detector, parser, run.speed(), logger)
        if out is not sys.stdout:
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
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="sessions to score: a data file or directory (JSONL, JSON, DeepLog text), raw "
                             "log files with --parser-state; with --follow, files to follow or - (standard "
                             "input)")
    parser.add_argument("--output", help="write the JSON lines here (default: stdout)")
    parser.add_argument("--follow", action="store_true",
                        help="live: read the files as they grow (tail -F), early alerts, restartable")
    parser.add_argument("--parser-state", help="PATH holds raw log lines, parsed and grouped through this "
                                               "parser_state.json of preprocess.py (the event IDs of "
                                               "training)")
    parser.add_argument("--calibration", help="use thresholds from this calibration.json (default: the "
                                              "checkpoint's)")
    parser.add_argument("--rule", choices=RULES, help="decision rule (default: evaluation.decision_rule)")
    parser.add_argument("--config", help="a config.yaml whose detect: section replaces the checkpoint's "
                                         "(prefix_nodes, parse_workers, ...); flags override it")
    parser.add_argument("--state", help="with --follow: where the place and open sessions are saved "
                                        "(default: OUTPUT.state)")
    parser.add_argument("--idle-lines", type=int, help="with --follow: close a session no line named for "
                                                       "this many lines (detect.idle_lines)")
    parser.add_argument("--idle-seconds", type=float, help="with --follow: ... or for this many seconds "
                                                           "(detect.idle_seconds)")
    parser.add_argument("--max-session-events", type=int, help="with --follow: close a session at this many "
                                                               "events (detect.max_session_events)")
    parser.add_argument("--state-interval", type=float, help="with --follow: save the place this often, in "
                                                             "seconds (detect.state_interval_s)")
    parser.add_argument("--max-misses", type=int,
                        help="misses shown per abnormal verdict (detect.max_misses)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip and count bad records instead of stopping (data.skip_bad_records)")
    args = parser.parse_args(argv)
    live_only = [flag for flag, value in (("--state", args.state), ("--idle-lines", args.idle_lines),
                                          ("--idle-seconds", args.idle_seconds),
                                          ("--max-session-events", args.max_session_events),
                                          ("--state-interval", args.state_interval)) if value is not None]
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
    model, checkpoint = load_model(args.checkpoint, device)
    co_occurrence = known_co_occurrence(checkpoint)
    config = config_from_dict(checkpoint["config"])
    if args.config:
        config.detect = load_config(args.config).detect
    for flag, dotted in (("rule", "evaluation.decision_rule"), ("idle_lines", "detect.idle_lines"),
                         ("idle_seconds", "detect.idle_seconds"), ("max_misses", "detect.max_misses"),
                         ("max_session_events", "detect.max_session_events"),
                         ("state_interval", "detect.state_interval_s")):
        if getattr(args, flag) is not None:
            set_value(config, dotted, getattr(args, flag), f"--{flag.replace('_', '-')}")
    config.data.skip_bad_records = config.data.skip_bad_records or args.skip_bad_records
    check_values(config)
    calibration = cal.load_calibration(args.calibration) if args.calibration else \
        checkpoint.get("calibration")
    if calibration is None:
        raise CheckpointError(f"{args.checkpoint}: holds no calibration (its training was stopped "
                                    "before the end, or ran with evaluate_after_training false): calibrate "
                                    "with evaluate.py --calibrate-on DIR, then --calibration")
    calibration = cal.checked(calibration, args.calibration or f"{args.checkpoint} (its calibration)")
    if args.follow:
        # one thread: a live step scores a few thousand rows at most, where waking a second thread costs
        # more than it brings (60 ms instead of 2 ms a step beside another busy process, measured)
        torch.set_num_threads(1)
        return run_live(args, model, calibration, co_occurrence, config, stop, logger)
    args.detect = args.paths[0]
    return run_batch(args, model, calibration, co_occurrence, config, logger)


if __name__ == "__main__":
    sys.exit(main())
