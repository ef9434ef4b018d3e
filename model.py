"""DeepLog: an LSTM that predicts the next log event key of a session, and its per-position math (ranks,
probabilities, windows, per-session sums). The network only: torch and numpy, no files, config or rules.

Examples:

    from model import DeepLog
    model = DeepLog(vocab_size=28, hidden_size=64, num_layers=2)           # a new network
    print(model.calculate_anomaly_score([22, 5, 5, 5, 11, 9], top_k=10))    # tensor([...]) per session
    print(model.diagnose([22, 5, 5, 5, 11, 9], top_k=10))   # one session: its misses, as a list of dicts

    # a trained one, with its thresholds and records: the checkpoint's owner builds it
    from checkpoint import load_model
    from scoring import verdict
    model = load_model("outputs/checkpoints/best_model.pt")
    print(verdict(model, [[22, 5, 5, 5, 11, 9], [22, 5]]))    # 'normal' or 'abnormal' per session

    # the manual route works too
    import torch
    ckpt = torch.load("outputs/checkpoints/best_model.pt", map_location="cpu", weights_only=True)
    model = DeepLog(**ckpt["model_args"])
    model.load_state_dict(ckpt["model_state_dict"])

Run from the repository root, or put it on the path first (sys.path.insert(0, "/path/to/deeplog")): the
scripts are flat modules, not an installed package. The token layout (start, end, padding and unknown tokens
above the user's IDs) and the windows long sessions are cut into are tokens.py's.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokens import IGNORE_INDEX, lay_out, special_tokens, window_table

SCORING_TOKENS = 2 ** 13   # positions (rows x padded length) per scoring batch, by default
LOGIT_BUDGET = 2 ** 24     # logits per scoring batch: a big vocabulary gets fewer positions, memory bounded


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
        # Scoring cuts long sessions into the windows training used (window_spans): checkpoint.load_model sets
        # training's data.max_seq_length and data.window_context; these are the config's defaults.
        self.max_seq_length, self.window_context = 256, 32
        # What detection needs beside the weights, set by checkpoint.load_model from a trained checkpoint:
        # the calibration (a validated dict of thresholds) and the records of event types seen together in
        # training (rules.CoOccurrence). The network itself never reads them.
        self.calibration: dict | None = None
        self.co_occurrence = None

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

    # ------------------------------------------------------------------ stepped: the recurrent state
    # A state is a tuple of tensors [num_layers, batch, hidden_size], the LSTM's (h, c), saved by these names
    # (live_state.py). Live scoring steps each session by its new events, indexing the tensors one by one by
    # session (live_scorer.py): what they are, another kind of RNN included, is this class's alone.
    state_names = ("h", "c")

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """The state of `batch` sessions before any input: zeros."""
        layers, hidden = self.lstm.num_layers, self.lstm.hidden_size
        return tuple(torch.zeros(layers, batch, hidden) for _ in self.state_names)

    @staticmethod
    def last_output(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The top layer's output after the state's last input [batch, hidden_size]: self.head of it gives the
        logits of the next event."""
        return state[0][-1]

    @torch.no_grad()
    def advance(self, input_ids: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run on from `state` (None: a fresh session): the top layer's outputs [batch, time, hidden_size] for
        input_ids [batch, time], and the state after them. Stepping and one pass over the whole sequence give
        the same numbers."""
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
        sessions = as_sessions(sessions)
        lengths = np.array([len(s) for s in sessions], dtype=np.int64)
        events = np.fromiter((e for s in sessions for e in s), dtype=np.int64, count=int(lengths.sum()))
        laid_out, starts = lay_out(self.known(events), lengths, self.vocab_size)
        longest = int(lengths.max(initial=0)) + 1
        inputs = torch.full((len(sessions), longest), self.pad_id, dtype=torch.long)
        targets = torch.full((len(sessions), longest), IGNORE_INDEX, dtype=torch.long)
        laid_out = torch.from_numpy(laid_out)
        for row, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            inputs[row, :n + 1] = laid_out[start:start + n + 1]
            targets[row, :n + 1] = laid_out[start + 1:start + n + 2]
        device = device or next(self.parameters()).device
        return inputs.to(device), targets.to(device)

    def known(self, events: np.ndarray) -> np.ndarray:
        """Event IDs as the model reads and scores them: one it never had (>= vocab_size) is unk_id."""
        return np.where(events >= self.vocab_size, self.unk_id, events)

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
        laid_out, starts = lay_out(self.known(events), lengths, self.vocab_size)
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
        scores = self.session_scores(as_sessions(input_ids), [top_k])
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
            return self.diagnose(as_sessions(input_ids), top_k, max_misses, log_prob_bound,
                                 end_log_prob_bound)[0]
        sessions = as_sessions(input_ids)
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


def as_sessions(sessions) -> list[list[int]]:
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
