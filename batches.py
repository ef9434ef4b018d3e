"""Reading the token cache (cache.py builds and verifies it): CachedSessions (the windows of a split through
a keyed permutation, a global shuffle in O(1) memory), the window index of a split, and the sessions of the
caches in chunks for scoring.

Examples:

    from batches import CachedSessions
    from cache import build_caches, cache_settings
    from config import Config
    entries = build_caches(["data/sample/train/part-003.txt"], cache_settings(Config(), 29), "/tmp/cache")
    data = CachedSessions(entries, 29, split="train")
    for batch, position in data.batches(256):
        ...
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import utils
from cache import (
    FLAG_ABNORMAL,
    FLAG_APART,
    FLAG_CALIBRATION,
    FLAG_VALIDATION,
    PASS_SESSIONS,
    TAIL,
    VERIFIED,
    Mapped,
    Part,
    Writer,
    event_pairs_of,
    fields_problem,
    file_record,
    files_signature,
    log,
    open_entries,
    writable,
)
from config import Config
from dataset import DataError
from rules import merge_co_occurrence
from tokens import window_table
from utils import one_line

_DEFAULTS = Config()   # the one place defaults live
SPLITS = ("train", "val", "all")


def session_selection(flags: np.ndarray, split: str) -> np.ndarray:
    """Which sessions of a part a split holds: normal ones, on that side of the validation split."""
    normal = (flags & FLAG_ABNORMAL) == 0
    if split == "all":
        return normal
    validation = (flags & FLAG_VALIDATION) != 0
    return normal & (flags & FLAG_APART == 0) & (validation if split == "val" else ~validation)


class CachedSessions:
    """Windows of normal sessions from one side of the split, read from token caches; the interface of
    dataset.SessionDataset. An epoch's order is a keyed permutation of all windows, a function of (seed,
    epoch); rank r takes every world_size-th window. `batches(start_batch=N)` starts at batch N directly.
    Batches are assembled a block (`buffer_size` windows) at a time; `length_bucketing` sorts a block by
    length (little padding, but on HDFS it trained worse: benchmarks/README.md)."""

    def __init__(self, entries: list[Path], vocab_size: int, split: str = "train",
                 seed: int = _DEFAULTS.training.seed, max_seq_length: int = _DEFAULTS.data.max_seq_length,
                 window_context: int = _DEFAULTS.data.window_context,
                 shuffle: bool = _DEFAULTS.lazy_loading.shuffle_buffer, rank: int = 0, world_size: int = 1,
                 samples_per_rank: int | None = None, buffer_size: int = _DEFAULTS.lazy_loading.buffer_size,
                 lazy: bool = _DEFAULTS.lazy_loading.enabled,
                 length_bucketing: bool = _DEFAULTS.lazy_loading.length_bucketing):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split}")
        if not 0 <= window_context < max_seq_length:
            raise ValueError("window_context must be in [0, max_seq_length)")
        self.vocab_size, self.split, self.seed = vocab_size, split, seed
        self.max_seq_length, self.window_context, self.shuffle = max_seq_length, window_context, shuffle
        self.rank, self.world_size, self.samples_per_rank = rank, world_size, samples_per_rank
        self.buffer_size, self.lazy, self.length_bucketing = buffer_size, lazy, length_bucketing
        self.shard_by_file = False  # every rank reads every cache: the permutation spreads windows over ranks
        self.epoch = 0
        self.entries = list(entries)
        self.metas = open_entries(self.entries)
        # a map each of the tokens, the window starts and the window lengths
        _allow_open_files(3 * sum(len(meta["parts"]) for meta in self.metas))
        self.parts, self.windows = [], []
        for entry, meta in zip(entries, self.metas):
            for summary in meta["parts"]:
                prefix = entry / f"part-{summary['part']}"
                self.parts.append(Part(prefix, summary, meta["key"]["path"], vocab_size, lazy))
                self.windows.append(self._window_index(prefix, self.parts[-1]))
        counts = np.array([len(w["starts"].array) for w in self.windows], dtype=np.int64)
        self.window_bounds = np.concatenate([[0], np.cumsum(counts)])
        self.total_windows = int(self.window_bounds[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------ the window index
    def _window_index(self, prefix: Path, part: Part) -> dict:
        """Start (in tokens) and length of every window of this split (negative: it re-reads window_context
        positions of the previous one), derived once and kept beside the cache with its checksums."""
        name = f"{prefix}.windows-{self.split}-{self.max_seq_length}-{self.window_context}"
        problem = _window_index_problem(name)
        if problem is not None:
            if problem != "absent":
                log.info(f"Token cache of {part.file}: window index {Path(name).name}: {problem}; "
                         f"rebuilding it")
            if not writable(prefix.parent):   # a read-only cache: the index goes to a private folder
                name = str(_private_folder() / hashlib.sha1(name.encode()).hexdigest())
                problem = _window_index_problem(name)
            if problem is not None:
                _write_window_index(name, part, self.split, self.max_seq_length, self.window_context)
        return {"starts": Mapped(Path(f"{name}.starts"), np.int64, self.lazy),
                "lengths": Mapped(Path(f"{name}.lengths"), np.int32, self.lazy)}

    # ------------------------------------------------------------------ counts
    def count(self) -> dict:
        """Sessions, windows and predicted tokens of this split (no parsing); with the training split also
        the targets it holds and which event types occur together (None for other splits)."""
        sessions = abnormal = tokens = 0
        step = PASS_SESSIONS
        for part in self.parts:
            for begin in range(0, part.sessions, step):
                flags = part["flags"][begin:begin + step]
                sessions += int(session_selection(flags, self.split).sum())
                abnormal += int(((flags & FLAG_ABNORMAL) != 0).sum())
        for windows in self.windows:
            for begin in range(0, len(windows["lengths"].array), step):
                lengths = windows["lengths"].array[begin:begin + step]
                tokens += int(np.abs(lengths).sum()) - self.window_context * int((lengths < 0).sum())
        self._release()
        bad = [p for meta in self.metas for p in meta["parts"] if p["bad_records"]]
        seen = sorted({t for meta in self.metas for p in meta["parts"] for t in (p["seen_targets"] or [])})
        co_occurrence = {"event_sets": None, "event_pairs": None}
        if self.split == "train":
            co_occurrence = merge_co_occurrence([
                {"event_sets": meta["event_sets"],
                 "event_pairs": None if meta["event_pairs"] is None else event_pairs_of(entry)}
                for entry, meta in zip(self.entries, self.metas)])
        return {"sessions": sessions, "abnormal_skipped": abnormal,
                "bad_records": sum(p["bad_records"] for p in bad),
                "first_bad_record": bad[0]["first_bad_record"] if bad else None,
                "windows": self.total_windows, "tokens": tokens,
                "seen_targets": seen if self.split == "train" else None, **co_occurrence}

    # ------------------------------------------------------------------ epochs
    def windows_per_rank(self) -> int:
        if self.samples_per_rank is not None:
            return min(self.samples_per_rank, self.total_windows // self.world_size)
        return self.total_windows // self.world_size if self.world_size > 1 else self.total_windows

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[tuple[dict, int]]:
        """Padded batches with their position: the number of batches of this epoch done after this one."""
        count = self.windows_per_rank()
        block = max(1, self.buffer_size // batch_size) * batch_size if self.shuffle else batch_size * 64
        first_block = start_batch * batch_size // block
        for block_start in range(first_block * block, count, block):
            positions = np.arange(block_start, min(block_start + block, count), dtype=np.int64)
            batches = self._block(positions, batch_size, block_start // block)
            done = block_start // batch_size
            for batch in batches:
                done += 1
                if done > start_batch:
                    yield batch, done

    def _block(self, positions: np.ndarray, batch_size: int, block_number: int) -> list[dict]:
        """The batches of one block, its windows read in the caches' order (locality), then put back in the
        permutation's order (length_bucketing: sorted by length, the batches in a seeded random order)."""
        ids = positions * self.world_size + self.rank
        cuts = np.arange(0, len(ids), batch_size)
        batch_order = np.arange(len(cuts))
        if not self.shuffle:
            rows, lengths, context = self._gather(ids)
        else:  # which windows form this block, and in which order: a keyed permutation of all of them
            ids = keyed_permutation(ids, self.total_windows, f"{self.seed}:{self.epoch}")
            read_order = np.argsort(ids)
            rows, lengths, context = self._gather(ids[read_order])
            if self.length_bucketing:  # batches of windows alike in length carry little padding
                order = np.argsort(lengths.astype(np.int16 if self.max_seq_length < 2 ** 15 else np.int32),
                                   kind="stable")  # a radix sort for int16
                rng = np.random.default_rng([self.seed % 2 ** 32, self.epoch, block_number])
                batch_order = rng.permutation(len(cuts))
            else:  # back to the permutation's order: the inverse of read_order
                order = np.empty_like(read_order)
                order[read_order] = np.arange(len(read_order))
            rows = rows.index_select(0, torch.from_numpy(order))
            lengths, context = lengths[order], context[order]
        widths = np.maximum.reduceat(lengths, cuts).tolist()
        rows = rows.split(batch_size)
        lengths = torch.from_numpy(lengths.astype(np.int64)).split(batch_size)
        context = torch.from_numpy(np.where(context, self.window_context, 0).astype(np.int64))
        context = context.split(batch_size)
        # inputs row[:-1], targets row[1:], both views; positions from `lengths` on and the first `context`
        # targets are masked where the batch lands (dataset.batch_to_device), not here
        return [{"input_ids": rows[k][:, :widths[k]], "targets": rows[k][:, 1:widths[k] + 1],
                 "lengths": lengths[k], "context": context[k]} for k in batch_order.tolist()]

    def _gather(self, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """For sorted global window ids: [windows, longest + 1] rows of tokens from each window's start, the
        windows' lengths, and whether each re-reads window_context positions of the previous window."""
        bounds = np.searchsorted(ids, self.window_bounds)
        pieces = []
        for part in np.flatnonzero(np.diff(bounds)).tolist():
            local = torch.from_numpy(ids[bounds[part]:bounds[part + 1]] - self.window_bounds[part])
            windows = self.windows[part]
            pieces.append((part, windows["starts"].tensor.index_select(0, local),
                           windows["lengths"].tensor.index_select(0, local)))
        signed = torch.cat([lengths for _, _, lengths in pieces]) if len(pieces) > 1 else pieces[0][2]
        signed = signed.numpy()
        lengths = np.abs(signed)
        width = int(lengths.max()) + 1
        rows = []
        for part, local, _ in pieces:
            tokens = self.parts[part].rows
            if width <= TAIL:  # every window is a contiguous slice: one index_select of overlapping rows
                rows.append(tokens.unfold(0, width, 1).index_select(0, local))
            else:
                rows.append(tokens[(local[:, None] + torch.arange(width)).clamp(max=len(tokens) - 1)])
        rows = torch.cat(rows) if len(rows) > 1 else rows[0]
        return (rows.to(torch.int32) if rows.dtype == torch.uint16 else rows), lengths, signed < 0

    def _release(self) -> None:
        for part in self.parts:
            part.release()
        for windows in self.windows:
            windows["starts"].release()
            windows["lengths"].release()


def _window_index_problem(name: str) -> str | None:
    """None when a window index is intact (NAME.json records both files' size and CRC-32), else why not."""
    files = {k: Path(f"{name}.{k}") for k in ("json", "starts", "lengths")}
    if not files["json"].exists():
        return "absent"
    try:
        record = json.loads(files["json"].read_text())
        types = {"size": (int,), "crc32": (int,)}
        problem = fields_problem(record, {"starts": (dict,), "lengths": (dict,)}, files["json"].name) or \
            fields_problem(record["starts"], types, "starts") or \
            fields_problem(record["lengths"], types, "lengths")
        if problem is not None:
            return problem
        signature = files_signature(files.values())
        if VERIFIED.get(name) == signature:
            return None
        for k in ("starts", "lengths"):
            actual = file_record(files[k])
            if actual != record[k]:
                return f"{files[k].name} has {actual['size']} bytes, CRC-32 {actual['crc32']:08x}: " \
                       f"not the recorded {record[k]['size']}, {record[k]['crc32']:08x}"
    except (OSError, ValueError) as error:
        return f"{type(error).__name__}: {one_line(error)}"
    VERIFIED[name] = signature
    return None


def _write_window_index(name: str, part: Part, split: str, max_seq_length: int,
                        window_context: int) -> None:
    """The window index of a split; its record is written last, so its presence means both files are whole."""
    temp = {k: Path(f"{name}.{k}.{os.getpid()}.tmp") for k in ("starts", "lengths")}
    writers = {k: Writer(path) for k, path in temp.items()}
    try:
        for begin in range(0, part.sessions, PASS_SESSIONS):
            end = min(begin + PASS_SESSIONS, part.sessions)
            offsets = np.array(part["offsets"][begin:end + 1])
            chosen = session_selection(part["flags"][begin:end], split)
            starts, lengths = _windows_of(offsets[:-1][chosen], (np.diff(offsets) - 2)[chosen],
                                          max_seq_length, window_context)
            writers["starts"].write(starts)
            writers["lengths"].write(lengths)
        for writer in writers.values():
            writer.handle.flush()
            os.fsync(writer.handle.fileno())
    except BaseException:
        for path in temp.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        for writer in writers.values():
            writer.close()
    for k, path in temp.items():
        os.replace(path, f"{name}.{k}")
    record = {k: writer.record() for k, writer in writers.items()}
    utils.atomic_write(f"{name}.json", lambda handle: handle.write(json.dumps(record).encode()))
    VERIFIED[name] = files_signature(Path(f"{name}.{k}") for k in ("json", "starts", "lengths"))
    part.release()


def _private_folder() -> Path:
    """Where this user keeps what a read-only cache cannot hold (window indexes)."""
    folder = Path(tempfile.gettempdir()) / f"deeplog-windows-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _allow_open_files(needed: int) -> None:
    """Every map holds a file descriptor: raise this process's soft limit towards the hard one if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    wanted = in_use + needed + 64
    if wanted <= soft:
        return
    if hard != resource.RLIM_INFINITY and wanted > hard:
        raise DataError(f"the token caches need {needed} open files, more than this system allows ({hard}, "
                        f"ulimit -n): use fewer, bigger data files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _windows_of(starts: np.ndarray, lengths: np.ndarray, max_seq_length: int, window_context: int):
    """(window starts, window lengths) of sessions (start token's place, events) by tokens.window_table."""
    session, begin, end, scored = window_table(lengths + 1, max_seq_length, window_context)
    window_lengths = (end - begin).astype(np.int32)
    return (starts[session] + begin).astype(np.int64), np.where(scored > 0, -window_lengths, window_lengths)


def keyed_permutation(values: np.ndarray, n: int, key: str) -> np.ndarray:
    """A pseudo-random bijection of [0, n) applied to `values`: a 4-round Feistel network over the smallest
    even number of bits covering n, cycle-walking values that land outside [0, n) (products wrap)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    dtype = np.uint32 if half <= 16 else np.uint64
    mask, shift = dtype((1 << half) - 1), dtype(half)
    round_keys = np.frombuffer(hashlib.blake2b(key.encode(), digest_size=32).digest(), dtype=np.uint64)
    round_keys = [dtype(int(k) & ((1 << half) - 1)) for k in round_keys]
    multiplier, fold = (dtype(0x9E3779B1), dtype(16)) if dtype is np.uint32 else \
        (dtype(0xBF58476D1CE4E5B9), dtype(31))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for round_key in round_keys:
            mixed = (right ^ round_key) * multiplier
            mixed ^= mixed >> fold
            left, right = right, left ^ (mixed & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = encrypt(values.astype(dtype))
        outside = out >= n
        while outside.any():
            out[outside] = encrypt(out[outside])
            outside = out >= n
    return out.astype(np.int64)


# ----------------------------------------------------------------------------- sessions for evaluation
def session_chunks(entries: list[Path], wanted: str, chunk_size: int = 4096,
                   max_events: int = 2 ** 22) -> Iterator[list[tuple]]:
    """Sessions of the caches as chunks of event-ID tuples, in file order: `wanted` is "calibration" or
    "evaluation" (the halves of the normal validation split, or of all normal sessions when the split is 0),
    "normal", "train", "abnormal" or "all". A chunk holds at most `chunk_size` sessions and, past its first,
    `max_events` events."""
    for entry, meta in zip(entries, open_entries(entries)):
        split_is_zero = meta["key"]["validation_split"] == 0
        for summary in meta["parts"]:
            part = Part(entry / f"part-{summary['part']}", summary, meta["key"]["path"])
            all_offsets, begin = part["offsets"], 0
            while begin < part.sessions:
                # the largest end within both bounds, at least one session past begin
                end = int(np.searchsorted(all_offsets, all_offsets[begin] + max_events, side="right")) - 1
                end = min(max(end, begin + 1), begin + chunk_size, part.sessions)
                flags = part["flags"][begin:end]
                abnormal = (flags & FLAG_ABNORMAL) != 0
                apart = (flags & FLAG_APART) != 0   # on neither side of the split
                if wanted == "all":
                    chosen = np.ones(len(flags), dtype=bool)
                elif wanted == "abnormal":
                    chosen = abnormal
                elif wanted == "normal":
                    chosen = ~abnormal
                elif wanted == "train":   # the normal sessions training learned from
                    chosen = ~abnormal & ~apart & (split_is_zero | ((flags & FLAG_VALIDATION) == 0))
                else:
                    held_out = ~abnormal & ~apart & (split_is_zero | ((flags & FLAG_VALIDATION) != 0))
                    calibration = (flags & FLAG_CALIBRATION) != 0
                    chosen = held_out & (calibration if wanted == "calibration" else ~calibration)
                indices = np.flatnonzero(chosen)
                if len(indices):
                    offsets = part["offsets"][begin:end + 1]
                    tokens = part.tokens.array[offsets[0]:offsets[-1]].tolist()
                    local = (offsets - offsets[0]).tolist()
                    yield [tuple(tokens[local[i] + 1:local[i + 1] - 1]) for i in indices.tolist()]
                begin = end
            part.release()

