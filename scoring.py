"""Batch scoring of sessions in chunks: a checkpoint's model loaded, the sessions of data files (or of their
token cache) read in chunks, and each chunk's distinct sessions scored once, with the scores of recent ones
cached across chunks. evaluate.py (metrics, calibration) and detect.py (the verdicts of finished files) score
this way; calibration.py turns the score columns into verdicts.

Example (a checkpoint of train.py, the sample data of data/generate_sample.py):

    import torch
    from scoring import ChunkScorer, file_chunks
    from checkpoint import co_occurrence_of, load_trained

    model, checkpoint = load_trained("outputs/checkpoints/best_model.pt", torch.device("cpu"))
    scorer = ChunkScorer(model, [10], co_occurrence=co_occurrence_of(checkpoint))
    for chunk in file_chunks("data/sample/new", {}):
        sessions, scores, counts = scorer(chunk)   # distinct sessions, their score columns, how often each
        print(len(sessions), scores["misses_at_10"][:5], counts[:5])

Memory holds one chunk (at most CHUNK_SIZE sessions, CHUNK_EVENTS events) and the cache (the MAX_CACHED most
recently seen distinct sessions of at most MAX_CACHED_LENGTH events), whatever the size of the data.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from batches import session_chunks
from cache import build_caches, cache_settings, default_cache_dir
from config import Config, reader_options
from dataset import Record, iter_sessions
from model import DeepLog, as_sessions
from rules import RULES, CoOccurrence, verdicts

CHUNK_SIZE = 8192             # sessions read, de-duplicated and scored together
CHUNK_EVENTS = 2 ** 22        # and at most this many events in a chunk (more only for one longer session)
POSITIONS_PER_SESSION = 32    # a scoring batch holds evaluation.batch_size x this many positions: bigger
                              # batches of short sessions ran slower on CPU (benchmarks/README.md)
MAX_CACHED = 100_000          # distinct sessions whose scores are kept across chunks
MAX_CACHED_LENGTH = 512       # longer sessions rarely repeat: not worth a place in the cache


# ----------------------------------------------------------------------------- sources of sessions
def chunked(sessions: Iterable, chunk_size: int = CHUNK_SIZE,
            max_events: int = CHUNK_EVENTS) -> Iterator[list]:
    """Consecutive items in lists of at most `chunk_size` items and, past the first item, `max_events` events
    (an item is a sequence of events, or a Record), so that long sessions make short chunks; none empty."""
    chunk, events = [], 0
    for item in sessions:
        size = len(item.event_ids if isinstance(item, Record) else item)
        if chunk and (len(chunk) >= chunk_size or events + size > max_events):
            yield chunk
            chunk, events = [], 0
        chunk.append(item)
        events += size
    if chunk:
        yield chunk


def file_chunks(path, options: dict, abnormal: bool | None = None,
                chunk_size: int = CHUNK_SIZE) -> Iterator[list]:
    """The event-ID lists of the sessions under `path` in chunks, read in one streaming pass when iterated:
    those labelled abnormal (abnormal=True), the others (False) or all (None). IDs are not checked against
    the vocabulary here: an unknown ID is scored as a miss, not rejected."""
    records = iter_sessions(path, None, **options)
    wanted = (r.event_ids for r in records if abnormal is None or bool(r.label) == abnormal)
    return chunked(wanted, chunk_size)


def data_chunks(path, config: Config, wanted: str, logger=None) -> Iterator[list]:
    """The sessions under `path` in chunks: "normal" (label 0 or none), "abnormal" (label 1) or "all".
    With lazy_loading.cache they come from the token cache of each file (built on first use, with IDs left
    unchecked: unknown IDs are scored as misses), else from one streaming pass over the files."""
    if not config.lazy_loading.cache:
        abnormal = {"normal": False, "abnormal": True}.get(wanted)
        return file_chunks(path, reader_options(config), abnormal=abnormal)
    return session_chunks(cache_entries(path, config, None, logger), wanted)


def cache_entries(path, config: Config, vocab_size: int | None, logger=None) -> list[Path]:
    """The token-cache entries of the files under `path`, built on first use (vocab_size None: IDs left
    unchecked, for data to score)."""
    loading = config.lazy_loading
    return build_caches(path, cache_settings(config, vocab_size), loading.cache_dir or default_cache_dir(),
                        loading.cache_workers, logger or logging.getLogger("deeplog"))


def nonempty(chunks: Iterable[list]) -> Iterator[list] | None:
    """The same chunks, or None when there are none (the first chunk is read ahead)."""
    chunks = iter(chunks)
    first = next(chunks, None)
    return None if first is None else itertools.chain([first], chunks)


# ----------------------------------------------------------------------------- scoring
def score_columns(top_ks) -> list[str]:
    return ["predictions", "max_rank", "min_log_prob", "min_event_log_prob", "min_seen_event_log_prob",
            "end_log_prob", "loss_sum", "loss_count", "unknown", "novel_set", "novel_pair",
            "count_distance"] + [f"misses_at_{k}" for k in sorted(set(top_ks))]


def score_sessions(model: DeepLog, sessions: list[tuple], top_ks, batch_size: int = 256,
                   co_occurrence: CoOccurrence | None = None) -> dict[str, np.ndarray]:
    """Score distinct sessions: arrays aligned with `sessions`, the columns of DeepLog.session_scores
    (computed in the windows of training, in batches of batch_size x POSITIONS_PER_SESSION positions), plus
    novel_set
    (1 when the session's set of event types never occurred in a normal training session) and novel_pair (1
    when two of its event types never shared one): both 0 where `co_occurrence` holds no such record."""
    columns = model.session_scores(sessions, top_ks, batch_size * POSITIONS_PER_SESSION)
    out = {name: column.numpy() for name, column in columns.items()}
    co_occurrence = co_occurrence or CoOccurrence(model.vocab_size)
    out["novel_set"], out["novel_pair"] = co_occurrence.novel(sessions)
    out["count_distance"] = co_occurrence.distance(sessions)
    return out


def verdict(model: DeepLog, input_ids, rule: str | None = None, times=None, values=None) -> list[str]:
    """"abnormal" or "normal" per session (a 1-D sequence, a list of them or a right-padded 2-D tensor): the
    calibrated rule stored with a model that checkpoint.load_model built (the checkpoint's decision rule
    unless `rule` names another), with its thresholds and its record of event types seen together in
    training: the same verdict as detect.py. `times`, `values`: one list per session (for one session too:
    [its times]) of its events' times and numeric parameters (or None), as sessions.jsonl holds them:
    under 'combined', the parameter-value model's rule too, where the checkpoint has one (what it found:
    model.parameter_model.odd)."""
    if model.calibration is None:
        raise ValueError("this model holds no calibration: load it with checkpoint.load_model from a "
                         "checkpoint whose training ended (or calibrate with evaluate.py --calibrate-on)")
    rule = rule or model.calibration["default_rule"]
    if rule not in RULES:
        raise ValueError(f"unknown decision rule '{rule}' (known: {', '.join(RULES)})")
    sessions = as_sessions(input_ids)
    scores = score_sessions(model, sessions, [model.calibration["top_k"]], co_occurrence=model.co_occurrence)
    flagged = verdicts(scores, model.calibration, rule).tolist()
    parameter_model = getattr(model, "parameter_model", None)
    if parameter_model is not None and rule == "combined" and (times is not None or values is not None):
        for i, session in enumerate(sessions):
            session_times = times[i] if times is not None else None
            session_values = values[i] if values is not None else None
            odd = parameter_model.odd(list(session), session_times, session_values)
            flagged[i] = flagged[i] or odd is not None
    return ["abnormal" if abnormal else "normal" for abnormal in flagged]


def session_key(events) -> tuple:
    """A session as a hashable tuple of ints (numpy arrays converted)."""
    return tuple(events.tolist()) if isinstance(events, np.ndarray) else tuple(events)


class ChunkScorer:
    """Scores chunks of sessions. Identical sessions are scored once within a chunk, and across chunks while
    their scores are cached: the `max_cached` most recently seen distinct sessions of at most
    MAX_CACHED_LENGTH events. Others are scored again (the same numbers, more work), so memory holds one
    chunk and the cache whatever the data size (a tuple and a row of scores per cached session)."""

    def __init__(self, model: DeepLog, top_ks, batch_size: int = 256,
                 co_occurrence: CoOccurrence | None = None, max_cached: int = MAX_CACHED,
                 desc: str = "scoring"):
        self.model, self.top_ks, self.batch_size = model, top_ks, batch_size
        self.co_occurrence = co_occurrence
        self.max_cached, self.desc, self.columns = max_cached, desc, score_columns(top_ks)
        # session -> its row in self.rows, least recent first
        self.slots: OrderedDict[tuple, int] = OrderedDict()
        self.rows = np.empty((max_cached, len(self.columns)))  # memory pages are only taken as slots fill
        self.scored = 0           # sessions run through the model
        self.overflowed = False   # some scored session was not kept, so it may have been scored twice

    @property
    def distinct(self) -> int | None:
        """The number of distinct sessions seen: exact while the cache never overflowed, else unknown
        (None)."""
        return None if self.overflowed else self.scored

    def __call__(self, chunk: list) -> tuple[list[tuple], dict[str, np.ndarray], np.ndarray]:
        """The chunk's distinct sessions (first seen first), their score columns (as score_sessions gives
        them) and how often each occurs in the chunk."""
        counts = Counter(map(session_key, chunk))
        sessions = list(counts)
        table = np.empty((len(sessions), len(self.columns)))
        cached = [s in self.slots for s in sessions]
        hits = [i for i, hit in enumerate(cached) if hit]
        table[hits] = self.rows[[self.slots[sessions[i]] for i in hits]]
        for i in hits:
            self.slots.move_to_end(sessions[i])
        misses = [i for i, hit in enumerate(cached) if not hit]
        if misses:
            fresh = score_sessions(self.model, [sessions[i] for i in misses], self.top_ks, self.batch_size,
                                   self.co_occurrence)
            table[misses] = np.column_stack([fresh[name] for name in self.columns])
            self.scored += len(misses)
            for i in misses:
                self.remember(sessions[i], table[i])
        return sessions, dict(zip(self.columns, table.T)), np.array(list(counts.values()), dtype=np.float64)

    def remember(self, session: tuple, row: np.ndarray) -> None:
        if len(session) > MAX_CACHED_LENGTH or not self.max_cached:
            self.overflowed = True
            return
        if len(self.slots) < self.max_cached:
            slot = len(self.slots)
        else:
            _, slot = self.slots.popitem(last=False)
            self.overflowed = True
        self.slots[session] = slot
        self.rows[slot] = row
