"""DeepLog: an LSTM that predicts the next log event key of a session.

Examples (after `python train.py` has produced a checkpoint):

    from model import DeepLog
    model = DeepLog.from_checkpoint("outputs/checkpoints/best_model.pt", map_location="cpu")
    print(model.verdict([[22, 5, 5, 5, 11, 9], [22, 5]]))    # 'normal' or 'abnormal' per session
    print(model.calculate_anomaly_score([22, 5, 5, 5, 11, 9], top_k=10))    # tensor([0.1429])
    print(model.diagnose([22, 5, 5, 5, 11, 9], top_k=10))   # one session: its misses, as a list of dicts

Run from the repository root, or put it on the path first (sys.path.insert(0, "/path/to/deeplog")): the
scripts are flat modules, not an installed package.

    # the manual route works too
    import torch
    ckpt = torch.load("outputs/checkpoints/best_model.pt", map_location="cpu", weights_only=True)
    model = DeepLog(**ckpt["model_args"])
    model.load_state_dict(ckpt["model_state_dict"])

Token layout. User event IDs 0..vocab_size-1 are used unchanged. The special tokens live above them:

    end_id   = vocab_size      end of session: a prediction target, never an input
    pad_id   = vocab_size + 1  right padding of a batch
    start_id = vocab_size + 2  session start: the first input, so the first event is predicted too
    unk_id   = vocab_size + 3  input stand-in for an ID the model never had (>= vocab_size)

A session e1..en becomes inputs [start, e1..en] and targets [e1..en, end]: n + 1 predictions. The
head scores vocab_size + 1 classes (every event plus "end"), so an unexpected first event or a session
that stops early is a miss like any other. This file knows nothing of files or training.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # target value for padding: cross_entropy skips it, metrics mask it


def special_tokens(vocab_size: int) -> tuple[int, int, int, int]:
    """(end_id, pad_id, start_id, unk_id): all above the user's IDs, which are never shifted."""
    return vocab_size, vocab_size + 1, vocab_size + 2, vocab_size + 3


SCORING_TOKENS = 2 ** 13   # positions (rows x padded length) per scoring batch, by default
LOGIT_BUDGET = 2 ** 24     # logits per scoring batch: a big vocabulary gets fewer positions, memory bounded


def lay_out(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int,
            dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """The token layout of sessions, concatenated: [start, e1..en, end] per session, and where each begins.
    Position p of a session's layout is the input whose target is position p + 1, so a window of positions
    [begin, end) reads inputs layout[begin:end] and targets layout[begin + 1:end + 1]. The one builder of it:
    the cache stores it, training and scoring slice it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = lengths + 2
    starts = np.cumsum(sizes) - sizes
    laid_out = np.empty(int(sizes.sum()), dtype=dtype)
    is_event = np.ones(len(laid_out), dtype=bool)
    is_event[starts] = is_event[starts + sizes - 1] = False
    end_id, _, start_id, _ = special_tokens(vocab_size)
    laid_out[is_event] = tokens
    laid_out[starts] = start_id
    laid_out[starts + sizes - 1] = end_id
    return laid_out, starts


def window_table(predictions: np.ndarray, max_seq_length: int, window_context: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How sessions of `predictions` positions each (n events + the end) are cut into windows, for training
    and scoring alike: (session, begin, end, first scored) per window, in session order. Windows advance by
    max_seq_length - window_context; each later one re-reads the previous window_context positions as
    context, whose predictions the earlier window made, so every position is predicted exactly once, from at
    least window_context positions of history. The one windower: everything else is built on it."""
    predictions = np.asarray(predictions, dtype=np.int64)
    stride = max_seq_length - window_context
    count = 1 + np.maximum(0, -(-(predictions - max_seq_length) // stride))
    session = np.repeat(np.arange(len(predictions)), count)
    k = np.arange(len(session)) - (np.cumsum(count) - count)[session]
    begin = k * stride
    end = np.minimum(begin + max_seq_length, predictions[session])
    return session, begin, end, np.where(k > 0, begin + window_context, 0)


def window_spans(predictions: int, max_seq_length: int, window_context: int) -> list[tuple[int, int, int]]:
    """window_table for one session: [(begin, end, first scored), ...]."""
    _, begin, end, scored = window_table(np.array([predictions]), max_seq_length, window_context)
    return list(zip(begin.tolist(), end.tolist(), scored.tolist()))


class WindowBatch(NamedTuple):
    """One scoring batch: the logits of its windows [rows, time, classes], their targets (context and padding
    IGNORE_INDEX), the session each row belongs to and the session position of its first column."""
    logits: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    offsets: torch.Tensor


class DeepLog(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_size: int = 256,
                 num_layers: int = 2, dropout: float = 0.2):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.end_id, self.pad_id, self.start_id, self.unk_id = special_tokens(vocab_size)
        self.num_classes = vocab_size + 1  # every event, plus end-of-session
        self.model_args = dict(vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size,
                               num_layers=num_layers, dropout=dropout)
        self.embedding = nn.Embedding(vocab_size + 4, embedding_dim, padding_idx=self.pad_id)
        # PyTorch applies LSTM dropout between layers only, so it is a no-op (and warns) with one layer.
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, self.num_classes)
        # Which targets occurred in training (train.py fills it from its counting pass). An event the
        # model never saw is a miss at every k even if it happens to rank high: the model knows nothing
        # of it. Saved in the state dict, so the manual load_state_dict route keeps it too.
        self.register_buffer("seen_events", torch.ones(self.num_classes, dtype=torch.bool))
        # Scoring cuts long sessions into the windows training used (window_spans): from_checkpoint sets the
        # training's data.max_seq_length and data.window_context; these are the config's defaults.
        self.max_seq_length, self.window_context = 256, 32
        self.calibration: dict | None = None      # detection thresholds: set by from_checkpoint
        self.co_occurrence: CoOccurrence | None = None  # event types seen together in training: likewise

    @staticmethod
    def state_shapes(vocab_size: int, embedding_dim: int, hidden_size: int, num_layers: int,
                     dropout: float = 0.0) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor of the state dict of DeepLog(these arguments), without building it."""
        shapes = {"embedding.weight": (vocab_size + 4, embedding_dim)}
        for layer in range(num_layers):
            inputs = embedding_dim if layer == 0 else hidden_size
            shapes.update({f"lstm.weight_ih_l{layer}": (4 * hidden_size, inputs),
                           f"lstm.weight_hh_l{layer}": (4 * hidden_size, hidden_size),
                           f"lstm.bias_ih_l{layer}": (4 * hidden_size,),
                           f"lstm.bias_hh_l{layer}": (4 * hidden_size,)})
        shapes.update({"head.weight": (vocab_size + 1, hidden_size), "head.bias": (vocab_size + 1,),
                       "seen_events": (vocab_size + 1,)})
        return shapes

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Next-event logits [batch, time, vocab_size + 1] for every input position.

        `lengths` is accepted for API symmetry but not needed: batches are right-padded and the LSTM is
        causal, so padding can only influence positions after a sequence's end, which every loss and
        metric masks. Skipping pack_padded_sequence keeps the fast fused cuDNN kernel on GPU.
        """
        # DataParallel replicas see non-contiguous LSTM weights; re-flattening keeps cuDNN's fast path
        # (a no-op on CPU and when already flat).
        self.lstm.flatten_parameters()
        hidden_states, _ = self.lstm(self.embedding(input_ids))
        return self.head(self.dropout(hidden_states))

    @torch.no_grad()
    def advance(self, input_ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the LSTM on from `state` (h, c), each [num_layers, batch, hidden_size] (None: a fresh session):
        the top layer's outputs [batch, time, hidden_size] for input_ids [batch, time], and the state after
        them. Live scoring steps each open session by its new events only (detect.py); self.head(outputs)
        gives the logits. Stepping and one pass over the whole sequence give the same numbers."""
        self.lstm.flatten_parameters()
        outputs, state = self.lstm(self.embedding(input_ids), state)
        return outputs, state

    # ------------------------------------------------------------------ detection helpers
    def encode(self, sessions: Sequence[Sequence[int]] | torch.Tensor,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw sessions -> (inputs, targets), both [batch, longest + 1].

        Accepts one 1-D sequence, a list of sequences, or a 2-D tensor right-padded with any negative
        value. IDs >= vocab_size become unk_id, as inputs and as targets: the head never predicts
        unk_id, so they always count as misses (and never pass for the end-of-session class).
        """
        sessions = _as_list_of_lists(sessions)
        lengths = np.array([len(s) for s in sessions], dtype=np.int64)
        events = np.fromiter((e for s in sessions for e in s), dtype=np.int64, count=int(lengths.sum()))
        laid_out, starts = lay_out(np.where(events >= self.vocab_size, self.unk_id, events), lengths,
                                   self.vocab_size)
        longest = int(lengths.max(initial=0)) + 1
        inputs = torch.full((len(sessions), longest), self.pad_id, dtype=torch.long)
        targets = torch.full((len(sessions), longest), IGNORE_INDEX, dtype=torch.long)
        laid_out = torch.from_numpy(laid_out)
        for row, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            inputs[row, :n + 1] = laid_out[start:start + n + 1]
            targets[row, :n + 1] = laid_out[start + 1:start + n + 2]
        device = device or next(self.parameters()).device
        return inputs.to(device), targets.to(device)

    @torch.no_grad()
    def prediction_ranks(self, inputs: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each position: the rank of the actual event among the logits (0 = top-1) and its
        log-probability.

        One LSTM pass over whole sessions. Targets the model never saw in training (IDs >= vocab_size,
        or IDs absent from the training data) get rank num_classes and log-probability -inf, so they
        miss at every k and under every probability bound. Padding gets rank -1 and log-probability 0.
        """
        return self.ranks_from_logits(self(inputs), targets)

    def ranks_from_logits(self, logits: torch.Tensor,
                          targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        valid = targets != IGNORE_INDEX
        in_head = valid & (targets < self.num_classes)
        safe_targets = torch.where(in_head, targets, 0)
        target_logit = logits.gather(-1, safe_targets.unsqueeze(-1))
        ranks = (logits > target_logit).sum(-1)
        target_log_prob = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
        seen = in_head & self.seen_events[safe_targets]
        ranks = torch.where(seen, ranks, torch.where(valid, self.num_classes, -1))
        target_log_prob = torch.where(seen, target_log_prob, torch.where(valid, float("-inf"), 0.0))
        return ranks, target_log_prob

    @contextlib.contextmanager
    def _evaluating(self):
        """Dropout off for detection, and the caller's train/eval mode restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ scoring in windows
    def set_windows(self, max_seq_length: int, window_context: int) -> "DeepLog":
        """Score sessions in the windows training cut them into (data.max_seq_length, data.window_context)."""
        if not 0 <= window_context < max_seq_length:
            raise ValueError(f"window_context {window_context} must be in [0, max_seq_length "
                             f"{max_seq_length})")
        self.max_seq_length, self.window_context = int(max_seq_length), int(window_context)
        return self

    def use_training_windows(self, checkpoint: dict) -> "DeepLog":
        """The windows of the checkpoint's training config (its data section); the defaults where it has
        none."""
        data = checkpoint.get("config", {}).get("data", {})
        return self.set_windows(data.get("max_seq_length", self.max_seq_length),
                                data.get("window_context", self.window_context))

    def scoring_tokens(self, max_tokens: int | None = None) -> int:
        """Positions per scoring batch: `max_tokens` (SCORING_TOKENS by default) but at most LOGIT_BUDGET
        logits, and always room for one whole window."""
        tokens = min(max_tokens or SCORING_TOKENS, LOGIT_BUDGET // self.num_classes)
        return max(tokens, self.max_seq_length)

    @torch.no_grad()
    def windows(self, sessions: Sequence[Sequence[int]],
                max_tokens: int | None = None) -> Iterator[WindowBatch]:
        """The LSTM's outputs for every prediction of `sessions`, in batches bounded by positions rather than
        sessions (scoring_tokens), so memory does not depend on how long a session is. A session of n events
        has n + 1 predictions (its events, then the end), cut into window_spans as in training; each window
        starts from a fresh hidden state, as in training, and scores only the positions past its context.
        Windows are batched by length (least padding); IDs >= vocab_size are unk_id, as in encode()."""
        device = next(self.parameters()).device
        known = [np.asarray(s, dtype=np.int64) for s in sessions]
        lengths = np.array([len(k) for k in known], dtype=np.int64)
        events = np.concatenate(known) if known else np.zeros(0, np.int64)
        laid_out, starts = lay_out(np.where(events >= self.vocab_size, self.unk_id, events), lengths,
                                   self.vocab_size)
        owner, begin, end, scored = window_table(lengths + 1, self.max_seq_length, self.window_context)
        spans = sorted(zip((end - begin).tolist(), owner.tolist(), begin.tolist(), scored.tolist()))
        budget, first = self.scoring_tokens(max_tokens), 0
        while first < len(spans):
            last = first + 1   # spans are sorted by length: the last row is the longest, the batch's width
            while last < len(spans) and (last + 1 - first) * spans[last][0] <= budget:
                last += 1
            batch = spans[first:last]
            width = batch[-1][0]
            inputs = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            targets = np.full((len(batch), width), IGNORE_INDEX, dtype=np.int64)
            for row, (length, session, window_begin, window_scored) in enumerate(batch):
                at = starts[session] + window_begin
                inputs[row, :length] = laid_out[at:at + length]
                context = window_scored - window_begin   # positions the window only reads
                targets[row, context:length] = laid_out[at + 1 + context:at + 1 + length]
            owners = torch.tensor([span[1] for span in batch], device=device)
            offsets = torch.tensor([span[2] for span in batch], device=device)
            logits = self(torch.from_numpy(inputs).to(device))
            yield WindowBatch(logits, torch.from_numpy(targets).to(device), owners, offsets)
            first = last

    @torch.no_grad()
    def session_scores(self, sessions: Sequence[Sequence[int]], top_ks=(), max_tokens: int | None = None,
                       ) -> dict[str, torch.Tensor]:
        """Per session (float64 tensors on the CPU): predictions (n + 1), misses_at_k for each k in top_ks,
        max_rank (the worst rank of an actual event), min_log_prob (the least likely prediction),
        min_event_log_prob (the least likely event; +inf for an empty session), min_seen_event_log_prob (the
        least likely of the events seen in training), end_log_prob (the end of
        session), loss_sum and loss_count (over targets the model knows) and unknown (events never seen in
        training: rank num_classes, log-probability -inf). Computed over windows (see windows()): a session
        of at most max_seq_length predictions is one window, the whole session in one pass."""
        ks = sorted(set(top_ks))
        n = len(sessions)
        lengths = torch.tensor([len(s) for s in sessions], dtype=torch.long)
        out = {"predictions": torch.zeros(n, dtype=torch.float64),
               "max_rank": torch.full((n,), -1.0, dtype=torch.float64),
               "min_log_prob": torch.full((n,), math.inf, dtype=torch.float64),
               "min_event_log_prob": torch.full((n,), math.inf, dtype=torch.float64),
               "min_seen_event_log_prob": torch.full((n,), math.inf, dtype=torch.float64),
               **{name: torch.zeros(n, dtype=torch.float64)
                  for name in ("end_log_prob", "loss_sum", "loss_count", "unknown")},
               **{f"misses_at_{k}": torch.zeros(n, dtype=torch.float64) for k in ks}}
        with self._evaluating():
            for batch in self.windows(sessions, max_tokens):
                ranks, log_probs = self.ranks_from_logits(batch.logits, batch.targets)
                ranks, log_probs, owners = ranks.cpu(), log_probs.double().cpu(), batch.owners.cpu()
                valid = ranks >= 0
                finite = valid & torch.isfinite(log_probs)
                position = batch.offsets.cpu().unsqueeze(1) + torch.arange(ranks.size(1))
                is_end = valid & (position == lengths[owners].unsqueeze(1))
                # sums in float64: in float32 their rounding would depend on the batch a session lands in
                sums = {"predictions": valid.sum(1), "loss_count": finite.sum(1),
                        "unknown": (valid & ~finite).sum(1),
                        "loss_sum": -torch.where(finite, log_probs, 0.0).sum(1),
                        **{f"misses_at_{k}": ((ranks >= k) & valid).sum(1) for k in ks}}
                for name, values in sums.items():
                    out[name].index_add_(0, owners, values.double())
                out["max_rank"].scatter_reduce_(0, owners, ranks.max(1).values.double(), "amax")
                out["min_log_prob"].scatter_reduce_(
                    0, owners, torch.where(valid, log_probs, math.inf).min(1).values, "amin")
                out["min_event_log_prob"].scatter_reduce_(
                    0, owners, torch.where(valid & ~is_end, log_probs, math.inf).min(1).values, "amin")
                out["min_seen_event_log_prob"].scatter_reduce_(
                    0, owners, torch.where(finite & ~is_end, log_probs, math.inf).min(1).values, "amin")
                has_end = is_end.any(1)
                out["end_log_prob"][owners[has_end]] = log_probs[is_end]
        return out

    @torch.no_grad()
    def calculate_anomaly_score(self, input_ids, top_k: int = 10) -> torch.Tensor:
        """Per session: the fraction of its next-event predictions (start and end included) whose
        actual event is outside the top_k. Takes a 1-D sequence or a right-padded 2-D batch."""
        scores = self.session_scores(_as_list_of_lists(input_ids), [top_k])
        return (scores[f"misses_at_{top_k}"] / scores["predictions"].clamp(min=1)).float()

    @torch.no_grad()
    def diagnose(self, input_ids, top_k: int = 10, max_misses: int | None = None,
                 log_prob_bound: float | None = None,
                 end_log_prob_bound: float | None = None) -> list[list[dict]] | list[dict]:
        """Per session, each miss: its position (0 = the first event, n = the end), the actual event
        ("<end>" for the end of session), its probability and the top_k events the model expected, best
        first. A miss is an actual event outside the top_k or, given log_prob_bound, less likely than it
        (the end of session: than end_log_prob_bound, when given). The first max_misses, in session order.
        One session (a 1-D input) gives its list of misses; a batch, one list per session."""
        if _is_one_session(input_ids):
            return self.diagnose(_as_list_of_lists(input_ids), top_k, max_misses, log_prob_bound,
                                 end_log_prob_bound)[0]
        sessions = _as_list_of_lists(input_ids)
        label = lambda token: "<end>" if token == self.end_id else int(token)  # noqa: E731
        found: list[list[tuple[int, dict]]] = [[] for _ in sessions]
        with self._evaluating():
            for batch in self.windows(sessions):
                ranks, log_probs = self.ranks_from_logits(batch.logits, batch.targets)
                missed = ranks >= top_k
                if log_prob_bound is not None:
                    bounds = torch.full_like(log_probs, log_prob_bound)
                    if end_log_prob_bound is not None:
                        bounds[batch.targets == self.end_id] = end_log_prob_bound
                    missed |= (ranks >= 0) & (log_probs < bounds)
                rows, columns = torch.nonzero(missed, as_tuple=True)
                if not len(rows):
                    continue
                expected = batch.logits[rows, columns].topk(min(top_k, self.num_classes), dim=-1).indices
                for row, column, ranked in zip(rows.tolist(), columns.tolist(), expected.tolist()):
                    owner, position = int(batch.owners[row]), int(batch.offsets[row]) + column
                    events = sessions[owner]
                    # the real ID, even an unknown one
                    actual = events[position] if position < len(events) else "<end>"
                    found[owner].append((position, {
                        "position": position, "actual": actual,
                        "probability": float(log_probs[row, column].exp()),
                        "expected": [label(t) for t in ranked]}))
                    if max_misses is not None and len(found[owner]) > 2 * max_misses:   # memory stays bounded
                        found[owner] = sorted(found[owner], key=lambda item: item[0])[:max_misses]
        return [[miss for _, miss in sorted(misses, key=lambda item: item[0])][:max_misses]
                for misses in found]

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "DeepLog":
        """Build the model from a checkpoint written by train.py, validated by its one loader
        (utils.load_checkpoint: weights_only, no pickled code, every key checked), with its calibration and
        record of event types seen together in training, scoring in the windows it was trained with."""
        import utils  # the checkpoint's owner (it imports this module lazily: no cycle)

        return utils.model_from_checkpoint(utils.load_checkpoint(path, map_location), path)

    @torch.no_grad()
    def verdict(self, input_ids, rule: str | None = None) -> list[str]:
        """"abnormal" or "normal" per session: the calibrated rule stored with the model (the checkpoint's
        decision rule unless `rule` names another), with the thresholds and the record of event types seen
        together in training that from_checkpoint loaded: the same verdict as `evaluate.py --detect`."""
        if self.calibration is None:
            raise ValueError("this model holds no calibration: load it with DeepLog.from_checkpoint from a "
                             "checkpoint whose training ended (or calibrate with evaluate.py --calibrate-on)")
        sessions = _as_list_of_lists(input_ids)
        top_k = self.calibration["top_k"]
        scores = {name: column.numpy() for name, column in self.session_scores(sessions, [top_k]).items()}
        co_occurrence = self.co_occurrence or CoOccurrence(self.vocab_size)
        scores["novel_set"], scores["novel_pair"] = co_occurrence.novel(sessions)
        scores["count_distance"] = co_occurrence.distance(sessions)
        from calibration import checked, verdicts  # the rules' owner (it imports this module: no cycle here)

        calibration = checked(self.calibration, "model.calibration")   # one set by hand, of any form
        flagged = verdicts(scores, calibration, rule or calibration["default_rule"])
        return ["abnormal" if abnormal else "normal" for abnormal in flagged.tolist()]


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

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "CoOccurrence":
        """The checkpoint's "event_sets" (lists of IDs) and "event_pairs" (an [n, 2] tensor). Checkpoints
        written before pairs were recorded get the pairs of their sets, which is what training would have
        recorded."""
        vocab_size = checkpoint["model_args"]["vocab_size"]
        sets, pairs = checkpoint.get("event_sets"), checkpoint.get("event_pairs")
        if pairs is not None:
            pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2).numpy()
            pairs = pairs[:, 0] * vocab_size + pairs[:, 1]
        elif sets is not None and "event_pairs" not in checkpoint:
            pairs = pairs_of_sets(sets, vocab_size)
        counts = checkpoint.get("count_vectors")
        return cls(vocab_size, sets, pairs, None if counts is None else CountVectors.from_state(counts))

    def distance(self, sessions: Sequence[Sequence[int]]) -> np.ndarray:
        """Per session: the L1 distance of its event counts to the nearest normal training session's (0 where
        that record is not kept)."""
        return np.zeros(len(sessions)) if self.counts is None else self.counts.nearest(sessions)

    def pair_table(self) -> torch.Tensor | None:
        """The pairs as an [n, 2] tensor of (first, second) IDs, as checkpoints store them."""
        if self.pairs is None:
            return None
        return torch.from_numpy(np.stack(np.divmod(self.pairs, self.vocab_size), axis=1))

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
    width = int(tokens.max()) + 1
    codes, counts = np.unique(np.repeat(np.arange(len(sessions), dtype=np.int64), lengths) * width + tokens,
                              return_counts=True)
    owners, types = np.divmod(codes, width)
    return owners, types, counts.astype(np.int64)


class CountVectors:
    """The distinct event-count vectors of the normal training sessions (how often each event type occurs in a
    session), each with the number of sessions that had it: a bounded record (None beyond MAX_COUNT_VECTORS or
    MAX_COUNT_ENTRIES) from which the count-vector rule measures how far a session is from the nearest normal
    one (L1 distance: events added or missing), and from which the training data's own novelty is
    counted: how many training sessions bring an event type, a set of types or a pair of types that no other
    one has."""

    def __init__(self, entries: np.ndarray, weights: np.ndarray):
        self.entries = np.asarray(entries, dtype=np.int64).reshape(-1, 3)   # (vector, event ID, count)
        self.weights = np.asarray(weights, dtype=np.int64)                   # sessions per distinct vector
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

    @classmethod
    def from_state(cls, state: dict) -> "CountVectors":
        """From the checkpoint's "count_vectors": {"entries": [E, 3] integer tensor of (vector, event ID,
        count), "weights": [D] integer tensor}; ValueError saying what is wrong with any other content."""
        if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor)
                                                  for k in ("entries", "weights")):
            raise ValueError("count_vectors must hold the tensors 'entries' and 'weights'")
        entries, weights = state["entries"], state["weights"]
        if entries.is_floating_point() or weights.is_floating_point() or entries.dim() != 2 \
                or entries.size(1) != 3 or weights.dim() != 1:
            raise ValueError("count_vectors: entries must be an [n, 3] and weights a [d] integer tensor")
        entries, weights = entries.long().numpy(), weights.long().numpy()
        if len(weights) > MAX_COUNT_VECTORS or len(entries) > MAX_COUNT_ENTRIES or (weights < 1).any() or \
                (entries < 0).any() or (entries[:, 2] < 1).any() or \
                (len(entries) and entries[:, 0].max() >= len(weights)):
            raise ValueError("count_vectors: counts, weights or vector indexes out of range")
        return cls(entries, weights)

    def state(self) -> dict:
        return {"entries": torch.from_numpy(self.entries.copy()),
                "weights": torch.from_numpy(self.weights.copy())}

    def _nearest(self, owners, types, counts, sessions: int, self_rows: bool = False) -> np.ndarray:
        """Per session (entries of count_entries' form): the L1 distance to the nearest stored vector, as
        |session| + |vector| - 2 sum over types of min(session count, vector count), in blocks of sessions
        so that memory stays within DISTANCE_BUDGET. self_rows: session i is stored vector i, left out."""
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
        return nearest

    def nearest(self, sessions: Sequence[Sequence[int]]) -> np.ndarray:
        """Per session: the L1 distance of its count vector to the nearest stored one (events added or
        missing; an event type the record never had counts in full)."""
        return self._nearest(*count_entries(sessions), len(sessions))

    def leave_one_out(self) -> np.ndarray:
        """Per stored vector: the distance of one of its sessions to the nearest other training session (0
        when another session has the same vector; inf when it is the only session)."""
        nearest_other = self._nearest(*self.entries.T, len(self.weights), self_rows=True)
        return np.where(self.weights > 1, 0.0, nearest_other)

    def novelty(self, vocab_size: int) -> dict[str, int]:
        """How many training sessions bring what no other training session has: an event type, a set of event
        types, a pair of event types (types below vocab_size). On a new normal session, each rule of that name
        fires about as often as this count divided by the sessions (leave one out)."""
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


def _as_list_of_lists(sessions) -> list[list[int]]:
    """One sequence, a list of sequences or a 1-D/2-D tensor -> lists of IDs, negative padding removed. An
    empty session (after its padding) is a ValueError, an ID that is not an integer a TypeError."""
    if isinstance(sessions, (str, bytes)):
        raise TypeError(f"input_ids must be event IDs (integers), got {sessions[:40]!r}")
    if isinstance(sessions, (torch.Tensor, np.ndarray)):
        if sessions.ndim not in (1, 2):
            raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(sessions.shape)}")
        sessions = sessions.tolist() if sessions.ndim == 2 else [sessions.tolist()]
    else:
        sessions = list(sessions)
        if not sessions or not isinstance(sessions[0], (list, tuple, torch.Tensor, np.ndarray)):
            sessions = [sessions]
    out = []
    for session in sessions:
        ids = [_event_id(x) for x in (session.tolist() if hasattr(session, "tolist") else session)]
        ids = [x for x in ids if x >= 0]
        if not ids:
            raise ValueError("a session of input_ids is empty: a session holds at least one event")
        out.append(ids)
    return out


def _event_id(value) -> int:
    """An event ID as given: a Python or numpy integer (a float, a bool or a string is a TypeError)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError(f"event IDs must be integers, got {value!r:.40}")


def _is_one_session(sessions) -> bool:
    """A 1-D input (one session of IDs) rather than a batch of sessions."""
    if isinstance(sessions, (torch.Tensor, np.ndarray)):
        return sessions.ndim == 1
    sessions = list(sessions)
    return bool(sessions) and not isinstance(sessions[0], (list, tuple, torch.Tensor, np.ndarray))
