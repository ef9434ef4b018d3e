"""The sweep of the training data: which of the sessions a model trained on look abnormal to it, so that last
month's incidents, unlabelled among last month's logs, do not teach the records and thresholds that they are
normal. Run by evaluate.after_training (train.py) unless data.assume_clean is true.

Examples:

    python train.py --data-dir /data/last_month     # the sweep is logged; outputs/suspicious_sessions.jsonl
    head -3 outputs/suspicious_sessions.jsonl       # session id, file, record, score, why, raw lines

Why the model's least likely prediction: a model learns the common orders first and the rare ones last, so
after training the sessions it trained on keep their rank by rarity. On HDFS with 1-3% of abnormal sessions
mixed in, the least likely prediction of each training session (its surprisal, -log p) ranks the abnormal
ones above all but a few dozen of ~4,900 normal ones (benchmarks/README.md, "Training on logs that are not
clean"). The cut is robust (median + SPREAD scaled median absolute deviations of the surprisal), so the
anomalies cannot move it as they move a maximum or a quantile. A set of event types is suspicious when at
least half of its sessions are beyond the cut: it leaves the event-set and event-pair records, and its
sessions leave the count-vector record. What the sweep cannot know: a rare normal kind of session looks the
same as a rare anomaly, so on clean data it also removes a few rare normal sets, and new sessions like them
get flagged; the share it removed is added to the expected false-positive rates it states.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

import utils
from calibration import weighted_percentile
from dataset import Record
from preprocess import RawLines
from rules import CoOccurrence, CountVectors, pairs_of_sets
from scoring import ChunkScorer, chunked, session_key

SPREAD = 4.0          # scaled MADs above the median surprisal: the cut (benchmarks/contamination.py)
COUNT_SPREAD = 3.0    # scaled MADs above the median leave-one-out distance: a count-vector outlier
MIN_COUNT_SESSIONS = 30   # fewer training sessions: their spread is no yardstick (Hadoop's 17 sessions of up
                          # to 99,001 events: 3 of them would go, and the rule's rate with them)
BIN = 0.01            # nats: the resolution of the surprisal histograms
MIN_MAD = 0.25        # nats: where the sessions' surprisals hardly differ, the cut is still 1.5 nats above
                      # the median (4.4 times less likely), not a rounding error above it
UNINFORMED = 0.75     # a mean loss per event above this share of ln(classes) (a uniform guess): the model
                      # learned too little to sweep with, and only the count-vector test runs
MAX_SURPRISAL = 60.0  # nats: the last bin holds less likely predictions and events never seen
MAX_LISTED = 10_000   # suspicious sessions written to the file, at most
RAW_LINES = 20        # raw log lines shown per suspicious session, at most
FILE_NAME = "suspicious_sessions.jsonl"


def count_key(session) -> tuple:
    """A session's event-count vector as a key: its (event ID, count) pairs by ID."""
    return tuple(sorted(Counter(session).items()))


def surprisal(scores: dict) -> np.ndarray:
    """Per session: -log p of its least likely prediction (an event or the end), clipped to MAX_SURPRISAL."""
    return np.minimum(-scores["min_log_prob"], MAX_SURPRISAL)


class Histogram:
    """Weighted values in bins `width` wide (sparse): the median and the median absolute deviation."""

    def __init__(self, width: float = BIN):
        self.width, self.bins = width, defaultdict(float)

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        for index, weight in zip(np.floor(values / self.width).astype(np.int64).tolist(), weights.tolist()):
            self.bins[index] += weight

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        indexes = np.array(sorted(self.bins))
        return (indexes + 0.5) * self.width, np.array([self.bins[i] for i in indexes])

    def median(self) -> float:
        return weighted_percentile(*self._table(), 50)

    def mad(self, center: float) -> float:
        values, weights = self._table()
        return weighted_percentile(np.abs(values - center), weights, 50)

    @property
    def total(self) -> float:
        return float(sum(self.bins.values()))

    def above(self, cut: float) -> float:
        return float(sum(w for i, w in self.bins.items() if (i + 0.5) * self.width > cut))


class Sweep:
    """What the sweep found: the cut, the suspicious sets of event types (None: the sets were not recorded,
    then each session is judged by its own surprisal) and how many sessions they carry."""

    def __init__(self, scorer: ChunkScorer, cut: float, median: float, mad: float, sessions: float,
                 suspicious_sets: set[frozenset] | None, suspicious: float):
        self.scorer, self.cut, self.median, self.mad = scorer, cut, median, mad
        self.sessions, self.suspicious_sets, self.suspicious = sessions, suspicious_sets, suspicious
        self.removed_sets = 0   # of the recorded sets (cleaned)
        self.count_outliers: set[tuple] = set()   # count vectors (count_key) left out of their record
        self.count_outlier_sessions = 0
        self.informed = True   # False: the model learned too little to sweep with (UNINFORMED)

    @property
    def share(self) -> float:
        return self.suspicious / self.sessions if self.sessions else 0.0

    def flags(self, sessions: list, counts_too: bool = True) -> np.ndarray:
        """True for each session the sweep finds suspicious (by its count vector too, unless not
        `counts_too`)."""
        if self.suspicious_sets is not None:
            flags = np.array([frozenset(s) in self.suspicious_sets for s in sessions], dtype=bool)
        else:
            distinct, scores, _ = self.scorer(sessions)
            beyond = dict(zip(distinct, (surprisal(scores) > self.cut).tolist()))
            flags = np.array([beyond[session_key(s)] for s in sessions], dtype=bool)
        if counts_too and self.count_outliers:
            flags |= np.array([count_key(s) in self.count_outliers for s in sessions], dtype=bool)
        return flags

    def kept(self, chunks: Iterable[list]) -> Iterator[list]:
        """The chunks without their suspicious sessions (none empty)."""
        for chunk in chunks:
            flags = self.flags(chunk, counts_too=False)
            kept = [session for session, flag in zip(chunk, flags.tolist()) if not flag]
            if kept:
                yield kept

    def cleaned(self, co_occurrence: CoOccurrence) -> CoOccurrence:
        """The records without the suspicious sets, and without the pairs only they held (pairs are derived
        from the kept sets where sets are recorded; otherwise kept as they are)."""
        if self.suspicious_sets is None or co_occurrence.sets is None:
            return co_occurrence
        sets = co_occurrence.sets - self.suspicious_sets
        self.removed_sets = len(co_occurrence.sets) - len(sets)
        pairs = co_occurrence.pairs
        if pairs is not None:
            pairs = pairs_of_sets(sets, co_occurrence.vocab_size)
        return CoOccurrence(co_occurrence.vocab_size, sets, pairs, co_occurrence.counts)

    def trim_count_outliers(self, counts: CountVectors) -> CountVectors:
        """The count-vector record without its outliers: sessions whose distance to the second nearest other
        training session (so that a pair of anomalies alike cannot hide each other) is above the median +
        COUNT_SPREAD scaled MADs of all sessions'. On a small
        training set one abnormal session would otherwise set the count-vector threshold (the largest
        leave-one-out distance) and shelter the anomalies like it. The MAD counts as at least one event, so
        on data whose sessions repeat each other (HDFS: 90% at distance 0, the farthest at 2) only a session
        several events from every other one is an outlier."""
        if counts.sessions < MIN_COUNT_SESSIONS:
            return counts
        distances = counts.leave_one_out(rank=2)   # two odd sessions alike must not hide each other
        finite = np.isfinite(distances)
        if finite.sum() < 3:
            return counts
        values, weights = distances[finite], counts.weights[finite].astype(float)
        median = weighted_percentile(values, weights, 50)
        # distances are whole events: a MAD of 0 (most sessions repeat another or are one event from one)
        # counts as 1, so the cut is never below the median + 4.4 events
        mad = max(weighted_percentile(np.abs(values - median), weights, 50), 1.0)
        outliers = finite & (distances > median + COUNT_SPREAD * 1.4826 * mad)
        if not outliers.any():
            return counts
        for vector in np.flatnonzero(outliers).tolist():
            pairs = counts.entries[counts.entries[:, 0] == vector, 1:]
            self.count_outliers.add(tuple(map(tuple, pairs.tolist())))
        self.count_outlier_sessions = int(counts.weights[outliers].sum())
        self.suspicious += self.count_outlier_sessions
        return CountVectors(*_vectors(counts, ~outliers), CountVectors(*_vectors(counts, outliers)))

    def summary(self) -> dict:
        """As the calibration stores it ("training_sweep")."""
        return {"sessions": int(self.sessions), "suspicious_sessions": int(self.suspicious),
                "share": self.share, "cut": min(self.cut, MAX_SURPRISAL), "median": self.median,
                "mad": self.mad, "spread": SPREAD, "removed_sets": self.removed_sets,
                "count_outliers": self.count_outlier_sessions, "by_sets": self.suspicious_sets is not None,
                "informed": self.informed, "file": FILE_NAME}


def _vectors(counts: CountVectors, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries (renumbered) and weights of the chosen vectors of a record."""
    indexes = np.flatnonzero(chosen)
    entries = counts.entries[np.isin(counts.entries[:, 0], indexes)].copy()
    entries[:, 0] = np.searchsorted(indexes, entries[:, 0])
    return entries, counts.weights[indexes]


def sweep(scorer: ChunkScorer, normal: Iterable[list], by_sets: bool, classes: int) -> Sweep:
    """Score every normal-labelled session (chunks, one pass) and find the suspicious ones: by sets of event
    types (`by_sets`: a set is suspicious when at least half of its sessions are beyond the cut) or, without
    a record of sets, session by session. None are, when the model's mean loss on these sessions is near a
    uniform guess over the `classes` it saw (UNINFORMED, as train.py warns): a model that learned nothing
    cannot tell."""
    overall, per_set = Histogram(), defaultdict(Histogram)
    loss, predictions = 0.0, 0.0
    for chunk in normal:
        distinct, scores, weights = scorer(chunk)
        loss += float((scores["loss_sum"] * weights).sum())
        predictions += float((scores["loss_count"] * weights).sum())
        values = surprisal(scores)
        overall.add(values, weights)
        if by_sets:
            for session, value, weight in zip(distinct, values.tolist(), weights.tolist()):
                per_set[frozenset(session)].add(np.array([value]), np.array([weight]))
    if not overall.total:
        return Sweep(scorer, MAX_SURPRISAL, 0.0, 0.0, 0.0, set() if by_sets else None, 0.0)
    median = overall.median()
    mad = overall.mad(median)
    cut = median + SPREAD * 1.4826 * max(mad, MIN_MAD)
    if loss > UNINFORMED * np.log(max(classes, 2)) * predictions:
        found = Sweep(scorer, np.inf, median, mad, overall.total, set() if by_sets else None, 0.0)
        found.informed = False
        return found
    if not by_sets:
        return Sweep(scorer, cut, median, mad, overall.total, None, overall.above(cut))
    suspicious = {key for key, histogram in per_set.items() if histogram.above(cut) >= histogram.total / 2}
    carried = sum(per_set[key].total for key in suspicious)
    return Sweep(scorer, cut, median, mad, overall.total, suspicious, carried)


def describe(summary: dict, path) -> str:
    """The estimate with its basis, in words (a Sweep.summary()), for the training log and the report."""
    counts = (f"{summary['count_outliers']:,} session(s) whose event counts are far from the other "
              f"training sessions' (the distance to the second nearest above the median + {COUNT_SPREAD:g} "
              f"scaled MADs)")
    if not summary["informed"]:
        basis = ("the model learned too little to tell (its loss on them is near a uniform guess), so only "
                 f"{counts} were looked for")
    else:
        which = ("at least half of the sessions of their sets of event types have" if summary["by_sets"]
                 else "each has")
        basis = (f"{which} a prediction less likely than {np.exp(-summary['cut']):.2g} (surprisal "
                 f"{summary['cut']:.2f} nats, the median {summary['median']:.2f} + {summary['spread']:g} "
                 f"scaled MADs), or they are among {counts}")
    sets = f" with {summary['removed_sets']} set(s) of event types" if summary["removed_sets"] else ""
    return (f"{summary['suspicious_sessions']:,} of the {summary['sessions']:,} normal-labelled sessions of "
            f"the training data (both sides of the validation split) ({summary['share']:.2%}) look abnormal "
            f"to the model trained on them: {basis}. They were left out of the records of normal "
            f"sessions{sets}; listed in {path}")


def write_suspicious(found: Sweep, records: Iterable[Record], path: Path, data_path) -> int:
    """The suspicious sessions among `records` (file order, at most MAX_LISTED), one JSON object a line:
    session_id, file, record, event_ids, surprisal, why, and the raw lines where preprocess.py left them.
    Written atomically; returns the number written."""
    raw = RawLines.for_sessions(data_path)
    rows = []
    for chunk in chunked(records):
        flags = found.flags([r.event_ids for r in chunk])
        chosen = [r for r, flag in zip(chunk, flags.tolist()) if flag][:MAX_LISTED - len(rows)]
        if not chosen:
            continue
        distinct, scores, _ = found.scorer([r.event_ids for r in chosen])
        value = dict(zip(distinct, surprisal(scores).tolist()))
        for record in chosen:
            score = value[session_key(record.event_ids)]
            why = ("its event counts are far from every other training session's (count-vector outlier)"
                   if not found.flags([record.event_ids], counts_too=False)[0] else
                   "at least half of the sessions with its set of event types are beyond the cut"
                   if found.suspicious_sets is not None else "its least likely prediction is beyond the cut")
            rows.append({"session_id": record.session_id, "file": record.file, "record": record.index,
                         "event_ids": record.event_ids, "surprisal": round(score, 3),
                         "least_likely_probability": float(f"{np.exp(-score):.3g}"), "rule": "sweep",
                         "why": why, "lines": record.lines})
        if len(rows) >= MAX_LISTED:
            break
    if raw is not None:   # the raw lines of every row fetched together: one pass over each file
        wanted = [[where for where in (RawLines.line_of(row["lines"], i)
                                       for i in range(min(len(row["event_ids"]), RAW_LINES))) if where]
                  for row in rows]
        fetched = raw.fetch({where for places in wanted for where in places})
        for row, places in zip(rows, wanted):
            row["raw_lines"] = [fetched.get(where) for where in places]
    utils.atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)
