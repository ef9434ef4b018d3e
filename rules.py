"""The decision rules and the records of training some of them read: one place that says what makes a
session abnormal (numpy only).

Examples:

    from rules import RULES, CoOccurrence, verdicts
    known = CoOccurrence(vocab_size=28, sets=[[5, 22], [5, 9, 22]])
    known.novel([[5, 22], [5, 11]])              # (novel_set, novel_pair) per session: ([0., 1.], [0., 1.])

Every session is scored (scoring.score_sessions) into columns: the model's per-session sums
(DeepLog.session_scores) and what the records say of it (novel_set, novel_pair, count_distance). A rule
turns the columns and a calibration (calibration.py: the thresholds fitted for each rule on normal sessions)
into a verdict:
- probability: an actual event less likely than one bound, or an end of session less likely than another;
- event_set / event_pair: a set of event types, or two types, never seen together in a normal training
  session (CoOccurrence);
- count_vector: event counts farther from every normal training session than any is from its nearest other
  (CountVectors);
- top_g: DeepLog's own rule, an actual event outside the top-g; score_pNN: the share of events outside the
  top-k above that percentile of the calibration sessions';
- combined (the default): any of the rules calibration.plan_rules chose from the training sessions.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

PERCENTILES = (90, 95, 99)
COMBINABLE = ("probability", "event_set", "event_pair", "count_vector")  # the rules `combined` may take


# ----------------------------------------------------------------------------- the rules
def anomaly_scores(scores: dict, top_k: int) -> np.ndarray:
    """Per session: the fraction of its predictions whose actual event is outside the top-k."""
    return scores[f"misses_at_{top_k}"] / scores["predictions"]


def _probability(scores: dict, calibration: dict) -> np.ndarray:
    event_bound = calibration["log_probability_bound"]
    end_bound = calibration["log_end_probability_bound"]
    if end_bound is None:  # calibrations from before the end of session had a bound of its own
        return scores["min_log_prob"] < event_bound
    # where training shows that new normal sessions often bring an event type it never had, such an
    # event is not flagged by itself (the count-vector rule still counts it)
    events = scores["min_event_log_prob" if calibration["unseen_events_flag"] else "min_seen_event_log_prob"]
    return (events < event_bound) | (scores["end_log_prob"] < end_bound)


def _count_vector(scores: dict, calibration: dict) -> np.ndarray:
    """Farther from every normal training session than any of them from the others (no bound: never)."""
    distance = calibration["count_vector_distance"]
    if distance is None:
        return np.zeros(len(scores["predictions"]), dtype=bool)
    return scores["count_distance"] > distance


def _score_above(percentile: int):
    return lambda scores, calibration: (anomaly_scores(scores, calibration["top_k"])
                                        > calibration["score_thresholds"][f"p{percentile}"])


# The one table of rules: name -> the test of a session's score columns against a calibration in the current
# form (calibration.load_calibration, calibration.fit). A new rule is one entry here plus its threshold's fit
# (calibration.fit) and config key; `combined` is the union of the rules a calibration chose.
RULE_TESTS = {
    "probability": _probability,
    "event_set": lambda scores, calibration: scores["novel_set"] > 0,
    "event_pair": lambda scores, calibration: scores["novel_pair"] > 0,
    "count_vector": _count_vector,
    "top_g": lambda scores, calibration: scores["max_rank"] >= calibration["top_g"],
    **{f"score_p{p}": _score_above(p) for p in PERCENTILES},
}
RULES = ("combined", *RULE_TESTS)


def verdicts(scores: dict, calibration: dict, rule: str) -> np.ndarray:
    """True where a session is abnormal under `rule`, from its score columns (scoring.score_sessions) and a
    calibration in the current form. `calibration.fit` counts each rule's rate on the calibration sessions
    with it."""
    if rule == "combined":
        flags = np.zeros(len(scores["predictions"]), dtype=bool)
        for part in calibration["combined_rules"]:
            flags |= RULE_TESTS[part](scores, calibration)
        return flags
    return RULE_TESTS[rule](scores, calibration)


def miss_bounds(calibration: dict, rule: str) -> tuple[float | None, float | None]:
    """The probability bounds that make an event a miss when a verdict is explained (DeepLog.diagnose): the
    probability rule's, where `rule` applies it, else none (misses are then the events outside the top-k)."""
    if rule not in ("probability", "combined"):
        return None, None
    return calibration["log_probability_bound"], calibration["log_end_probability_bound"]


# ----------------------------------------------------------------------------- the records of training
MAX_EVENT_SETS = 10000  # beyond this many distinct sets of co-occurring event types, the record is dropped
MAX_EVENT_PAIRS = 2_000_000  # beyond this many distinct pairs of co-occurring event types, no record
PAIR_SLICE = 2 ** 20          # pairs generated at a time: a session of m distinct types has m(m-1)/2 of them


def sorted_unique(*arrays: np.ndarray) -> np.ndarray:
    """The sorted distinct int64 values of the arrays together: np.unique by a sort, which is several times
    faster than numpy 2's hash-based np.unique on millions of integer codes."""
    parts = [np.asarray(a, dtype=np.int64).ravel() for a in arrays]
    values = np.sort(np.concatenate(parts or [np.empty(0, np.int64)]))
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def event_pairs(tokens: np.ndarray, lengths: np.ndarray,
                vocab_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs of distinct event types (IDs below vocab_size) that occur in the same session, for sessions
    laid out back to back (`tokens`, and each session's `lengths`): (codes first * vocab_size + second with
    first < second, the index of the session of each), in slices of at most PAIR_SLICE pairs, so that one
    session of thousands of types never needs gigabytes."""
    tokens, lengths = np.asarray(tokens, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    session = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    known = (tokens >= 0) & (tokens < vocab_size)
    # one entry per (session, type), sorted by session and then type
    session, types = np.divmod(sorted_unique(session[known] * vocab_size + tokens[known]), vocab_size)
    ends = np.cumsum(np.bincount(session, minlength=len(lengths)))
    later = ends[session] - np.arange(len(types)) - 1    # how many greater types its session holds
    cumulative = np.cumsum(later)
    begin = 0
    while begin < len(types):
        # at least one type per slice; a type has fewer than vocab_size partners
        stop = max(begin + 1, int(np.searchsorted(cumulative, cumulative[begin] - later[begin] + PAIR_SLICE,
                                                  side="right")))
        counts = later[begin:stop]
        first = np.repeat(np.arange(begin, stop), counts)
        second = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(counts) - counts, counts)
        yield types[first] * vocab_size + types[second], session[first]
        begin = stop


class CoOccurrence:
    """Which event types occurred together in the normal training sessions: their distinct sets (None when
    not recorded: more than 10,000 of them, or evaluation.event_set_rule false) and the pairs of types that
    shared a session (sorted codes first * vocab_size + second; None beyond MAX_EVENT_PAIRS, or with
    evaluation.event_pair_rule false). A pair the training sessions never held is a weaker test than a new set
    (every new pair makes a new set) that does not grow with the data: at most vocab_size^2 / 2 pairs."""

    def __init__(self, vocab_size: int, sets=None, pairs=None, counts: "CountVectors | None" = None):
        self.vocab_size = vocab_size
        self.sets = None if sets is None else {frozenset(s) for s in sets}
        self.pairs = None if pairs is None else sorted_unique(pairs)
        self.counts = counts   # the event-count vectors of the training sessions (None: not recorded)

    def distance(self, sessions: Sequence[Sequence[int]]) -> np.ndarray:
        """Per session: the L1 distance of its event counts to the nearest normal training session's (0 where
        that record is not kept)."""
        return np.zeros(len(sessions)) if self.counts is None else self.counts.nearest(sessions)

    def novel(self, sessions: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per session (1.0 or 0.0): its set of event types never occurred in training (novel_set), two of its
        types never shared a training session (novel_pair). Both 0 where that record is not kept; IDs beyond
        the vocabulary take no part in pairs (the LSTM already flags them: it never saw them)."""
        novel_set = np.zeros(len(sessions))
        novel_pair = np.zeros(len(sessions))
        if self.sets is not None:
            novel_set[:] = [frozenset(s) not in self.sets for s in sessions]
        if self.pairs is not None and len(sessions):
            lengths = np.fromiter(map(len, sessions), dtype=np.int64, count=len(sessions))
            tokens = np.fromiter(itertools.chain.from_iterable(sessions), dtype=np.int64,
                                 count=int(lengths.sum()))
            for codes, owners in event_pairs(tokens, lengths, self.vocab_size):
                at = np.minimum(np.searchsorted(self.pairs, codes), max(len(self.pairs) - 1, 0))
                unseen = self.pairs[at] != codes if len(self.pairs) else np.ones(len(codes), dtype=bool)
                novel_pair[owners[unseen]] = 1.0
        return novel_set, novel_pair

    def unseen_pairs(self, session: Sequence[int], limit: int | None = None) -> list[list[int]]:
        """The pairs [first, second] of the session's event types that never shared a training session (at
        most `limit`, lowest first): what the event_pair rule saw."""
        if self.pairs is None:
            return []
        codes = np.concatenate([c for c, _ in event_pairs(np.asarray(session), np.array([len(session)]),
                                                          self.vocab_size)] or [np.empty(0, np.int64)])
        codes = codes[~np.isin(codes, self.pairs)][:limit]
        return [[int(a), int(b)] for a, b in zip(*np.divmod(codes, self.vocab_size))]


MAX_COUNT_VECTORS = 10_000   # distinct event-count vectors of training kept; beyond, the rule is off
MAX_COUNT_ENTRIES = 4_000_000  # and their non-zero counts, all vectors together
MAX_RECORD_SESSIONS = 1_000_000  # training sessions the record is taken from (the first ones)
DISTANCE_BUDGET = 2 ** 24    # elements of one block of the nearest-vector search (sessions x vectors x types)


def count_entries(sessions: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The event-count vectors of sessions, sparse: (session, event ID, count) of every non-zero count, sorted
    by session and ID. IDs are taken as they are, unknown ones (>= vocab_size) included."""
    lengths = np.fromiter(map(len, sessions), dtype=np.int64, count=len(sessions))
    tokens = np.fromiter(itertools.chain.from_iterable(sessions), dtype=np.int64, count=int(lengths.sum()))
    if not len(tokens):
        return (np.empty(0, np.int64),) * 3
    owner = np.repeat(np.arange(len(sessions), dtype=np.int64), lengths)
    width = int(tokens.max()) + 1
    if len(sessions) * width < 2 ** 62:    # session * width + ID fits int64
        codes, counts = np.unique(owner * width + tokens, return_counts=True)
        owners, types = np.divmod(codes, width)
        return owners, types, counts.astype(np.int64)
    # IDs far beyond any vocabulary (up to 2**63 - 1, scored as unknown): code them by rank instead
    values, rank = np.unique(tokens, return_inverse=True)
    codes, counts = np.unique(owner * len(values) + rank, return_counts=True)
    owners, ranks = np.divmod(codes, len(values))
    return owners, values[ranks], counts.astype(np.int64)


class CountVectors:
    """The distinct event-count vectors of the normal training sessions (how often each event type occurs in a
    session), each with the number of sessions that had it: a bounded record (None beyond MAX_COUNT_VECTORS or
    MAX_COUNT_ENTRIES) from which the count-vector rule measures how far a session is from the nearest normal
    one (L1 distance: events added or missing), and from which the training data's own novelty is
    counted: how many training sessions bring an event type, a set of types or a pair of types that no other
    one has."""

    def __init__(self, entries: np.ndarray, weights: np.ndarray, held_out: "CountVectors | None" = None):
        self.entries = np.asarray(entries, dtype=np.int64).reshape(-1, 3)   # (vector, event ID, count)
        self.weights = np.asarray(weights, dtype=np.int64)                   # sessions per distinct vector
        # training sessions kept out of the reference (the sweep's count-vector outliers), still counted in
        # the novelty of the training data, so that leaving out one odd session cannot make novelty look rare
        self.held_out = held_out
        self.types = np.unique(self.entries[:, 1])
        dense = np.zeros((len(self.weights), len(self.types)), dtype=np.int64)
        dense[self.entries[:, 0], np.searchsorted(self.types, self.entries[:, 1])] = self.entries[:, 2]
        self.dense, self.norms = dense, dense.sum(1)

    @property
    def sessions(self) -> int:
        return int(self.weights.sum())

    @classmethod
    def from_chunks(cls, chunks: Iterable[list], max_sessions: int | None = None) -> "CountVectors | None":
        """Record the sessions of `chunks` (lists of event-ID sequences), at most the first `max_sessions`;
        None when they have more distinct count vectors than the record keeps (or none at all). Identical
        vectors within a chunk are found by a vectorised hash, so Python touches each distinct one once."""
        seen: dict[bytes, int] = {}
        vectors: list[np.ndarray] = []
        weights: list[int] = []
        stored = recorded = 0
        for chunk in chunks:
            chunk = chunk[:max_sessions - recorded] if max_sessions is not None else chunk
            owners, types, counts = count_entries(chunk)
            bounds = np.searchsorted(owners, np.arange(len(chunk) + 1))
            # an order-free 64-bit hash of each session's (type, count) entries; equal vectors, equal hashes
            mixed = (types.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
                counts.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
            mixed ^= mixed >> np.uint64(29)
            hashes = np.zeros(len(chunk), dtype=np.uint64)
            np.add.at(hashes, owners, mixed * np.uint64(0xBF58476D1CE4E5B9))
            _, first, repeats = np.unique(hashes, return_index=True, return_counts=True)
            for row, repeat in zip(first.tolist(), repeats.tolist()):
                pairs = np.stack([types[bounds[row]:bounds[row + 1]], counts[bounds[row]:bounds[row + 1]]], 1)
                key = pairs.tobytes()
                if key in seen:
                    weights[seen[key]] += repeat
                    continue
                seen[key] = len(vectors)
                vectors.append(pairs)
                weights.append(repeat)
                stored += len(pairs)
                if len(vectors) > MAX_COUNT_VECTORS or stored > MAX_COUNT_ENTRIES:
                    return None
            recorded += len(chunk)
            if max_sessions is not None and recorded >= max_sessions:
                break
        if not vectors:
            return None
        entries = np.concatenate([np.column_stack([np.full(len(v), i), v]) for i, v in enumerate(vectors)])
        return cls(entries, np.array(weights))

    def _nearest(self, owners, types, counts, sessions: int, self_rows: bool = False, second=None):
        """Per session (entries of count_entries' form): the L1 distance to the nearest stored vector, as
        |session| + |vector| - 2 sum over types of min(session count, vector count), in blocks of sessions
        so that memory stays within DISTANCE_BUDGET. self_rows: session i is stored vector i, left out.
        `second` (an array of sessions' length): filled with the distance to the second nearest session,
        each stored vector counting as many sessions as its weight."""
        column = np.searchsorted(self.types, types)
        known = (column < len(self.types)) & (self.types[np.minimum(column, len(self.types) - 1)] == types)
        norms = np.bincount(owners, counts, minlength=sessions)
        block = max(1, DISTANCE_BUDGET // max(1, len(self.weights)))
        bounds = np.searchsorted(owners, np.arange(0, sessions + block, block))
        nearest = np.empty(sessions)
        for number, first in enumerate(range(0, sessions, block)):
            last = min(first + block, sessions)
            at = np.arange(bounds[number], bounds[number + 1])
            at = at[known[at]]
            shared = np.zeros((last - first, len(self.weights)))
            np.add.at(shared, owners[at] - first, np.minimum(counts[at, None], self.dense[:, column[at]].T))
            distances = norms[first:last, None] + self.norms[None, :] - 2 * shared
            if self_rows:
                distances[np.arange(last - first), np.arange(first, last)] = np.inf
            nearest[first:last] = distances.min(1) if distances.shape[1] else np.inf
            if second is not None:
                if distances.shape[1] < 2:
                    second[first:last] = np.inf
                    continue
                two = np.argpartition(distances, 1, axis=1)[:, :2]
                rows = np.arange(last - first)[:, None]
                pair = distances[rows, two]
                order = np.argsort(pair, axis=1)
                closest = two[rows[:, 0], order[:, 0]]
                # the nearest vector holds two sessions or more: the second nearest session is there too
                second[first:last] = np.where(self.weights[closest] > 1, pair.min(1), pair.max(1))
        return nearest

    def nearest(self, sessions: Sequence[Sequence[int]]) -> np.ndarray:
        """Per session: the L1 distance of its count vector to the nearest stored one (events added or
        missing; an event type the record never had counts in full)."""
        return self._nearest(*count_entries(sessions), len(sessions))

    def leave_one_out(self, rank: int = 1) -> np.ndarray:
        """Per stored vector: the distance of one of its sessions to the nearest other training session (0
        when another session has the same vector; inf when it is the only session); with rank 2, to the
        second nearest other one (two odd sessions alike are then still far from the rest)."""
        second = np.empty(len(self.weights)) if rank == 2 else None
        nearest_other = self._nearest(*self.entries.T, len(self.weights), self_rows=True, second=second)
        if rank == 1:
            return np.where(self.weights > 1, 0.0, nearest_other)
        return np.where(self.weights > 2, 0.0, np.where(self.weights == 2, nearest_other, second))

    def with_held_out(self) -> "CountVectors":
        """The reference and the held-out vectors in one record."""
        if self.held_out is None:
            return self
        entries = self.held_out.entries + np.array([len(self.weights), 0, 0])
        return CountVectors(np.concatenate([self.entries, entries]),
                            np.concatenate([self.weights, self.held_out.weights]))

    def novelty(self, vocab_size: int) -> dict[str, int]:
        """How many training sessions bring what no other training session has: an event type, a set of event
        types, a pair of event types (types below vocab_size), held-out sessions included. On a new normal
        session, each rule of that name fires about as often as this count divided by the sessions (leave one
        out)."""
        if self.held_out is not None:
            return self.with_held_out().novelty(vocab_size)
        supports = [self.entries[self.entries[:, 0] == v, 1] for v in range(len(self.weights))]
        single = self.weights == 1
        type_sessions = np.bincount(self.entries[:, 1], self.weights[self.entries[:, 0]])
        unique_type = np.array([bool((type_sessions[s] == 1).any()) for s in supports])
        set_sessions: dict[bytes, int] = {}
        for s, w in zip(supports, self.weights.tolist()):
            set_sessions[s.tobytes()] = set_sessions.get(s.tobytes(), 0) + w
        unique_set = np.array([set_sessions[s.tobytes()] == 1 for s in supports])
        unique_pair = np.zeros(len(supports), dtype=bool)
        kept = [s[s < vocab_size] for s in supports]
        lengths = np.array([len(s) for s in kept], dtype=np.int64)
        codes_owners = list(event_pairs(np.concatenate(kept) if kept else np.empty(0), lengths, vocab_size))
        if codes_owners:
            codes = np.concatenate([c for c, _ in codes_owners])
            owners = np.concatenate([o for _, o in codes_owners])
            values, where = np.unique(codes, return_inverse=True)
            pair_sessions = np.bincount(where, self.weights[owners], minlength=len(values))
            unique_pair[owners[pair_sessions[where] == 1]] = True
        return {"event_type": int(unique_type.sum()), "event_set": int((unique_set & single).sum()),
                "event_pair": int(unique_pair.sum())}


def pairs_of_sets(sets, vocab_size: int) -> np.ndarray:
    """The sorted distinct pair codes of a collection of sets of event types."""
    sets = [list(s) for s in sets]
    lengths = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
    tokens = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int64, count=int(lengths.sum()))
    return sorted_unique(*(sorted_unique(codes) for codes, _ in event_pairs(tokens, lengths, vocab_size)))


class CoOccurrenceRecorder:
    """Which event types occur together in the sessions it is given (training's normal ones): their distinct
    sets while there are at most MAX_EVENT_SETS, and the pairs of types sharing a session while there are at
    most MAX_EVENT_PAIRS (each None beyond). While the sets are kept the pairs follow from them at the end;
    only past MAX_EVENT_SETS are the pairs taken from every session, vectorised."""

    BUFFERED = 4096  # sessions given one by one (add_session) are recorded this many at a time

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.sets: set[frozenset] | None = set()
        self.pairs: np.ndarray | None = np.empty(0, dtype=np.int64)  # of sessions recorded without their set
        self._buffer: list = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, selected: np.ndarray | None = None) -> None:
        """Record sessions laid out back to back (`lengths` each); only the `selected` ones when given."""
        if selected is not None and not selected.all():
            tokens, lengths = tokens[np.repeat(selected, lengths)], lengths[selected]
        if self.sets is not None and len(lengths):
            self._add_sets(tokens, lengths)
        if self.sets is None and self.pairs is not None:
            for codes, _ in event_pairs(tokens, lengths, self.vocab_size):
                self.pairs = sorted_unique(self.pairs, codes)
                if len(self.pairs) > MAX_EVENT_PAIRS:
                    self.pairs = None
                    break

    def _add_sets(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        starts = np.cumsum(lengths) - lengths
        if self.vocab_size <= 63:  # one bit per event type: every session's set in two vectorised passes
            nonempty = lengths > 0
            masks = np.bitwise_or.reduceat(np.left_shift(np.uint64(1), tokens.astype(np.uint64)),
                                           starts[nonempty]) if nonempty.any() else np.empty(0, np.uint64)
            found = {frozenset(i for i in range(self.vocab_size) if mask >> i & 1)
                     for mask in np.unique(masks).tolist()}
            if not nonempty.all():
                found.add(frozenset())
            self.sets |= found
        else:
            listed = tokens.tolist()
            for begin, length in zip(starts.tolist(), lengths.tolist()):
                self.sets.add(frozenset(listed[begin:begin + length]))
                if len(self.sets) > MAX_EVENT_SETS:
                    break
        if len(self.sets) > MAX_EVENT_SETS:  # too varied to be a rule: keep what they say about pairs
            self.pairs = sorted_unique(self.pairs, pairs_of_sets(self.sets, self.vocab_size))
            self.sets = None
            if len(self.pairs) > MAX_EVENT_PAIRS:
                self.pairs = None

    def add_session(self, event_ids: list[int]) -> None:
        self._buffer.append(event_ids)
        if len(self._buffer) >= self.BUFFERED:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            lengths = np.fromiter(map(len, self._buffer), dtype=np.int64, count=len(self._buffer))
            self.add(np.fromiter(itertools.chain.from_iterable(self._buffer), dtype=np.int64,
                                 count=int(lengths.sum())), lengths)
            self._buffer = []

    def summary(self) -> dict:
        """{"event_sets": sorted lists of IDs or None, "event_pairs": sorted pair codes or None}."""
        self._flush()
        pairs = self.pairs
        if self.sets is not None and pairs is not None:
            pairs = sorted_unique(pairs, pairs_of_sets(self.sets, self.vocab_size))
        return {"event_sets": None if self.sets is None else sorted(sorted(s) for s in self.sets),
                "event_pairs": None if pairs is None or len(pairs) > MAX_EVENT_PAIRS else pairs}


def merge_co_occurrence(summaries: list[dict]) -> dict:
    """The union of several CoOccurrenceRecorder summaries (of disjoint data): each record None when any
    part lacks it or the union exceeds its cap."""
    sets = [s["event_sets"] for s in summaries]
    union = None if None in sets else {tuple(x) for shard in sets for x in shard}
    pairs = [s["event_pairs"] for s in summaries]
    pair_union = None if any(p is None for p in pairs) else sorted_unique(*pairs)
    too_many_sets = union is None or len(union) > MAX_EVENT_SETS
    return {"event_sets": None if too_many_sets else sorted(list(x) for x in union),
            "event_pairs": None if pair_union is None or len(pair_union) > MAX_EVENT_PAIRS else pair_union}
