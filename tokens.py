"""The token layout of sessions and the windows they are cut into: the one definition that the network,
training, the cache, batch scoring and live scoring share (numpy only).

Examples:

    from tokens import lay_out, window_spans
    laid_out, starts = lay_out(np.array([5, 7, 9]), np.array([3]), vocab_size=28)  # [30, 5, 7, 9, 28]
    window_spans(4, max_seq_length=256, window_context=32)   # [(0, 4, 0)]: one window, every position scored
    window_runs(250, 260, max_seq_length=256, window_context=32)  # [(250, 256, False), (256, 260, True)]

Token layout. User event IDs 0..vocab_size-1 are used unchanged. The special tokens live above them:

    end_id   = vocab_size      end of session: a prediction target, never an input
    pad_id   = vocab_size + 1  right padding of a batch
    start_id = vocab_size + 2  session start: the first input, so the first event is predicted too
    unk_id   = vocab_size + 3  input stand-in for an ID the model never had (>= vocab_size)

A session e1..en becomes inputs [start, e1..en] and targets [e1..en, end]: n + 1 predictions. The
head scores vocab_size + 1 classes (every event plus "end"), so an unexpected first event or a session
that stops early is a miss like any other.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # target value for padding: cross_entropy skips it, metrics mask it


def special_tokens(vocab_size: int) -> tuple[int, int, int, int]:
    """(end_id, pad_id, start_id, unk_id): all above the user's IDs, which are never shifted."""
    return vocab_size, vocab_size + 1, vocab_size + 2, vocab_size + 3


def lay_out(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int,
            dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """The token layout of sessions, concatenated: [start, e1..en, end] per session, and where each begins.
    A window [begin, end) reads inputs layout[begin:end] and targets layout[begin + 1:end + 1]."""
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
    and scoring alike: (session, begin, end, first scored) per window. Each later window re-reads the previous
    window_context positions as context, so every position is predicted exactly once, from at least
    window_context positions of history."""
    predictions = np.asarray(predictions, dtype=np.int64)
    stride = window_stride(max_seq_length, window_context)
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


def window_stride(max_seq_length: int, window_context: int) -> int:
    """How far each window begins after the one before it (it re-reads the last window_context positions)."""
    return max_seq_length - window_context


def window_runs(begin: int, end: int, max_seq_length: int, window_context: int
                ) -> list[tuple[int, int, bool]]:
    """window_table for a session that grows: its positions [begin, end) as runs (begin, end, fresh), cut
    where a window's scored positions begin; a fresh run starts from a fresh state over its context, any
    other goes on from the state before it (live_scorer.py)."""
    stride = window_stride(max_seq_length, window_context)
    cut = max(begin, max_seq_length)
    cut += (window_context - cut) % stride   # the first window past the first to begin scoring at >= begin
    starts = [begin, *range(cut + stride if cut == begin else cut, end, stride)]
    return [(a, b, a >= cut) for a, b in zip(starts, [*starts[1:], end])]
