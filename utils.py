"""Plumbing every script shares, torch-free: the user-error root and the one exit path of every CLI, files
a user names, atomic writes, the output lock and run record, stop signals, logging, early stopping and the
learning-rate schedule.

Examples:

    import utils
    utils.save_json("out/result.json", {"ok": True})      # atomic: a crash never leaves half a file
    print(utils.format_duration(9000))                     # 2h 30m
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import reprlib
import signal
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path


class UserError(Exception):
    """Something the user gave is wrong (a file, a flag, a setting): exit_on_user_error makes it one line."""


class ConfigError(UserError):
    """A bad config file, key or value; the message names it."""


def file_kind(path) -> str:
    """What `path` is, in words ("a FIFO (named pipe)", "a directory", ...), following symlinks."""
    return _kind_of(os.stat(path).st_mode)


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "no regular file"


def open_regular(path):
    """A file a user names, opened for reading in binary; OSError where it is no regular file (reading a FIFO
    or a device could wait forever or never end). Opened without blocking: a FIFO with no writer too."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_kind_of(mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 6
_SHORT.maxlevel = 3
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxdict, _EXCERPT.maxstring, _EXCERPT.maxlong = 2, 6, 4, 40, 40


def one_line(error, limit: int = 160) -> str:
    """Another library's error text as one bounded line (yajl's messages span lines and quote the input)."""
    return short_text(" ".join(str(error).split()), limit)


def excerpt(value) -> str:
    """A bounded repr for messages: a value nested 5,000 deep or 5,000 digits long stays one short line."""
    return _EXCERPT.repr(value)


def short(value) -> str:
    """A bounded repr for messages: whatever a value holds, the line stays short."""
    return _SHORT.repr(value)


def short_text(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def exit_on_user_error(main, logger: logging.Logger | None = None):
    """Run main(); a user error becomes one clear line on stderr (and in the run's log file) and exit code
    2, a failing disk (full, read-only, no permission) one line and exit code 1: never a traceback."""
    try:
        return main()
    except UserError as error:
        _report(f"error: {error}", logger)
        sys.exit(2)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        _report(f"error: {where}{error.strerror or error}", logger)
        sys.exit(1)
    except Interrupted as stop:
        _report(f"stopped: {stop}", logger)
        sys.exit(stop.exit_code)
    except Stopped as signal_name:
        _report(f"stopped by {signal_name}", logger)
        sys.exit(signal_exit_code(str(signal_name)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def signal_exit_code(name: str) -> int:
    """The shell's exit code for a process ended by the signal of that name: 128 + its number."""
    return 128 + signal.Signals[name].value


class Interrupted(Exception):
    """A stop signal ended a script's work early; the message says what was done and what is left, and the
    exit code is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _report(message: str, logger: logging.Logger | None) -> None:
    print(message, file=sys.stderr)
    logging.raiseExceptions = False  # a log file on a full disk must not print a traceback of its own
    for handler in logger.handlers if logger is not None else []:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord(logger.name, logging.ERROR, "", 0, message, None, None))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def save_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


UMASK = os.umask(0o022)
os.umask(UMASK)  # (reading the umask means setting it; it is put back at once)


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files of atomic writes that a killed run left behind (call while holding the output lock)."""
    for stale in list(directory.glob(".*.tmp")) + list(directory.glob("checkpoints/.*.tmp")):
        stale.unlink(missing_ok=True)


class OutputLock:
    """One run per output directory: a second run there is refused, naming the holder (pid, host). An flock
    dies with its process: a lock file whose holder has ended is taken over, with a warning."""

    def __init__(self, output_dir: Path, logger: logging.Logger, flag: str = "--output-dir",
                 name: str = ".lock"):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / name   # (a name of its own: one lock per output file in a shared folder)
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held for the life of the run)
        self.handle.seek(0)
        holder = self.handle.read().strip()
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ConfigError(f"{output_dir} is in use by another run ({holder or 'holder unknown'}): wait "
                              f"for it, or pass another {flag}") from None
        if holder:
            logger.warning(f"Taking over {self.path}: its holder ({holder}) has ended")
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.close()


RUN_FILE = "run.json"       # in an output directory: which run owns it, and the checkpoints it wrote
PREVIOUS_RUNS = "previous_runs"   # --overwrite moves another run's files here, one folder per run


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


class RunRecord:
    """A training run's claim on its output directory (run.json: its id, start, the checkpoints it wrote). A
    new run is refused another run's directory unless told to move its files aside; pruning removes only
    this run's checkpoints. Call claim() while holding the OutputLock."""

    def __init__(self, output_dir: Path, run_id: str, started: str, checkpoints: list[str],
                 finished: str | None = None):
        self.output_dir, self.run_id, self.started = output_dir, run_id, started
        self.checkpoints, self.finished = checkpoints, finished   # finished: when training ended, or None
        self.moved_aside: Path | None = None   # where --overwrite moved another run's files

    @classmethod
    def read(cls, output_dir: Path) -> "RunRecord | None":
        """The run.json there, or None (absent); a damaged one is a ConfigError naming it."""
        path, damaged = output_dir / RUN_FILE, "damaged run record; move the folder aside or pass --overwrite"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            record = cls(output_dir, data["run_id"], data["started"], data["checkpoints"],
                         data.get("finished"))   # (absent from records written before it was kept)
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}: {damaged}") from None
        if not (isinstance(record.run_id, str) and isinstance(record.started, str)
                and isinstance(record.finished, (str, type(None))) and isinstance(record.checkpoints, list)
                and all(isinstance(c, str) and "/" not in c for c in record.checkpoints)):
            raise ConfigError(f"{path}: {damaged}")
        return record

    @classmethod
    def claim(cls, output_dir: Path, resumed: dict | None, resume_path: str | None, overwrite: bool
              ) -> "RunRecord":
        """This run's record: a new one, or (resuming) the one of the run the checkpoint belongs to. Another
        run's files there are refused, naming that run and the ways out, or with `overwrite` moved aside."""
        try:
            existing = cls.read(output_dir)
        except ConfigError:
            if not overwrite:
                raise
            existing = None   # a damaged record: --overwrite moves the files it should have described aside
        checkpoint_dir = output_dir / "checkpoints"
        found = sorted(p.name for p in checkpoint_dir.glob("*.pt")) if checkpoint_dir.is_dir() else []
        if existing is not None and not found:
            existing = None   # a run that ended before its first checkpoint (bad data): nothing to keep
        run_id = (resumed or {}).get("run_id") or new_run_id()
        same_run = resumed is not None and (existing.run_id == run_id if existing is not None else
                                            Path(resume_path).resolve().parent == checkpoint_dir.resolve())
        moved_to = None
        if (existing is not None or found) and not same_run:
            if not overwrite:
                raise ConfigError(cls._refusal(output_dir, existing, found))
            moved_to = cls._move_aside(output_dir, existing)
            existing, found = None, []
        if existing is not None:
            return existing
        # a new run, or a resume into a new folder or a folder of checkpoints written before run records:
        # the checkpoints there are the resumed run's
        record = cls(output_dir, run_id, time.strftime("%Y-%m-%dT%H:%M:%S"), found if same_run else [])
        record.moved_aside = moved_to
        record.save()
        return record

    @staticmethod
    def _refusal(output_dir: Path, existing: "RunRecord | None", found: list[str]) -> str:
        who = (f"run {existing.run_id} (started {existing.started})" if existing is not None
               else "a run without a run record")
        newest = max(found, key=lambda n: (output_dir / "checkpoints" / n).stat().st_mtime)
        holds = f"{len(found)} checkpoint(s), the newest checkpoints/{newest}"
        moving = f"pass --overwrite to move its files to {output_dir / PREVIOUS_RUNS}/"
        if existing is not None and existing.finished:
            best = output_dir / "checkpoints" / "best_model.pt"
            return (f"{output_dir} holds a finished training run, {who}, complete since {existing.finished}: "
                    f"{holds}. To train again there, {moving}; or train into another --output-dir. To "
                    f"evaluate it: python evaluate.py --checkpoint {best}")
        return (f"{output_dir} holds the files of another training run, {who}: {holds}. Continue it with "
                f"--resume {output_dir / 'checkpoints' / newest}, train into another --output-dir, or "
                f"{moving}")

    @staticmethod
    def _move_aside(output_dir: Path, existing: "RunRecord | None") -> Path:
        target = output_dir / PREVIOUS_RUNS / (existing.run_id if existing is not None else new_run_id())
        target.mkdir(parents=True, exist_ok=False)
        for entry in sorted(output_dir.iterdir()):
            if entry.name not in (".lock", PREVIOUS_RUNS):
                os.replace(entry, target / entry.name)
        return target

    def save(self) -> None:
        save_json(self.output_dir / RUN_FILE, {"run_id": self.run_id, "started": self.started,
                                                "finished": self.finished,
                                                "checkpoints": sorted(set(self.checkpoints))})

    def finish(self) -> None:
        """Training ran to its end: a later run there is told so (resume has nothing left to do)."""
        self.finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()

    def wrote(self, name: str) -> None:
        if name not in self.checkpoints:
            self.checkpoints.append(name)
            self.save()

    def prune(self, prefix: str, keep: int) -> None:
        """Keep the newest `keep` of this run's checkpoints named prefix_N.pt (by N); other runs' are never
        touched."""
        own = sorted((n for n in self.checkpoints if re.fullmatch(rf"{prefix}_\d+\.pt", n)),
                     key=lambda n: int(n[len(prefix) + 1:-3]))
        for name in own[:-keep]:
            (self.output_dir / "checkpoints" / name).unlink(missing_ok=True)
            self.checkpoints.remove(name)
        self.save()


def fsync_directory(path) -> None:
    """Make a rename or a new entry in `path` durable (the directory's own metadata)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path, write) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; the file should be like every other one written
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        # torch.save turns a failed write (a full disk) into a RuntimeError about zip positions, raised while
        # closing; the OSError behind it is in the chain. A failed write names no file: name it.
        cause = error if isinstance(error, (OSError, RuntimeError)) else None  # never an interrupt
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None and not cause.filename:
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise


class Stopped(Exception):
    """A stop signal arrived after the last training step (the checkpoints are all written by then)."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held(drop: bool = False):
    """SIGINT and SIGTERM held back for the block (a clean-up that must not be cut short), then let through,
    or with `drop` discarded (the run is ending already: a second Ctrl-C meanwhile adds nothing). Their
    handlers are swapped, not the signal mask: a thread of a native library (OpenBLAS) would take a masked
    signal and have the main thread run the handler anyway."""
    arrived: list[int] = []
    try:
        previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum))
                    for sig in STOP_SIGNALS}
    except ValueError:   # not the main thread, where no handler runs
        previous = None
    try:
        yield
    finally:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in [] if drop else dict.fromkeys(arrived):
            signal.raise_signal(signum)


class StopSignal:
    """SIGTERM or SIGINT. With raise_now the work stops at once, as Stopped; else the flag asks the loop to
    stop at the next step boundary; a second signal stops at once. Installed before any work, so that no
    moment is left to the default (die without a word, leaving workers and temp files behind)."""

    def __init__(self, raise_now: bool = False):
        self.received: str | None = None
        self.raise_now = raise_now
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        already, self.received = self.received, signal.Signals(signum).name
        if already is not None:
            raise KeyboardInterrupt
        if self.raise_now:
            raise Stopped(self.received)

    @property
    def exit_code(self) -> int:
        return signal_exit_code(self.received) if self.received else 0


# ----------------------------------------------------------------------------- logging and progress
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"


def setup_logger(output_dir: str | None, is_master: bool = True, log_file: str = "training.log",
                 logger: logging.Logger | None = None) -> logging.Logger:
    """Console + output_dir/<log_file> on the master; other ranks only print warnings."""
    logger = logger or logging.getLogger("deeplog")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_master else logging.WARNING)
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_master and output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def format_duration(seconds: float) -> str:
    """10.5s, 10.5m, 2h 30m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    hours, minutes = divmod(int(seconds // 60), 60)
    return f"{hours}h {minutes}m"


class EarlyStopping:
    """Stop when validation loss has not improved by min_delta for `patience` epochs."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.bad_epochs = math.inf, 0

    def step(self, val_loss: float) -> bool:
        """Record an epoch's loss; True when it is a new best."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.bad_epochs = float(state["best_loss"]), int(state["bad_epochs"])


AUTO_WARMUP_STEPS = 50   # training.warmup_steps null: this many, or a tenth of a shorter run's steps


def warmup_steps(setting: int | None, total_steps: int) -> int:
    """training.warmup_steps when set, else a tenth of the run's steps, at most AUTO_WARMUP_STEPS."""
    return setting if setting is not None else min(AUTO_WARMUP_STEPS, total_steps // 10)


def lr_multiplier(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
    """LR factor per optimizer step: linear warm-up, then cosine or linear decay to min_ratio."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape
    return factor


class Throughput:
    """Predicted tokens per second and the share of wall time waiting for the next batch, since the previous
    log line: whether the input pipeline keeps the GPUs busy."""

    def __init__(self, batches):
        self.batches, self.tokens, self.waited = iter(batches), 0, 0.0
        self.since = time.perf_counter()

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - started

    def fields(self) -> str:
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        text = f"{self.tokens / elapsed:,.0f} tok/s | data wait {self.waited / elapsed:.0%}"
        self.tokens, self.waited, self.since = 0, 0.0, now
        return text
