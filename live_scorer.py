"""Live scoring's model, stepped: open sessions scored by the events that came since the last step, each with
its recurrent state in a slot of LiveScorer, their score columns those of DeepLog.session_scores (the batch
scorer's). PrefixTrie shares the states of the prefixes sessions begin with. live_sessions.LiveDetector
drives it.

Example (any DeepLog; a trained one from checkpoint.load_model):

    from live_scorer import LiveScorer
    from model import DeepLog

    scorer = LiveScorer(DeepLog(29, 16, 32, 1, 0.0), top_k=5, prefix_nodes=1000)
    a, b = scorer.allocate(), scorer.allocate()
    scorer.advance([(a, [1, 2, 3], 0), (b, [4], 0)], set())   # (slot, its events, how many came before)
    scorer.advance([(a, [1, 2, 3, 5], 3)], set())             # a's next event alone
    scorer.end([a, b], [4, 1])                                # both end: the end scored too
    print(scorer.columns_of([a, b])["misses_at_5"])           # as DeepLog.session_scores counts them
"""
from __future__ import annotations

import collections
import math
from typing import NamedTuple

import numpy as np
import torch

from model import LOGIT_BUDGET, DeepLog
from tokens import window_runs

MIN_ROWS = 8            # LSTM and head batches are padded to this many rows: below it the CPU kernels round
                        # differently (one row takes another path), so a session's numbers would depend on
                        # which others came with it; with it they do not, and a restart repeats a run exactly


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
    """The model run over many open sessions, each holding a slot: its state (indexed by slot) and its score
    columns, so that its verdict at the end is the batch verdict. A window of training (tokens.window_runs)
    starts from a fresh state over its context, as the batch scorer's. Rows with rank >= watch_rank, a
    log-probability below watch_log_prob (end_watch_log_prob at the end) or in watch_extra get the model's
    top-k events ("expected")."""

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
        self.state = model.initial_state(0)   # of each slot: tensors [layers, slots, hidden]
        self.columns = {name: np.zeros(0) for name in self.start}
        self.node_of = np.zeros(0, dtype=np.int64)   # each slot's place in the trie; -1: a state of its own
        self.free: list[int] = []
        self.head_rows = max(MIN_ROWS, LOGIT_BUDGET // model.num_classes)
        self.positions = model.scoring_tokens()
        self.fresh = take(self._run(torch.full((1, 1), model.start_id), None)[1], 0)   # after the start token
        self.trie = PrefixTrie(self, prefix_nodes) if prefix_nodes > 1 else None

    # -------------------------------------------------------------- slots
    def _grow(self, needed: int) -> None:
        old = len(self.node_of)
        new = max(needed, 2 * old, 64)
        self.state = tuple(torch.cat(two, 1) for two in zip(self.state, self.model.initial_state(new - old)))
        for name in self.columns:
            self.columns[name] = np.concatenate([self.columns[name], np.zeros(new - old)])
        self.node_of = np.concatenate([self.node_of, np.full(new - old, -1, dtype=np.int64)])
        self.free.extend(range(new - 1, old - 1, -1))

    def allocate(self) -> int:
        """A slot for a new session: at the trie's root (else after the start token), no predictions."""
        if not self.free:
            self._grow(len(self.node_of) + 1)
        slot = self.free.pop()
        if self.trie is not None:
            self.node_of[slot] = 0
        else:
            self.node_of[slot] = -1
            put(self.state, slot, self.fresh)
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
            put(self.state, torch.from_numpy(on_trie), self._states(on_trie))
            self.node_of[on_trie] = -1

    def _states(self, slots: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The sessions' states: their own, or their node's on the trie."""
        states, nodes = take(self.state, torch.from_numpy(slots)), self.node_of[slots]
        on_trie = nodes >= 0
        if on_trie.any():
            put(states, torch.from_numpy(on_trie), take(self.trie.state, torch.from_numpy(nodes[on_trie])))
        return states

    def state_of(self, slots: list[int]) -> dict:
        """The sessions' states, by DeepLog.state_names (their node's, on the trie), and their columns."""
        states = self._states(np.asarray(slots, dtype=np.int64))
        columns = {name: torch.from_numpy(column) for name, column in self.columns_of(slots).items()}
        return {**dict(zip(self.model.state_names, states)), "columns": columns}

    def restore(self, state: dict) -> list[int]:
        """Slots for saved sessions (state_of's dict), in its order."""
        states = tuple(state[name] for name in self.model.state_names)
        slots = [self.allocate() for _ in range(states[0].size(1))]
        self.node_of[slots] = -1
        put(self.state, torch.tensor(slots, dtype=torch.long), states)
        for name, column in state["columns"].items():
            self.columns[name][slots] = column.numpy()
        return slots

    def columns_of(self, slots: list[int]) -> dict[str, np.ndarray]:
        return {name: column[slots].copy() for name, column in self.columns.items()}

    # -------------------------------------------------------------- the model
    def _run(self, inputs: torch.Tensor, state):
        rows = inputs.size(0)
        if rows < MIN_ROWS:
            inputs = padded(inputs)
            if state is not None:
                state = tuple(padded(s, 1) for s in state)
        outputs, state = self.model.advance(inputs, state)
        return outputs[:rows], take(state, slice(None, rows))

    def runs(self, begin: int, end: int) -> list[tuple[int, int, bool]]:
        """Positions [begin, end) of a session in the model's windows: tokens.window_runs."""
        return window_runs(begin, end, self.model.max_seq_length, self.model.window_context)

    @torch.no_grad()
    def advance(self, work: list[tuple[int, list, int]], watch_extra: set[tuple[int, int]]) -> Scored:
        """Score the new events of sessions and step their states: `work` holds (slot, events, n0) where
        events[n0:] came since the last step; the rows go into the columns."""
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
        hidden = [self.model.last_output(self.state)[torch.from_numpy(slots)]]   # the pending predictions
        meta = [(slots, np.array([w[2] for w in work], dtype=np.int64),
                 np.array([w[1][w[2]] for w in work], dtype=np.int64))]
        groups = collections.defaultdict(list)
        for slot, events, n0 in work:   # the state after input q predicts position q: inputs n0+1..n1 are new
            n1 = len(events)
            for begin, end, fresh in self.runs(n0 + 1, n1 + 1):
                first_input = begin - (self.model.window_context if fresh else 0)
                groups[(end - first_input, fresh)].append((slot, begin, end, end == n1 + 1, events,
                                                           first_input))
        finals = []
        for (width, fresh), segments in groups.items():
            rows = max(MIN_ROWS, self.positions // width)
            for at in range(0, len(segments), rows):
                self._run_segments(segments[at:at + rows], width, fresh, hidden, meta, finals)
        for index, state in finals:   # after every run: a session's runs all started from its old state
            put(self.state, index, state)
        slot, position, target = (np.concatenate(parts) for parts in zip(*meta))
        extra = watched_rows(slot, position, watch_extra)
        rank, log_prob, expected = self.head(torch.cat(hidden), torch.from_numpy(self.model.known(target)),
                                             self.watch_log_prob, extra)
        return Scored(slot, position, target, rank, log_prob, expected)

    def _run_segments(self, segments, width: int, fresh: bool, hidden: list, meta: list,
                      finals: list) -> None:
        skip = self.model.window_context if fresh else 0
        inputs = torch.from_numpy(self.model.known(np.array(
            [events[first - 1:end - 1] for _, _, end, _, events, first in segments], dtype=np.int64)))
        index = torch.tensor([s[0] for s in segments], dtype=torch.long)
        outputs, state = self._run(inputs, None if fresh else take(self.state, index))
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
            finals.append((index[chosen], take(state, chosen)))

    @torch.no_grad()
    def end(self, slots: list[int], lengths: list[int]) -> Scored:
        """Score the end of these sessions (of `lengths` events) into their columns."""
        index = np.array(slots, dtype=np.int64)
        end_id = self.model.end_id
        rank, log_prob, expected = self.head(self.model.last_output(self._states(index)),
                                             torch.full((len(index),), end_id), self.end_watch_log_prob)
        self._accumulate(index, rank, log_prob, end=True)
        return Scored(index, np.array(lengths, dtype=np.int64), np.full(len(index), end_id), rank, log_prob,
                      expected)

    def head(self, hidden: torch.Tensor, targets: torch.Tensor, watch_log_prob: float | None,
             extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """Ranks and log-probabilities (float64) of targets from top-layer outputs, and the expected events of
        the watched rows, in slices of at most LOGIT_BUDGET logits."""
        model = self.model
        ranks, log_probs, expected = [], [], {}
        for at in range(0, len(hidden), self.head_rows):
            rows = hidden[at:at + self.head_rows]
            count = len(rows)
            logits = model.head(padded(rows) if count < MIN_ROWS else rows)[:count]
            rank, log_prob = model.ranks_from_logits(logits.unsqueeze(1), targets[at:at + count, None])
            rank, log_prob = rank[:, 0].numpy(), log_prob[:, 0].double().numpy()
            watched = rank >= self.watch_rank
            if extra is not None:
                watched |= extra[at:at + count]
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


def take(state: tuple[torch.Tensor, ...], index) -> tuple[torch.Tensor, ...]:
    """The states of some sessions (index: of the batch dimension, 1) from a state of many."""
    return tuple(tensor[:, index] for tensor in state)


def put(state: tuple[torch.Tensor, ...], index, values: tuple[torch.Tensor, ...]) -> None:
    """Write the states `values` into a state of many sessions, at `index` of its batch dimension."""
    for tensor, value in zip(state, values):
        tensor[:, index] = value


def padded(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`tensor` with its first row along `dim` repeated to MIN_ROWS rows."""
    shape = list(tensor.shape)
    shape[dim] = MIN_ROWS - shape[dim]
    return torch.cat([tensor, tensor.narrow(dim, 0, 1).expand(shape)], dim)


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
    """The states of the event prefixes sessions begin with, shared, each computed once, with the score of
    each event after its prefix. Real logs repeat how sessions begin (HDFS: 114,561 events, 9,534 distinct
    prefixes), so most lines cost a lookup instead of an LSTM step. At most `capacity` prefixes, none past
    the first window; a session whose next prefix is not kept leaves with its state (the same numbers)."""

    def __init__(self, scorer: LiveScorer, capacity: int):
        self.scorer, self.capacity = scorer, capacity
        self.state = scorer.model.initial_state(capacity)   # of each node
        put(self.state, 0, scorer.fresh)
        self.lengths = [0]                             # events of each node's prefix
        # (node, token) -> (child node, the token's rank and log-probability after node, expected | None)
        self.edges: dict[tuple[int, int], tuple] = {}

    def walk(self, work: list[tuple[int, list, int]], watch_extra) -> tuple[list, Scored]:
        """Move the sessions on the trie by their new events, one event each a round; the work left for their
        own states, and the rows scored here."""
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
        """Edges for the moves that may have one (room left, within the first window): the children's states
        in one batched step, the events' scores in one pass of the head."""
        scorer = self.scorer
        wanted = [m for m in dict.fromkeys(moves) if len(scorer.runs(0, self.lengths[m[0]] + 2)) == 1]
        wanted = wanted[:max(0, self.capacity - len(self.lengths))]
        if not wanted:
            return
        nodes = torch.tensor([node for node, _ in wanted], dtype=torch.long)
        tokens = torch.tensor([tok for _, tok in wanted], dtype=torch.long)
        _, state = scorer._run(tokens[:, None], take(self.state, nodes))
        rank, log_prob, expected = scorer.head(scorer.model.last_output(self.state)[nodes], tokens,
                                               scorer.watch_log_prob)
        first = len(self.lengths)
        put(self.state, slice(first, first + len(wanted)), state)
        for row, (node, tok) in enumerate(wanted):
            self.edges[(node, tok)] = (first + row, int(rank[row]), float(log_prob[row]), expected.get(row))
            self.lengths.append(self.lengths[node] + 1)

    def _expected(self, node: int) -> list[int]:
        model = self.scorer.model
        logits = model.head(model.last_output(self.state)[node:node + 1].expand(MIN_ROWS, -1))[0]
        return logits.topk(min(self.scorer.top_k, model.num_classes)).indices.tolist()
