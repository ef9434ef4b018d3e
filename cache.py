"""The token cache: every data file is parsed and validated once, then memory-mapped by every epoch.

Examples:

    python cache.py data/sample/train --vocab-size 29               # build (or check) the caches, all cores
    python cache.py /data/sessions --vocab-size 10000 --cache-dir /fast/deeplog-cache --workers 16
    python cache.py /data/sessions --vocab-size 10000 --seed 42 --validation-split 0.1   # as train.py will

    from cache import build_caches, cache_settings
    from config import Config
    settings = cache_settings(Config(), 29)      # the data and split settings of a config
    entries = build_caches(["data/sample/train/part-003.txt"], settings, "/tmp/cache")   # batches.py reads

One cache entry per data file, in `cache_dir/<file name>-<hash>/`, keyed by the file (path, size, mtime)
and every setting that changes its content. A big JSONL or text file is parsed by several processes, one per
byte range ("part"); a .json array by one. Each part holds, as raw little-endian arrays:

    tokens   uint16 when every token fits, else int32 (int64 for evaluation data, whose IDs a model may
             not know, up to 2**63 - 1: scored as unknown): each session as [start, e1..en, end], back to
             back, then TAIL zeros (so that every window is one contiguous slice)
    offsets  int64, sessions + 1: where each session's start token is
    flags    uint8: 1 abnormal label, 2 validation split, 4 calibration half (of the validation split)
    indexes  int64: the record number (.json) or line number, as error messages and session IDs use

meta.json, written last, says what the arrays hold, with the size and CRC-32 of every file; an entry is
built in a temp folder, fsynced and renamed into place, so it is complete or absent. It is verified when a
process first opens it (fields, sizes, checksums, the arrays' invariants); a stale, partial or damaged entry
is rebuilt with one log line: the data file is the truth. Epochs read windows through memory maps, so the
process's own memory stays flat whatever the size. This module knows nothing of training.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import itertools
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

import utils
from config import Config
from dataset import (
    APART,
    CALIBRATION,
    EVALUATION,
    DataError,
    SessionArrays,
    _format_of,
    iter_session_arrays,
    list_data_files,
    split_classes,
)
from rules import CoOccurrenceRecorder, merge_co_occurrence
from tokens import lay_out, special_tokens
from utils import excerpt, one_line

CACHE_FORMAT = 4            # 2: event_pairs.npy (the pairs of event types of training sessions);
                            # 3: meta.json's "files", the size and CRC-32 of every file of the entry;
                            # 4: data.overlap in the key, FLAG_APART
TAIL = 1024                  # zero tokens after each part: windows up to TAIL - 1 positions are one slice
PART_BYTES = 64 * 2 ** 20    # a JSONL or text file bigger than this is parsed by several processes
MIN_PART_BYTES = 2 ** 16     # ... and never in pieces smaller than this
FLAG_ABNORMAL, FLAG_VALIDATION, FLAG_CALIBRATION, FLAG_APART = 1, 2, 4, 8   # APART: see split_classes
KNOWN_FLAGS = FLAG_ABNORMAL | FLAG_VALIDATION | FLAG_CALIBRATION | FLAG_APART
CHECK_BYTES = 2 ** 24        # read at a time when a checksum is verified
PASS_SESSIONS = 2 ** 18      # sessions per step of a pass over the per-session arrays: small temporaries
ARRAYS = {"offsets": np.int64, "flags": np.uint8, "indexes": np.int64}  # besides tokens

log = logging.getLogger("deeplog")


@dataclass(frozen=True)
class CacheSettings:
    """Every setting that changes what a cache holds (with the file's path, size and mtime)."""
    vocab_size: int | None          # None: IDs are not checked (evaluation data may hold unknown IDs)
    event_ids_field: str
    label_field: str
    json_array_key: str
    skip_bad_records: bool
    validation_split: float
    seed: int
    overlap: int

    @classmethod
    def of_key(cls, key: dict) -> CacheSettings:
        """The settings an entry's key (meta.json's "key") was built with."""
        return cls(**{f.name: key[f.name] for f in fields(cls)})

    def reader_options(self) -> dict:
        return dict(event_ids_field=self.event_ids_field, label_field=self.label_field,
                    json_array_key=self.json_array_key, skip_bad_records=self.skip_bad_records)

    def token_dtype(self) -> np.dtype:
        # special tokens go up to vocab_size + 3
        small = self.vocab_size is not None and self.vocab_size + 4 <= 2 ** 16
        if self.vocab_size is None:   # evaluation data: any ID, the unknown ones scored as unknown
            return np.dtype(np.int64)
        return np.dtype(np.uint16 if small else np.int32)


def cache_settings(config: Config, vocab_size: int | None) -> CacheSettings:
    """The cache settings of a resolved config (Config); vocab_size None for evaluation data."""
    data = config.data
    return CacheSettings(vocab_size, data.event_ids_field, data.label_field, data.json_array_key,
                         data.skip_bad_records, data.validation_split, config.training.seed, data.overlap)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deeplog"


# ----------------------------------------------------------------------------- building
@dataclass
class _Task:
    file: str
    part_dir: str             # temp folder of the entry being built
    part: int
    settings: CacheSettings
    byte_range: tuple[int, int] | None = None
    newlines_before: int = 0  # in the file, before byte_range[0]


def _entry_key(file: Path, settings: CacheSettings) -> dict:
    stat = file.stat()
    return {"format": CACHE_FORMAT, "path": str(file.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, **asdict(settings)}


def entry_dir(file: Path, settings: CacheSettings, cache_dir: Path) -> Path:
    """Path and settings name the entry; size and mtime are checked inside (a changed file replaces it)."""
    name = json.dumps([str(file.resolve()), asdict(settings), CACHE_FORMAT])
    return Path(cache_dir) / f"{file.name}-{hashlib.blake2b(name.encode(), digest_size=8).hexdigest()}"


def entries_text(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def build_caches(paths, settings: CacheSettings, cache_dir, workers: int | None = None,
                 logger: logging.Logger = log) -> list[Path]:
    """The verified cache entry of every data file under `paths` (a file, a directory, or a list of them),
    building the missing, stale or damaged ones with `workers` processes (None: all cores)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    named = [f for p in paths for f in list_data_files(p)]
    files = list({f.resolve(): f for f in named}.values())  # a file named twice is read once
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not writable(cache_dir):   # used as it is when complete; nothing to build, so no lock
            return _build_under_lock(files, settings, cache_dir, workers, logger, read_only=True)
        # One builder at a time per cache folder (two runs, a sweep, cache.py beside train.py): the second
        # waits, then finds the entries built.
        with open(cache_dir / ".build.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info(f"Token cache: another process is building in {cache_dir}; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            return _build_under_lock(files, settings, cache_dir, workers, logger)
    except OSError as error:  # a full disk, no permission: one line naming the place
        raise DataError(f"token cache {cache_dir} (lazy_loading.cache_dir): {error.strerror or error}"
                        f"{f': {error.filename}' if error.filename else ''}") from None


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK) and not os.statvfs(folder).f_flag & os.ST_RDONLY


def _build_under_lock(files: list[Path], settings: CacheSettings, cache_dir: Path, workers: int | None,
                      logger: logging.Logger, read_only: bool = False) -> list[Path]:
    entries = [entry_dir(f, settings, cache_dir) for f in files]
    todo = []
    for file, entry in zip(files, entries):
        key = _entry_key(file, settings)  # taken before reading: a file that grows meanwhile is caught below
        problem = check_entry(entry, key)
        if problem is None:
            continue
        if read_only:
            raise DataError(f"token cache {cache_dir} (lazy_loading.cache_dir) is read-only and the entry of "
                            f"{file} is {problem}: point lazy_loading.cache_dir at a folder this user can "
                            f"write, or build the cache there first (python cache.py)")
        if problem != "absent":
            logger.info(f"Token cache of {file}: {problem}; rebuilding {entry}")
        todo.append((file, entry, key))
    if not todo:
        logger.info(f"Token cache: reusing {entries_text(len(entries))} in {cache_dir}"
                    f"{' (read-only)' if read_only else ''}")
        return entries
    workers = max(1, workers or os.cpu_count() or 1)
    for file, _, _ in todo:
        if _format_of(file) == "json" and file.stat().st_size > 4 * PART_BYTES:
            logger.info(f"{file}: one .json array is parsed by one process; split such data into several "
                        f"files (or JSONL) to use all cores")
    _remove_stale_temp(cache_dir)
    temp_dirs: dict[Path, Path] = {}
    try:
        for _, entry, _ in todo:
            temp_dirs[entry] = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{entry.name}.", suffix=".tmp"))
        tasks = _plan([(file, entry) for file, entry, _ in todo], temp_dirs, settings, workers, len(files))
        parts: dict[Path, list] = {entry: [] for _, entry, _ in todo}
        for entry, part in _run(tasks, workers, temp_dirs):
            parts[entry].append(part)
        for file, entry, key in todo:
            if _entry_key(file, settings) != key:
                raise DataError(f"{file}: changed while it was being read (still being written or copied?); "
                                f"run again once it is complete")
            _finish_entry(entry, temp_dirs[entry], key, parts[entry])
    except BaseException:
        # a stop (or an error) ends the build: its temp folders go whole, a second Ctrl-C meanwhile adds
        # nothing (the first already stops the run)
        with utils.signals_held(drop=True):
            _remove_temp(temp_dirs)
        raise
    _remove_temp(temp_dirs)
    logger.info(f"Token cache: built {len(todo)} of {entries_text(len(files))} in {cache_dir} "
                f"({sum(entry_size(e) for _, e, _ in todo) / 2 ** 20:.1f} MB)")
    return entries


def _remove_temp(temp_dirs: dict) -> None:
    for temp in temp_dirs.values():
        shutil.rmtree(temp, ignore_errors=True)


def entry_size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.iterdir()) if entry.is_dir() else 0


def _remove_stale_temp(cache_dir: Path) -> None:
    """Temp folders of builds that were killed (a live build's folder is younger than a day)."""
    for temp in cache_dir.glob(".*.tmp"):
        if time.time() - temp.stat().st_mtime > 86400:
            shutil.rmtree(temp, ignore_errors=True)


def _plan(todo, temp_dirs, settings: CacheSettings, workers: int, files: int) -> list[_Task]:
    """One task per file, or one per byte range of a big plain JSONL/text file (a parallel count of the
    newlines before each range keeps line numbers exact); cut finer than PART_BYTES only when there are
    fewer files than workers (each part is a few open maps at training time)."""
    tasks, ranged = [], []
    for file, entry in todo:
        size = file.stat().st_size
        splittable = _format_of(file) in ("jsonl", "text") and not file.name.endswith(".gz")
        wanted = max(workers if files < workers else 1, -(-size // PART_BYTES))
        pieces = min(wanted, max(1, size // MIN_PART_BYTES)) if splittable else 1
        if pieces == 1:
            tasks.append(_Task(str(file), str(temp_dirs[entry]), 0, settings))
            continue
        bounds = [size * k // pieces for k in range(pieces + 1)]
        ranged += [_Task(str(file), str(temp_dirs[entry]), k, settings, (bounds[k], bounds[k + 1]))
                   for k in range(pieces)]
    if ranged:
        with _pool(workers) as pool:
            counts = pool.map(_count_newlines, [(t.file, t.byte_range) for t in ranged])
        before = 0
        for task, count in zip(ranged, counts):
            before = 0 if task.part == 0 else before
            task.newlines_before = before
            before += count
    return tasks + ranged


def _pool(workers: int):
    # fork: workers start in milliseconds and only parse (no torch, no threads in them).
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return context.Pool(workers, initializer=worker_start, initargs=(os.getpid(),))


PR_SET_PDEATHSIG = 1   # linux/prctl.h


def worker_start(parent: int) -> None:
    """Signals are the parent's to handle (no traceback from every worker); on Linux a worker dies with its
    parent, even a SIGKILLed one, so none goes on parsing (holding the cache lock) for a dead build."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)


def _count_newlines(job) -> int:
    file, (begin, end) = job
    count = 0
    try:
        with open(file, "rb") as handle:
            handle.seek(begin)
            remaining = end - begin
            while remaining > 0 and (block := handle.read(min(remaining, 2 ** 24))):
                count += block.count(b"\n")
                remaining -= len(block)
    except OSError as error:
        raise DataError(f"{file}: unreadable: {one_line(error)}") from None
    return count


def _run(tasks: list[_Task], workers: int, temp_dirs) -> Iterator[tuple[Path, dict]]:
    """(entry, part summary) of every task, in parallel when there is more than one."""
    by_temp = {str(temp): entry for entry, temp in temp_dirs.items()}
    if len(tasks) == 1 or workers == 1:
        for task in tasks:
            yield by_temp[task.part_dir], _build_part(task)
        return
    with _pool(min(workers, len(tasks))) as pool:
        # biggest first, so that one big file does not start last
        order = sorted(tasks, key=lambda t: -(t.byte_range[1] - t.byte_range[0] if t.byte_range
                                              else os.path.getsize(t.file)))
        for task, summary in zip(order, pool.imap(_build_part, order)):
            yield by_temp[task.part_dir], summary


def _build_part(task: _Task) -> dict:
    """Parse, validate and write one part; returns its summary for meta.json. Runs in a worker."""
    settings, file = task.settings, Path(task.file)
    dtype = settings.token_dtype()
    vocab = settings.vocab_size
    counters: dict = {}
    sessions = tokens_written = 0
    seen = np.zeros(vocab + 1 if vocab is not None else 0, dtype=np.int64)
    co_occurrence = CoOccurrenceRecorder(vocab) if vocab is not None else None
    prefix = Path(task.part_dir) / f"part-{task.part}"
    handles = {name: Writer(Path(f"{prefix}.{name}")) for name in ("tokens", *ARRAYS)}
    # The cyclic garbage collector would rescan the parsed records many times over; parsing makes no cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        handles["offsets"].write(np.zeros(1, np.int64))
        # without a vocabulary (evaluation data) any 64-bit ID is taken: one a model never had is unknown
        limit = vocab
        chunks = iter_session_arrays(file, limit, counters=counters, byte_range=task.byte_range,
                                     first_line=task.newlines_before + 1, chunk_records=1024,
                                     **settings.reader_options())
        for arrays in _grouped(chunks, 2 ** 16):
            n = len(arrays.lengths)
            laid_out, local_starts = lay_out(arrays.tokens, arrays.lengths, vocab or 0, dtype)
            sizes = arrays.lengths + 2
            sides = split_classes(task.file, arrays.indexes, settings.seed, settings.validation_split,
                                  settings.overlap)
            # with no split, the halves of every session (evaluation then scores the training data)
            halves = sides if settings.validation_split else \
                split_classes(task.file, arrays.indexes, settings.seed, 1.0, settings.overlap)
            held_out = (sides == CALIBRATION) | (sides == EVALUATION)
            flags = (arrays.labels | np.where(held_out, FLAG_VALIDATION, 0)
                     | np.where(halves == CALIBRATION, FLAG_CALIBRATION, 0)
                     | np.where(sides == APART, FLAG_APART, 0))
            if vocab is not None:
                trained = (flags & (FLAG_ABNORMAL | FLAG_VALIDATION | FLAG_APART)) == 0
                seen += _seen_targets(arrays, trained, vocab)
                co_occurrence.add(arrays.tokens, arrays.lengths, trained)
            handles["tokens"].write(laid_out)
            handles["offsets"].write((tokens_written + local_starts + sizes).astype(np.int64))
            handles["flags"].write(flags.astype(np.uint8))
            handles["indexes"].write(arrays.indexes.astype(np.int64))
            sessions += n
            tokens_written += len(laid_out)
        handles["tokens"].write(np.zeros(TAIL, dtype=dtype))
    finally:
        if gc_was_enabled:
            gc.enable()
        for handle in handles.values():
            handle.close()
    return {"part": task.part, "sessions": sessions, "tokens": tokens_written, "dtype": dtype.name,
            "bad_records": counters.get("bad_records", 0),
            "first_bad_record": counters.get("first_bad_record"),
            "seen_targets": np.flatnonzero(seen).tolist() if vocab is not None else None,
            "files": {f"part-{task.part}.{name}": handle.record() for name, handle in handles.items()},
            **(co_occurrence.summary() if co_occurrence else {"event_sets": None, "event_pairs": None})}


class Writer:
    """An array file being written, its size and CRC-32 taken on the way (the bytes are never read back)."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.size = self.crc32 = 0

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.handle.write(array)
        self.crc32 = zlib.crc32(array, self.crc32)
        self.size += array.nbytes

    def close(self) -> None:
        self.handle.close()

    def record(self) -> dict:
        return {"size": self.size, "crc32": self.crc32}


def file_record(path: Path) -> dict:
    """meta.json's record of a file: its size and CRC-32, read in CHECK_BYTES blocks."""
    crc32, size, buffer = 0, 0, bytearray(CHECK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            crc32 = zlib.crc32(view[:count], crc32)
            size += count
    return {"size": size, "crc32": crc32}


def _grouped(chunks, sessions: int) -> Iterator[SessionArrays]:
    """Parsed chunks joined into groups of at least `sessions` (the last may be smaller): parsing likes
    small chunks (they stay in the CPU cache), the vectorised steps after it like big ones."""
    group: list = []
    for arrays in chunks:
        group.append(arrays)
        if sum(len(a.lengths) for a in group) >= sessions:
            yield _joined(group)
            group = []
    if group and sum(len(a.lengths) for a in group):
        yield _joined(group)


def _joined(group: list) -> SessionArrays:
    return SessionArrays(*(np.concatenate([getattr(a, name) for a in group])
                           for name in ("tokens", "lengths", "labels", "indexes")))


def _seen_targets(arrays, trained: np.ndarray, vocab: int) -> np.ndarray:
    """How often each target (events and end-of-session) occurs in the training sessions of a chunk:
    all events minus those of the held-out sessions (fewer), which is cheaper than selecting the rest."""
    counts = np.bincount(arrays.tokens, minlength=vocab + 1).astype(np.int64)
    held_out = ~trained
    if held_out.any():
        counts -= np.bincount(arrays.tokens[np.repeat(held_out, arrays.lengths)], minlength=vocab + 1)
    counts[vocab] += int(trained.sum())  # the end of each training session is a target too
    return counts


def _finish_entry(entry: Path, temp: Path, key: dict, parts: list[dict]) -> None:
    parts = sorted(parts, key=lambda p: p["part"])
    files = {name: record for part in parts for name, record in part.pop("files").items()}
    co_occurrence = merge_co_occurrence([{name: p.pop(name) for name in ("event_sets", "event_pairs")}
                                         for p in parts])
    pairs = co_occurrence["event_pairs"]
    if pairs is not None:
        np.save(temp / "event_pairs.npy", pairs)
        files["event_pairs.npy"] = file_record(temp / "event_pairs.npy")
    meta = {"key": key, "parts": parts, "event_sets": co_occurrence["event_sets"],
            "event_pairs": None if pairs is None else len(pairs),  # how many pairs event_pairs.npy holds
            "files": files}
    for name in files:  # durable before it becomes visible
        with open(temp / name, "rb") as handle:
            os.fsync(handle.fileno())
    utils.atomic_write(temp / "meta.json", lambda handle: handle.write(json.dumps(meta).encode()))
    utils.fsync_directory(temp)
    with utils.signals_held():   # the old entry out and the new one in, never a moved-aside copy left
        if entry.exists():
            old = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.old.", suffix=".tmp"))
            entry.rename(old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        temp.rename(entry)
    utils.fsync_directory(entry.parent)
    # verified: its checksums were taken as it was written
    VERIFIED[_entry_id(entry)] = files_signature(_entry_files(entry, meta))


# ----------------------------------------------------------------------------- verifying
VERIFIED: dict[str, tuple] = {}  # entry or window index -> (inode, size, mtime) of its files when verified


def check_entry(entry: Path, key: dict | None) -> str | None:
    """None when the entry is complete, intact and matches `key` (None: any key), else why not: "absent",
    "stale (...)", "incomplete (...)" or "damaged (...)". Verified in full once per process, and again only
    when one of its files changes."""
    return _open_entry(Path(entry), key)[0]


def open_entries(entries, logger: logging.Logger = log) -> list[dict]:
    """The verified meta.json of each entry; a damaged or stale one is rebuilt from the data file and
    settings its meta.json names (DataError where that is unreadable)."""
    metas = []
    for entry in map(Path, entries):
        problem, meta = _open_entry(entry, None)
        if problem is not None:
            key = meta.get("key") if isinstance(meta, dict) else None
            if _key_problem(key) is not None:
                raise DataError(f"token cache {entry}: {problem}; build it again from its data file "
                                f"(python cache.py, or train.py/evaluate.py do it)")
            rebuilt = build_caches(key["path"], CacheSettings.of_key(key), entry.parent, logger=logger)
            if rebuilt != [entry]:  # an entry of an older format, or a renamed folder
                raise DataError(f"token cache {entry}: {problem}; its data file is now cached in "
                                f"{rebuilt[0]}")
            problem, meta = _open_entry(entry, None)
            if problem is not None:
                raise DataError(f"token cache {entry}: {problem} after it was rebuilt")
        metas.append(meta)
    return metas


def _entry_id(entry: Path) -> str:
    return os.path.abspath(entry)


def _open_entry(entry: Path, key: dict | None) -> tuple[str | None, dict | None]:
    """(None, meta) for a usable entry, else (why not, its meta.json as read, or None)."""
    meta_path = entry / "meta.json"
    if not meta_path.exists():
        return ("absent" if not entry.exists() else "incomplete (no meta.json)"), None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError too
        return f"damaged (meta.json unreadable: {one_line(error)})", None
    problem = _meta_problem(meta)
    if problem is not None:
        return f"damaged ({problem})", meta
    if key is not None and meta["key"] != key:
        changed = sorted(k for k in {**key, **meta["key"]} if meta["key"].get(k) != key.get(k))
        return f"stale ({', '.join(changed)} changed)", meta
    try:
        signature = files_signature(_entry_files(entry, meta))
        problem = _size_problem(entry, meta)
        if problem is None and VERIFIED.get(_entry_id(entry)) != signature:
            problem = _arrays_problem(entry, meta) or _checksum_problem(entry, meta) or \
                _pairs_problem(entry, meta)
    except FileNotFoundError as error:
        problem = f"{Path(error.filename).name} is missing" if error.filename else one_line(error)
    except (OSError, ValueError, IndexError) as error:
        problem = f"{type(error).__name__}: {one_line(error)}"
    if problem is not None:
        VERIFIED.pop(_entry_id(entry), None)
        return f"damaged ({problem})", meta
    VERIFIED[_entry_id(entry)] = signature
    return None, meta


def files_signature(paths) -> tuple:
    """What changes when any of these files is replaced or written to: its inode, size and mtime."""
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, paths))


def _entry_files(entry: Path, meta: dict) -> list[Path]:
    return [entry / name for name in ("meta.json", *meta["files"])]


def _typed(value, *kinds) -> bool:
    """isinstance for JSON values: a bool is no integer, an integer is a number, None stands for null."""
    return any(value is None if kind is None else isinstance(value, (int, float) if kind is float else kind)
               and (kind is bool or not isinstance(value, bool)) for kind in kinds)


_KEY_TYPES = {"format": (int,), "path": (str,), "size": (int,), "mtime_ns": (int,), "vocab_size": (int, None),
              "event_ids_field": (str,), "label_field": (str,), "json_array_key": (str,),
              "skip_bad_records": (bool,), "validation_split": (float,), "seed": (int,), "overlap": (int,)}
_PART_TYPES = {"part": (int,), "sessions": (int,), "tokens": (int,), "dtype": (str,), "bad_records": (int,),
               "first_bad_record": (str, None), "seen_targets": (list, None)}


def fields_problem(value, types: dict, what: str) -> str | None:
    """Whether `value` is an object with exactly these fields, each of its types."""
    if not isinstance(value, dict):
        return f"{what} is {_json_kind(type(value))}, not an object"
    missing, extra = sorted(set(types) - set(value)), sorted(set(value) - set(types))
    if missing or extra:
        return f"{what} {'lacks ' + ', '.join(missing) if missing else 'has unknown ' + ', '.join(extra)}"
    wrong = [name for name, kinds in types.items() if not _typed(value[name], *kinds)]
    if not wrong:
        return None
    expected = " or ".join(_json_kind(kind) for kind in types[wrong[0]])
    return f"{what}: {wrong[0]} is {_json_kind(type(value[wrong[0]]))}, not {expected}"


def _json_kind(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
             dict: "an object", None: "null", type(None): "null"}
    return names.get(kind, kind.__name__)


def _key_problem(key) -> str | None:
    problem = fields_problem(key, _KEY_TYPES, "meta.json's key")
    if problem is None and key["vocab_size"] is not None and key["vocab_size"] < 1:
        problem = f"meta.json's key: vocab_size {key['vocab_size']}"
    return problem


def _meta_problem(meta) -> str | None:
    """What is wrong with the fields and types of a parsed meta.json, or None."""
    types = {"key": (dict,), "parts": (list,), "event_sets": (list, None), "event_pairs": (int, None),
             "files": (dict,)}
    problem = fields_problem(meta, types, "meta.json") or _key_problem(meta["key"])
    if problem is not None:
        return problem
    vocab, parts = meta["key"]["vocab_size"], meta["parts"]
    sets, pairs = meta["event_sets"], meta["event_pairs"]
    if not parts:
        return "meta.json lists no parts"
    for number, part in enumerate(parts):
        what = f"meta.json's parts[{number}]"
        problem = fields_problem(part, _PART_TYPES, what)
        if problem is not None:
            return problem
        if part["part"] != number or min(part["sessions"], part["tokens"], part["bad_records"]) < 0:
            return f"{what}: part, sessions, tokens or bad_records out of range"
        if part["dtype"] != CacheSettings.of_key(meta["key"]).token_dtype().name:
            return f"{what}: dtype {excerpt(part['dtype'])} is not the token type of vocab_size {vocab}"
        seen = part["seen_targets"]
        if (seen is None) != (vocab is None) or not _are_ids(seen or [], vocab):
            return f"{what}: seen_targets are not IDs up to vocab_size {vocab}"
    if vocab is None and (sets is not None or pairs is not None):
        return "meta.json: event_sets or event_pairs without a vocab_size"
    if sets is not None and (set(map(type, sets)) - {list} or
                             not _are_ids(list(itertools.chain.from_iterable(sets)), vocab - 1)):
        return "meta.json: event_sets are not lists of event IDs"
    if pairs is not None and pairs < 0:
        return f"meta.json: event_pairs {pairs}"
    expected = {f"part-{p['part']}.{name}" for p in parts for name in ("tokens", *ARRAYS)}
    expected |= {"event_pairs.npy"} if pairs is not None else set()
    if set(meta["files"]) != expected:
        return f"meta.json's files are {excerpt(sorted(meta['files']))}, not {excerpt(sorted(expected))}"
    for name, record in meta["files"].items():
        problem = fields_problem(record, {"size": (int,), "crc32": (int,)}, f"meta.json's files[{name}]")
        if problem is not None:
            return problem
    return None


def _are_ids(values: list, largest: int) -> bool:
    """Whether a JSON list holds only integers in [0, largest] (at C speed: meta.json may list 10^5)."""
    return not values or set(map(type, values)) == {int} and min(values) >= 0 and max(values) <= largest


def _size_problem(entry: Path, meta: dict) -> str | None:
    """Every file as big as meta.json records and as its part's summary implies."""
    for part in meta["parts"]:
        itemsize = np.dtype(part["dtype"]).itemsize
        expected = {"tokens": (part["tokens"] + TAIL) * itemsize, "offsets": (part["sessions"] + 1) * 8,
                    "flags": part["sessions"], "indexes": part["sessions"] * 8}
        for name, size in expected.items():
            recorded = meta["files"][f"part-{part['part']}.{name}"]["size"]
            if recorded != size:
                return f"meta.json records {recorded} bytes for part-{part['part']}.{name}, not the {size} " \
                       f"its part's summary implies"
    for name, record in meta["files"].items():
        actual = os.path.getsize(entry / name)
        if actual != record["size"]:
            return f"{name} has {actual} bytes, expected {record['size']}"
    return None


def _arrays_problem(entry: Path, meta: dict) -> str | None:
    """The invariants of every part's arrays, over memory maps, PASS_SESSIONS sessions at a time."""
    for summary in meta["parts"]:
        part = Part(entry / f"part-{summary['part']}", summary, "")
        try:
            problem = _part_problem(part, summary, meta["key"]["vocab_size"])
        finally:
            part.release()
        if problem is not None:
            return problem
    return None


def _pairs_problem(entry: Path, meta: dict) -> str | None:
    if meta["event_pairs"] is None:
        return None
    pairs, vocab = event_pairs_of(entry), meta["key"]["vocab_size"]
    if pairs.dtype != np.int64 or pairs.shape != (meta["event_pairs"],) or (np.diff(pairs) <= 0).any() or \
            (len(pairs) and (pairs[0] < 0 or pairs[-1] >= vocab * vocab)):
        return "event_pairs.npy does not hold the sorted distinct pair codes meta.json counts"
    return None


def _part_problem(part: Part, summary: dict, vocab: int | None) -> str | None:
    """The invariants of one part's arrays (the module docstring's layout)."""
    name, sessions, total = f"part-{summary['part']}", summary["sessions"], summary["tokens"]
    offsets, tokens, indexes = part["offsets"], part.tokens.array, part["indexes"]
    if offsets[0] != 0 or offsets[sessions] != total:
        return f"{name}.offsets run from {offsets[0]} to {offsets[sessions]}, not from 0 to {total}"
    if tokens[total:].any():
        return f"{name}.tokens: the {TAIL} zeros after the last session are not zeros"
    end_id, _, start_id, _ = special_tokens(vocab or 0)
    for begin in range(0, sessions, PASS_SESSIONS):
        end = min(begin + PASS_SESSIONS, sessions)
        bounds = np.array(offsets[begin:end + 1])
        sizes = np.diff(bounds)
        for bad, what in ((bounds > total, "point past the last token"), (sizes < 0, "decrease"),
                          (sizes < 2, "leave fewer than 2 tokens (start and end)")):
            if bad.any():
                return f"{name}.offsets {what} at session {begin + int(np.argmax(bad))}"
        if vocab is not None and ((tokens[bounds[:-1]] != start_id).any() or
                                  (tokens[bounds[1:] - 1] != end_id).any()):
            return f"{name}.tokens: sessions {begin}..{end - 1} are not all framed by start and end tokens"
        if (part["flags"][begin:end] & ~np.uint8(KNOWN_FLAGS)).any():
            return f"{name}.flags: bits besides {KNOWN_FLAGS} set in sessions {begin}..{end - 1}"
        numbers = indexes[max(begin - 1, 0):end]
        if (np.diff(numbers) <= 0).any() or (begin == 0 and numbers[0] < 1):
            return f"{name}.indexes: record numbers not increasing from 1 in sessions {begin}..{end - 1}"
    return None


def _checksum_problem(entry: Path, meta: dict) -> str | None:
    """Every file's CRC-32 against meta.json's (files read in parallel: zlib and reads release the GIL)."""
    names = list(meta["files"])
    with ThreadPoolExecutor(min(len(names), os.cpu_count() or 1, 8)) as pool:
        records = list(pool.map(lambda name: file_record(entry / name), names))
    for name, record in zip(names, records):
        if record["crc32"] != meta["files"][name]["crc32"]:
            return f"{name} fails its checksum (CRC-32 {record['crc32']:08x}, recorded " \
                   f"{meta['files'][name]['crc32']:08x})"
    return None


def event_pairs_of(entry: Path) -> np.ndarray:
    """The sorted pair codes of an entry's training sessions (where meta.json's event_pairs is a count)."""
    return np.load(entry / "event_pairs.npy", allow_pickle=False)


# ----------------------------------------------------------------------------- reading
class Mapped:
    """One array file, memory-mapped or, with lazy=False, read whole into the process's memory."""

    def __init__(self, path: Path, dtype, lazy: bool = True):
        self.map = None
        if not lazy:
            self.array = np.fromfile(path, dtype=dtype)
        else:
            with open(path, "rb") as handle:
                size = os.path.getsize(path)
                # copy-on-write: writable for torch.from_numpy, never written, so the pages stay shared
                self.map = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) if size else None
            self.array = np.frombuffer(self.map, dtype=dtype) if self.map else np.zeros(0, dtype=dtype)
        self.tensor = torch.from_numpy(self.array)

    def release(self) -> None:
        """Unmap the pages read so far (they stay in the page cache), after a sequential pass."""
        if self.map is not None:
            self.map.madvise(mmap.MADV_DONTNEED)


class Part:
    def __init__(self, prefix: Path, summary: dict, file: str, vocab_size: int | None = None,
                 lazy: bool = True):
        self.file, self.sessions = file, summary["sessions"]
        self.prefix = prefix
        self.tokens = Mapped(Path(f"{prefix}.tokens"), np.dtype(summary["dtype"]), lazy)
        self.arrays: dict[str, Mapped] = {}  # offsets, flags, indexes: mapped while a pass reads them
        # what batches are cut from: int16 holds every token of a small vocabulary (torch's uint16 kernels
        # are slow), else int32; IDs of the shared tokens are the same either way
        small = self.tokens.tensor.dtype == torch.uint16 and vocab_size is not None and \
            vocab_size + 4 <= 2 ** 15
        self.rows = self.tokens.tensor.view(torch.int16) if small else self.tokens.tensor

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = Mapped(Path(f"{self.prefix}.{name}"), ARRAYS[name])
        return self.arrays[name].array

    def release(self) -> None:
        """After a sequential pass: unmap the pages read, close the per-session arrays' maps (descriptors)."""
        self.tokens.release()
        for mapped in self.arrays.values():
            mapped.release()
        self.arrays.clear()


def main(argv=None) -> int:
    defaults = Config()
    data = defaults.data
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="+", help="data files or directories")
    parser.add_argument("--vocab-size", type=int, help="reject IDs >= this (model.vocab_size); omit for "
                        "evaluation data, whose unknown IDs are scored as misses")
    parser.add_argument("--cache-dir", default=defaults.lazy_loading.cache_dir or str(default_cache_dir()),
                        help="where caches go (lazy_loading.cache_dir; default: %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.lazy_loading.cache_workers,
                        help="parsing processes (lazy_loading.cache_workers; default: all cores)")
    parser.add_argument("--seed", type=int, default=defaults.training.seed,
                        help="the split's seed (training.seed; default: %(default)s)")
    parser.add_argument("--validation-split", type=float, default=data.validation_split,
                        help="data.validation_split (default: %(default)s)")
    parser.add_argument("--event-ids-field", default=data.event_ids_field, help="data.event_ids_field")
    parser.add_argument("--label-field", default=data.label_field, help="data.label_field")
    parser.add_argument("--json-array-key", default=data.json_array_key, help="data.json_array_key")
    parser.add_argument("--skip-bad-records", action="store_true", default=data.skip_bad_records,
                        help="data.skip_bad_records")
    parser.add_argument("--overlap", type=int, default=data.overlap, help="data.overlap (default: "
                        "%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s",
                        stream=sys.stderr)
    settings = CacheSettings(args.vocab_size, args.event_ids_field, args.label_field, args.json_array_key,
                             args.skip_bad_records, args.validation_split, args.seed, args.overlap)

    def build() -> int:
        entries = build_caches(args.path, settings, args.cache_dir, args.workers)
        for entry, meta in zip(entries, open_entries(entries)):
            sessions = sum(p["sessions"] for p in meta["parts"])
            print(f"{meta['key']['path']}: {sessions} sessions in {len(meta['parts'])} part(s) -> {entry} "
                  f"({entry_size(entry) / 2 ** 20:.1f} MB)")
        return 0
    return utils.exit_on_user_error(build)


if __name__ == "__main__":
    sys.exit(main())
