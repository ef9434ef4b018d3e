"""Live detection's open sessions and their verdicts. LiveDetector is fed the Items of the input lines, keeps
each open session with its slot in live_scorer.LiveScorer, and closes it when it goes idle, reaches
max_session_events or the input ends: its verdict_line then (batch detection's format too). EarlyRules are
the parts of the decision rule that can speak before a session ends (detect.py's docstring).

Example (a checkpoint whose training ended, so with its calibration):

    import torch
    from live_sessions import Item, LiveDetector
    from checkpoint import co_occurrence_of, load_trained

    model, checkpoint = load_trained("outputs/checkpoints/best_model.pt", torch.device("cpu"))
    detector = LiveDetector(model, checkpoint["calibration"], "combined", co_occurrence_of(checkpoint),
                            idle_lines=1000, idle_seconds=None, max_session_events=None, max_misses=3)
    lines = detector.feed([Item("event", ("blk_1",), [1], "app.log:1", "its raw line"),
                           Item("event", ("blk_1",), [2], "app.log:2", "the next one")])
    lines += detector.close_all()   # the end of the input: a verdict line for each open session
    print("".join(lines))
"""
from __future__ import annotations

import collections
import json
import math
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from live_scorer import LiveScorer, Scored
from model import DeepLog
from rules import CoOccurrence, anomaly_scores, miss_bounds, verdicts


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
    parameters: tuple | None = None   # a whole session's (times, values), for the parameter-value model


class LiveSession:
    __slots__ = ("session_id", "slot", "first_seq", "events", "misses", "alerted", "last_seq", "last_time",
                 "types", "known", "candidates", "refs", "n0", "parameters")

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
        self.parameters = None          # a whole session's (times, values) (Item.parameters)


class EarlyRules:
    """The parts of the decision rule that can speak before a session ends, with what they need."""

    def __init__(self, calibration: dict, rule: str, co_occurrence: CoOccurrence):
        self.parts = parts = calibration["combined_rules"] if rule == "combined" else [rule]
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


def located(record: dict, ref: tuple) -> None:
    """Where a record's event was read, from its ref (seq, at, raw): "at", and "raw" where there is one."""
    _, record["at"], raw = ref
    if raw is not None:
        record["raw"] = raw


def verdict_line(session_id: str, events, i: int, scores: dict, abnormal: np.ndarray, anomaly: np.ndarray,
                 rule: str, unseen_pairs: list, misses: list, parameter: dict | None = None) -> str:
    """One session's verdict as a JSON line, batch and live. An abnormal one carries its event IDs, so that
    an operator can hand it back as normal (train.py --update --feedback). `parameter`: what the parameter
    rule found odd (values.ParameterModel.finding), which makes the session abnormal under 'combined'."""
    flagged = bool(abnormal[i]) or parameter is not None
    return json.dumps({
        "session_id": session_id, "score": round(float(anomaly[i]), 6),
        "verdict": "abnormal" if flagged else "normal", "rule": rule,
        "min_probability": float(math.exp(scores["min_log_prob"][i])),
        "novel_event_set": bool(scores["novel_set"][i]), "novel_event_pairs": unseen_pairs,
        "misses": misses, **({"parameter": parameter} if parameter is not None else {}),
        **({"event_ids": list(events)} if flagged else {})}) + "\n"


class LiveDetector:
    """Open sessions, fed the Items of the lines as they come; returns the output lines each step wrote, in
    the order of the lines that caused them (so that how lines were split into steps never shows)."""

    def __init__(self, model: DeepLog, calibration: dict, rule: str, co_occurrence: CoOccurrence,
                 idle_lines: int | None, idle_seconds: float | None, max_session_events: int | None,
                 max_misses: int, prefix_nodes: int = 0, names=None):
        self.calibration, self.rule, self.co_occurrence = calibration, rule, co_occurrence
        self.names = names   # the template text of events (preprocess.EventNames), for raw logs
        # the parameter-value model (values.py) where the checkpoint has one: a part of 'combined'
        self.parameter_model = getattr(model, "parameter_model", None) if rule == "combined" else None
        self.top_k = calibration["top_k"]
        self.early = EarlyRules(calibration, rule, co_occurrence)
        self.count_rule = "count_vector" in self.early.parts
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
        for kind, keys, events, at, raw, parameters in items:
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
                session.parameters = parameters
                if kind == "session" or (max_events and len(session.events) >= max_events):
                    if kind == "event":
                        del opened[key]
                    closing.append((seq, 2, session))
        self.seq, self.idle_due = seq, due
        if touched:
            self._score(list(touched.values()), output)
        return self._closed(closing, output)

    def close_idle(self, now: float) -> list[str]:
        """Close the sessions no line named for idle_seconds (wall-clock time)."""
        if not self.idle_seconds:
            return []
        idle = [key for key, session in self.open.items() if session.last_time <= now - self.idle_seconds]
        return self._closed([(self.seq, 0, self.open.pop(key)) for key in idle])

    def close_idle_lines(self) -> list[str]:
        """Close the sessions no line named for idle_lines lines by now (a restart with a lower idle_lines:
        they close at once, not at the next line; otherwise none is)."""
        closing = []
        while self.idle_lines and self.open:
            oldest = next(iter(self.open.values()))   # (least recently named first)
            if oldest.last_seq > self.seq - self.idle_lines:
                break
            closing.append((self.seq, 0, self.open.popitem(last=False)[1]))
        return self._closed(closing)

    def close_all(self) -> list[str]:
        """The end of the input: every open session, first seen first."""
        sessions = sorted(self.open.values(), key=lambda s: s.first_seq)
        self.open.clear()
        return self._closed([(self.seq, 3, session) for session in sessions])

    def _closed(self, closing: list[tuple[int, int, LiveSession]], output: list | None = None) -> list[str]:
        """Close these sessions: the end of each scored, then the rules on its whole record (the batch
        verdict's own function); the step's output lines, in the order of the lines behind them."""
        output = [] if output is None else output
        if closing:
            self._verdicts(closing, output)
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
            self._record(session, scored, row, position, self.bound)
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

    def _record(self, session: LiveSession, scored: Scored, row: int, position: int,
                bound: float | None) -> None:
        """A miss into the session's record (its first max_misses): outside the top-k, or below `bound`."""
        if (scored.rank[row] >= self.top_k or (bound is not None and scored.log_prob[row] < bound)) and \
                len(session.misses) < self.max_misses:
            miss = {"position": position,
                    "actual": session.events[position] if position < len(session.events) else "<end>",
                    "probability": float(math.exp(scored.log_prob[row])),
                    "expected": [self._label(t) for t in scored.expected[row]]}
            if session.refs is not None and position >= session.n0:
                located(miss, session.refs[position - session.n0])
            if self.names is not None:
                self.names.annotate(miss)
            session.misses.append(miss)

    def _label(self, token: int):
        return "<end>" if token == self.scorer.model.end_id else int(token)

    def _alert(self, session: LiveSession, position: int, rule: str, pair, scored: Scored, row) -> tuple:
        alert = {"alert": "early", "session_id": session.session_id, "rule": rule, "position": position,
                 "event": session.events[position]}
        if row is not None:
            alert["probability"] = float(math.exp(scored.log_prob[row]))
            alert["expected"] = [self._label(t) for t in scored.expected[row]]
        if pair is not None:
            alert["pair"] = pair
        ref = session.refs[position - session.n0]
        located(alert, ref)
        if self.names is not None:
            self.names.annotate(alert, "event")
        self.totals["early_alerts"] += 1
        return ref[0], 1, session.session_id, json.dumps(alert) + "\n"

    def _verdicts(self, closing: list[tuple[int, int, LiveSession]], output: list) -> None:
        sessions = [entry[2] for entry in closing]
        slots = [s.slot for s in sessions]
        ended = self.scorer.end(slots, [len(s.events) for s in sessions])
        for row, session in enumerate(sessions):
            self._record(session, ended, row, len(session.events), self.end_bound)
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
            odd = self._parameter_finding(session)
            text = verdict_line(session.session_id, session.events, i, scores, abnormal, anomaly, self.rule,
                                unseen, session.misses if flagged else [], odd)
            output.append((seq, phase, i, text))
            self.totals["abnormal" if flagged or odd else "normal"] += 1
            self.scorer.release(session.slot)

    def _parameter_finding(self, session: LiveSession) -> dict | None:
        """What the parameter-value model found odd in a whole session's times or values (under 'combined',
        where the checkpoint has the model), with where it is; None otherwise. As detect.py's batch."""
        if self.parameter_model is None or session.parameters is None:
            return None
        found = self.parameter_model.odd(session.events, *session.parameters)
        if found is None:
            return None
        if session.refs and found["position"] < len(session.refs):
            found["at"] = session.refs[found["position"]][1]
        if self.names is not None:
            self.names.annotate(found, "event")
        return found

    # -------------------------------------------------------------- saved and restored
    def state_dict(self) -> dict:
        """The open sessions (least recently active first) and the counters, one tensor per field (a save
        costs a few objects, not a few per session)."""
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
