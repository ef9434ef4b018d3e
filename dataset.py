"""Streaming readers for parsed log sessions, and the IterableDataset that feeds training.

Examples:

    python dataset.py data/sample                 # count sessions/windows per file, validate every record
    python dataset.py ../shared/data/hdfs/hdfs_train --vocab-size 29

    from dataset import iter_sessions
    for record in iter_sessions("data/sample", vocab_size=29):
        print(record.file, record.index, record.session_id, record.event_ids, record.label)

Formats (files read in sorted order; `.gz` of each read transparently):
    *.json   a top-level array of session objects, or an object holding that array under `json_array_key`
    *.jsonl  one session object per line
    other    DeepLog text: one session per line, event IDs separated by spaces (.txt, .log or no suffix)
A session object holds a list of integer IDs under `event_ids_field`, optionally `label` (0 normal,
1 abnormal) and `session_id`. JSON is streamed with ijson; no file is read whole into memory.

This module knows nothing of training: it reads, validates, splits, windows, shuffles and pads.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ijson
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model import IGNORE_INDEX, special_tokens

JSON_SUFFIXES = (".json", ".jsonl")
MAX_EVENT_SETS = 10000  # beyond this many distinct sets of co-occurring event types, the record is dropped
TEXT_SUFFIXES = (".txt", ".log", "")
IJSON_BACKEND = ijson.backend  # "yajl2_c" when the C extension is available, else a slower pure-Python one


class DataError(Exception):
    """Bad input data. The message names the file and the record (or line)."""


@dataclass
class Record:
    file: str
    index: int  # 1-based record number in a .json array, line number in .jsonl and text files
    session_id: str
    event_ids: list[int]
    label: int


def list_data_files(path: str | os.PathLike) -> list[Path]:
    """The readable data files under `path` (a file or a directory), sorted. Raises DataError if none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _format_of(p))
    if not files:
        raise DataError(f"{path}: directory holds no readable data file "
                        f"(*.json, *.jsonl, DeepLog text *.txt/*.log/no suffix, or .gz of these)")
    return files


def _format_of(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix
    if suffix in JSON_SUFFIXES:
        return suffix[1:]
    return "text" if suffix in TEXT_SUFFIXES else None


def _open(path: Path, mode: str = "rb"):
    return gzip.open(path, mode) if path.name.endswith(".gz") else open(path, mode)


def iter_sessions(path, vocab_size: int | None = None, event_ids_field: str = "event_ids",
                  label_field: str = "label", session_id_field: str = "session_id",
                  json_array_key: str = "sessions", skip_bad_records: bool = False,
                  counters: dict | None = None) -> Iterator[Record]:
    """Stream validated sessions from every data file under `path`.

    A bad record raises DataError naming file and record; with skip_bad_records it is counted in
    counters["bad_records"] (and the first message kept in counters["first_bad_record"]) instead.
    """
    counters = counters if counters is not None else {}
    counters.setdefault("bad_records", 0)
    for file in list_data_files(path):
        fmt = _format_of(file) or "text"
        raw = {"json": _iter_json_array, "jsonl": _iter_jsonl, "text": _iter_text}[fmt]
        fields = (event_ids_field, label_field, session_id_field)
        try:
            for index, item in raw(file, json_array_key):
                try:
                    yield _validate(file, index, item, fields, vocab_size, fmt)
                except DataError as error:
                    if not skip_bad_records:
                        raise
                    counters["bad_records"] += 1
                    counters.setdefault("first_bad_record", str(error))
        except (OSError, EOFError, UnicodeDecodeError) as error:  # permissions, corrupt gzip, binary files
            raise DataError(f"{file}: unreadable: {error}") from None


def _iter_json_array(file: Path, array_key: str):
    with _open(file) as handle:
        head = handle.read(4096).lstrip()
    if not head:
        raise DataError(f"{file}: empty file")
    prefix = "item" if head[:1] == b"[" else f"{array_key}.item"
    count = 0
    with _open(file) as handle:
        try:
            for count, item in enumerate(ijson.items(handle, prefix, use_float=True), start=1):
                yield count, item
        except ijson.JSONError as error:
            raise DataError(f"{file}: malformed JSON after record {count} (at record {count + 1}): {error}") from None
    if count == 0 and prefix != "item":
        raise DataError(f"{file}: no session array found: expected a top-level array or an object "
                        f"with the array under '{array_key}' (data.json_array_key)")


def _iter_jsonl(file: Path, _array_key: str):
    with _open(file, "rt") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file}: line {line_no}: malformed JSON: {error}") from None


def _iter_text(file: Path, _array_key: str):
    with _open(file, "rt") as handle:
        for line_no, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                yield line_no, [int(token) for token in tokens]
            except ValueError:
                bad = next(t for t in tokens if not t.lstrip("-").isdigit())
                raise DataError(f"{file}: line {line_no}: '{bad}' is not an integer event ID "
                                f"(DeepLog text holds space-separated integers)") from None


def _validate(file: Path, index: int, item, fields, vocab_size: int | None, fmt: str) -> Record:
    event_ids_field, label_field, session_id_field = fields
    where = f"{file}: {'record' if fmt == 'json' else 'line'} {index}"
    label, session_id = 0, f"{file.name}:{index}"
    if fmt == "text":
        events = item
    else:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a session object, got {type(item).__name__}")
        if event_ids_field not in item:
            raise DataError(f"{where}: missing field '{event_ids_field}' (data.event_ids_field)")
        events = item[event_ids_field]
        if not isinstance(events, list):
            raise DataError(f"{where}: '{event_ids_field}' must be a list of integers, got {type(events).__name__}")
        label = item.get(label_field, 0)
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{where}: '{label_field}' must be 0 (normal) or 1 (abnormal), got {label!r}")
        session_id = str(item.get(session_id_field, session_id))
    if not events:
        raise DataError(f"{where}: empty session (no event IDs)")
    for event in events:
        if not isinstance(event, int) or isinstance(event, bool):
            raise DataError(f"{where}: event ID {event!r} is not an integer")
        if event < 0:
            raise DataError(f"{where}: event ID {event} is negative")
        if vocab_size is not None and event >= vocab_size:
            raise DataError(f"{where}: event ID {event} >= vocab_size {vocab_size} (raise model.vocab_size)")
    return Record(str(file), index, session_id, events, int(label))


def is_validation(file: str, index: int, seed: int, validation_split: float) -> bool:
    """Deterministic per-session split: a hash of (seed, file name, record index), never of the epoch."""
    if validation_split <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{os.path.basename(file)}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < validation_split


def make_windows(event_ids: list[int], vocab_size: int, max_seq_length: int, window_context: int):
    """Session -> training samples (inputs, targets), each at most max_seq_length positions.

    A session of n events has n + 1 predictions (inputs [start, e1..en], targets [e1..en, end]). When
    that exceeds max_seq_length, consecutive windows advance by max_seq_length - window_context: each
    later window re-reads the previous window_context positions as context, and their targets are
    masked, so every prediction is trained exactly once and nothing is dropped or truncated.
    """
    end_id, _, start_id, _ = special_tokens(vocab_size)
    inputs = [start_id] + event_ids
    targets = event_ids + [end_id]
    total = len(inputs)
    if total <= max_seq_length:
        return [(inputs, targets)]
    stride = max_seq_length - window_context
    windows, begin = [], 0
    while True:
        end = min(begin + max_seq_length, total)
        window_targets = targets[begin:end]
        if begin > 0:
            window_targets = [IGNORE_INDEX] * window_context + window_targets[window_context:]
        windows.append((inputs[begin:end], window_targets))
        if end == total:
            return windows
        begin += stride


def merge_counts(counts: list[dict], disjoint: bool) -> dict:
    """Combine the count() of every rank: summed over disjoint file shards, else all ranks saw the same
    data. `windows_per_rank` is what every rank can supply, the smallest shard or an equal share."""
    world_size = len(counts)
    if not disjoint:
        return {**counts[0], "windows_per_rank": counts[0]["windows"] // world_size}
    sets = [c["event_sets"] for c in counts]
    merged = {key: sum(c[key] for c in counts) for key in ("sessions", "abnormal_skipped", "bad_records",
                                                          "windows", "tokens")}
    merged["first_bad_record"] = next((c["first_bad_record"] for c in counts if "first_bad_record" in c), None)
    merged["seen_targets"] = sorted(set().union(*(c["seen_targets"] for c in counts)))
    union = None if None in sets else {tuple(s) for shard in sets for s in shard}
    merged["event_sets"] = None if union is None or len(union) > MAX_EVENT_SETS else sorted(list(s) for s in union)
    merged["windows_per_rank"] = min(c["windows"] for c in counts)
    return merged


def collate(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest member: inputs with pad_id, targets with IGNORE_INDEX (never in loss or metrics)."""
    longest = max(len(inputs) for inputs, _ in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, sample_targets) in enumerate(samples):
        input_ids[row, :len(inputs)] = torch.tensor(inputs)
        targets[row, :len(sample_targets)] = torch.tensor(sample_targets)
    lengths = torch.tensor([len(inputs) for inputs, _ in samples])
    return {"input_ids": input_ids, "targets": targets, "lengths": lengths}


class SessionDataset(IterableDataset):
    """Windows of normal sessions from one side of the split, streamed, shuffled through a bounded buffer.

    Memory holds at most `buffer_size` samples. Shuffling is seeded by (seed, epoch, rank), so an epoch
    replays identically, which is what makes mid-epoch resume exact: `batches(start_batch=N)` replays
    the epoch's sample order and skips the first N batches without touching the model.
    With `world_size > 1` each rank reads every world_size-th file when there are at least as many files
    as ranks (so each file is parsed by one rank only), else every rank parses everything and takes
    every world_size-th sample; either way it stops at `samples_per_rank`, so that all ranks run the
    same number of steps.
    With `num_workers > 0` and several files, that many reader processes parse, shuffle and pad the
    rank's files in parallel (worker w takes every num_workers-th file); their batches are merged
    round-robin, an order as deterministic as the files, so resume stays exact (for the same num_workers).
    """

    def __init__(self, path, vocab_size: int, split: str = "train", validation_split: float = 0.1,
                 seed: int = 42, max_seq_length: int = 256, window_context: int = 32,
                 shuffle: bool = True, buffer_size: int = 10000, rank: int = 0, world_size: int = 1,
                 samples_per_rank: int | None = None, num_workers: int = 0, **reader_options):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split}")
        if not 0 <= window_context < max_seq_length:
            raise ValueError("window_context must be in [0, max_seq_length)")
        self.path, self.vocab_size, self.split = path, vocab_size, split
        self.validation_split, self.seed = validation_split, seed
        self.max_seq_length, self.window_context = max_seq_length, window_context
        self.shuffle, self.buffer_size = shuffle, max(1, buffer_size)
        self.rank, self.world_size, self.samples_per_rank = rank, world_size, samples_per_rank
        self.reader_options = reader_options
        self.files = list_data_files(path)
        self.shard_by_file = world_size > 1 and len(self.files) >= world_size
        if self.shard_by_file:
            self.files = self.files[rank::world_size]
        self.num_workers = min(num_workers, len(self.files)) if len(self.files) > 1 else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _records(self, files: list[Path] | None = None, counters: dict | None = None) -> Iterator[Record]:
        """The normal sessions of this split, in file order; tallies into `counters` when given."""
        counters = counters if counters is not None else {}
        for key in ("sessions", "abnormal_skipped", "bad_records"):
            counters.setdefault(key, 0)
        records = (record for file in (self.files if files is None else files)
                   for record in iter_sessions(file, self.vocab_size, counters=counters, **self.reader_options))
        for record in records:
            if record.label != 0:  # DeepLog learns normal behaviour only
                counters["abnormal_skipped"] += 1
                continue
            if self.split != "all" and is_validation(record.file, record.index, self.seed,
                                                     self.validation_split) != (self.split == "val"):
                continue
            counters["sessions"] += 1
            yield record

    def _windows(self, files: list[Path] | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """All windows of this split, in file order, before sharding and shuffling."""
        for record in self._records(files):
            yield from make_windows(record.event_ids, self.vocab_size, self.max_seq_length, self.window_context)

    def _parallel(self, mode: str, batch_size: int = 0):
        """Items from `num_workers` reader processes, each over every num_workers-th file, merged round-robin.
        A dedicated generator keeps DataLoader from drawing on the global RNG (exact resume)."""
        loader = DataLoader(_FileShardReader(self, mode, batch_size), batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator(), prefetch_factor=4, worker_init_fn=_leave_signals_to_parent)
        for item in loader:
            if isinstance(item, _ReaderError):  # re-raised here as the one-line message it was
                raise DataError(item.message)
            yield item

    def __iter__(self):
        return self._samples(self._windows(), self.samples_per_rank, f"{self.seed}:{self.epoch}:{self.rank}",
                             self.buffer_size)

    def _samples(self, windows, limit: int | None, rng_key: str, buffer_size: int):
        """This rank's share of `windows` (unless files were already split by rank), at most `limit` of
        them, shuffled through a buffer of `buffer_size` by an RNG seeded with `rng_key`."""
        shard = windows if self.shard_by_file else \
            (s for i, s in enumerate(windows) if i % self.world_size == self.rank)
        if limit is not None:
            shard = itertools.islice(shard, limit)
        if not self.shuffle:
            yield from shard
            return
        rng = random.Random(rng_key)
        buffer = []
        for sample in shard:
            if len(buffer) < buffer_size:
                buffer.append(sample)
                continue
            slot = rng.randrange(buffer_size)
            yield buffer[slot]
            buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer

    def count(self) -> dict:
        """One pass without shuffling: sessions, windows (samples), predicted tokens, the target IDs
        (events and end-of-session) and the distinct sets of event types that occur together in a session
        (None when there are more than MAX_EVENT_SETS: too varied to be a useful rule)."""
        if self.num_workers:
            merged = merge_counts(list(self._parallel("count")), disjoint=True)
            merged.pop("windows_per_rank")
            return merged
        return self._count()

    def _count(self, files: list[Path] | None = None) -> dict:
        windows = tokens = 0
        seen_targets: set[int] = set()
        event_sets: set[frozenset] | None = set()
        counters: dict = {}
        for record in self._records(files, counters):
            if event_sets is not None:
                event_sets.add(frozenset(record.event_ids))
                if len(event_sets) > MAX_EVENT_SETS:
                    event_sets = None
            for _, targets in make_windows(record.event_ids, self.vocab_size, self.max_seq_length,
                                           self.window_context):
                windows += 1
                real = [t for t in targets if t != IGNORE_INDEX]
                tokens += len(real)
                seen_targets.update(real)
        return {**counters, "windows": windows, "tokens": tokens, "seen_targets": sorted(seen_targets),
                "event_sets": None if event_sets is None else sorted(sorted(s) for s in event_sets)}

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[tuple[dict, int]]:
        """Padded batches with their position: the number of batches of this epoch done after this one.
        With reader processes, each one shuffles (buffer_size / num_workers) and pads its own batches."""
        _, pad_id, _, _ = special_tokens(self.vocab_size)
        source = self._parallel("batches", batch_size) if self.num_workers else \
            collated(iter(self), batch_size, pad_id, skip=start_batch)
        for done, batch in enumerate(source, start=1):
            if done > start_batch:
                yield batch, done


def collated(samples, batch_size: int, pad_id: int, skip: int = 0) -> Iterator[dict | None]:
    """Batches of `batch_size` samples (the last may be smaller); the first `skip` are yielded as None,
    uncollated, since a resumed epoch only needs to count them."""
    chunk, done = [], 0
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            done += 1
            yield collate(chunk, pad_id) if done > skip else None
            chunk = []
    if chunk:
        yield collate(chunk, pad_id) if done + 1 > skip else None


class _ReaderError:
    """A DataError crossing the process boundary intact (DataLoader would wrap it in a traceback)."""

    def __init__(self, message: str):
        self.message = message


def _leave_signals_to_parent(_worker_id: int) -> None:
    """Ctrl-C and SIGTERM are the training process's to handle (it stops at a step boundary and then
    shuts the readers down); a reader dying of them first would turn a clean stop into a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _FileShardReader(IterableDataset):
    """Runs inside a DataLoader worker: over every num_workers-th file of the dataset's share, yields
    padded, shuffled batches ("batches") or one count ("count")."""

    def __init__(self, dataset: SessionDataset, mode: str, batch_size: int):
        self.dataset, self.mode, self.batch_size = dataset, mode, batch_size

    def __iter__(self):
        worker = get_worker_info()
        dataset, workers = self.dataset, worker.num_workers
        files = dataset.files[worker.id::workers]
        try:
            if self.mode == "count":
                yield dataset._count(files)
                return
            limit = dataset.samples_per_rank
            if limit is not None:  # this worker's part of the rank's share
                limit = limit // workers + (worker.id < limit % workers)
            samples = dataset._samples(dataset._windows(files), limit,
                                       f"{dataset.seed}:{dataset.epoch}:{dataset.rank}:{worker.id}",
                                       max(1, dataset.buffer_size // workers))
            yield from collated(samples, self.batch_size, special_tokens(dataset.vocab_size)[1])
        except DataError as error:
            yield _ReaderError(str(error))


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Validate data files and count their sessions.")
    parser.add_argument("path", help="a data file or a directory of them")
    parser.add_argument("--vocab-size", type=int, default=None, help="reject IDs >= this")
    parser.add_argument("--event-ids-field", default="event_ids", help="field holding the event IDs")
    cli = parser.parse_args()
    try:
        for data_file in list_data_files(cli.path):
            counts = {"normal": 0, "abnormal": 0}
            lengths, max_id = [], 0
            for rec in iter_sessions(data_file, cli.vocab_size, event_ids_field=cli.event_ids_field):
                counts["abnormal" if rec.label else "normal"] += 1
                lengths.append(len(rec.event_ids))
                max_id = max(max_id, max(rec.event_ids))
            print(f"{data_file}: {counts['normal']} normal, {counts['abnormal']} abnormal sessions, "
                  f"length {min(lengths, default=0)}..{max(lengths, default=0)}, max ID {max_id}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
