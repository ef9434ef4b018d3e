"""Plumbing shared by train.py and evaluate.py: config, logging, distributed setup, checkpoints, GPU stats.

Examples:

    from utils import load_config
    config = load_config("config.yaml", {"training.epochs": 3})   # defaults < YAML < overrides
    print(config.training.learning_rate)

    python -c "import utils; print(utils.GPUMonitor(__import__('logging').getLogger()).summary())"
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import pickle
import random
import re
import reprlib
import signal
import socket
import stat
import sys
import tempfile
import time
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

if typing.TYPE_CHECKING:
    from model import DeepLog


# ----------------------------------------------------------------------------- config
# The one place where defaults live. config.yaml overrides them, CLI flags override config.yaml.
@dataclass
class ModelConfig:
    vocab_size: int = 29          # event IDs are 0..vocab_size-1 (HDFS keys are 1..28)
    embedding_dim: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2


@dataclass
class TrainingConfig:
    batch_size: int = 64          # global: split across GPUs (DataParallel) or ranks (DDP)
    epochs: int = 10
    learning_rate: float = 0.001
    optimizer: str = "adamw"      # adam | adamw
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"   # cosine | linear | constant, after linear warm-up
    warmup_steps: typing.Optional[int] = None  # null: a tenth of the run's steps, at most 50
    min_lr_ratio: float = 0.1     # the decay ends at learning_rate * min_lr_ratio
    max_grad_norm: float = 1.0    # 0 disables clipping
    mixed_precision: bool = True  # CUDA: bf16 where supported, else fp16 + GradScaler; CPU: bf16 if native
    amp_dtype: str = "auto"       # auto | bfloat16 | float16
    use_multi_gpu: bool = True    # DataParallel over all visible GPUs (torchrun uses DDP instead)
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    seed: int = 42
    output_dir: str = "outputs"
    log_every_steps: int = 20
    gpu_stats_every_steps: int = 200
    save_every_steps: int = 500   # 0 disables step checkpoints
    keep_last_checkpoints: int = 3
    save_every_epoch: bool = True
    evaluate_after_training: bool = True


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 3
    min_delta: float = 0.0001


@dataclass
class LazyLoadingConfig:
    enabled: bool = True          # cache: memory-map it (own memory flat); false: read it whole into memory
    cache: bool = True            # parse each file once into a token cache; false: parse every epoch
    cache_dir: typing.Optional[str] = None     # null: $XDG_CACHE_HOME/deeplog or ~/.cache/deeplog
    cache_workers: typing.Optional[int] = None  # processes of the first pass (cache build); null: all cores
    buffer_size: int = 10000      # cache: windows per block (length bucketing); streaming: the shuffle buffer
    shuffle_buffer: bool = True   # shuffle the training windows every epoch (false: file order)
    length_bucketing: bool = False  # cache: batches of windows alike in length (less padding, but on HDFS
                                    # it trained worse)
    num_workers: int = 0          # streaming only: reader processes parsing files in parallel (several files)


@dataclass
class DataConfig:
    preprocessed_dir: str = "data/sample/train"
    abnormal_dir: typing.Optional[str] = None
    event_ids_field: str = "event_ids"
    label_field: str = "label"
    session_id_field: str = "session_id"
    json_array_key: str = "sessions"
    max_seq_length: int = 256
    window_context: int = 32
    validation_split: float = 0.1
    skip_bad_records: bool = False
    samples_per_epoch: typing.Optional[int] = None  # skip the counting pass on huge data


@dataclass
class EvaluationConfig:
    top_k: int = 10
    top_g: int = 9                # DeepLog's rule: abnormal when any event is outside the top-g
    decision_rule: str = "combined"   # or probability, event_set, event_pair, count_vector, top_g, score_p*
    target_fpr: float = 0.0005    # LSTM rules: thresholds flag at most this fraction of calibration sessions
    event_set_rule: bool = True   # false: never record nor use the sets of event types (as beyond their cap)
    event_pair_rule: bool = True  # false: never record nor use the pairs of event types sharing a session
    batch_size: int = 256


@dataclass
class PreprocessConfig:
    """preprocess.py's settings (raw logs -> sessions); a parser state saves the grouping ones with it."""
    log_format: str = "<Content>"         # loghub-style: <Field> placeholders; Drain parses <Content>
    masks: list = field(default_factory=list)  # regexes replaced by <*> before Drain
    default_masks: bool = True            # also apply preprocess.DEFAULT_MASKS (after the user's)
    similarity: float = 0.45              # Drain sim_th: the middle of the plateau (0.4-0.5) where the loghub
                                          # samples parse best with the default masks (benchmarks/parsing.py)
    depth: int = 4                        # Drain prefix-tree depth (>= 3)
    max_templates: typing.Optional[int] = None  # Drain max_clusters: LRU cap on templates held in memory
    session_key: typing.Optional[str] = None    # regex of session identifiers
    window: typing.Optional[str] = None         # count:SIZE[:STEP] or time:SIZE[:STEP] (seconds)
    time_field: typing.Optional[str] = None     # a log-format field holding the time (time windows)
    time_format: typing.Optional[str] = None    # strptime format of time_field; null: epoch seconds
    labels: typing.Optional[str] = None         # CSV of session id, label (Normal/Anomaly or 0/1)
    label_field: typing.Optional[str] = None    # a log-format field that labels each line
    normal_value: str = "-"                     # ... and its value on normal lines
    session_idle: typing.Optional[int] = None   # a session not named for this many lines is complete: written
    max_open_sessions: int = 1_000_000          # beyond this, the least recently active session is written


@dataclass
class DetectConfig:
    """detect.py --follow (live detection): when a session is complete, how often the place is saved."""
    idle_lines: typing.Optional[int] = None     # a session without an event for this many lines is closed;
                                                # null: the parser state's session_idle, else 100,000
    idle_seconds: typing.Optional[float] = None  # ... or for this many seconds of wall-clock time
    max_session_events: typing.Optional[int] = None  # a session is closed at this many events (a window
                                                     # fills); its next event opens a new one
    state_interval_s: float = 5.0   # the position and the open sessions are saved this often (and on SIGTERM)
    poll_interval_s: float = 0.1    # wait at the end of a followed file before looking again
    block_lines: int = 8192         # lines read and scored together, at most (fewer when no more have come)
    parse_workers: int = 1          # raw logs: parse the next lines in a worker process while these are
                                    # scored (0: here, one core)
    prefix_nodes: int = 20_000      # session prefixes whose LSTM states are shared (0: none); each holds
                                    # 2 x num_layers x hidden_size floats (4 KB for the default model)
    max_misses: int = 3             # misses shown per abnormal verdict


@dataclass
class UpdateConfig:
    """train.py --update: fine-tuning a trained model on sessions an operator marked normal."""
    epochs: int = 2                 # with 1,000 replayed sessions: on HDFS the same fixes as 3 x 2,000, in
    learning_rate: float = 1.0e-4   # 8% of the training's steps, not 20% (benchmarks/feedback.py)
    replay_sessions: int = 1000     # training sessions replayed with the feedback, so nothing is forgotten
    feedback_repeats: int = 8       # each feedback session is seen this many times per epoch


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    lazy_loading: LazyLoadingConfig = field(default_factory=LazyLoadingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)


class UserError(Exception):
    """Something the user gave us is wrong (a file, a flag, a setting): exit_on_user_error makes it one
    line."""


class ConfigError(UserError):
    """A bad config file, key or value; the message names it."""


CHOICES = {"training.optimizer": ("adam", "adamw"), "training.lr_schedule": ("cosine", "linear", "constant"),
           "training.amp_dtype": ("auto", "bfloat16", "float16")}
# and evaluation.decision_rule: one of calibration.RULES, the rules' owner (checked in check_values)
POSITIVE = ("model.vocab_size", "model.embedding_dim", "model.hidden_size", "model.num_layers",
            "training.batch_size", "training.epochs", "training.learning_rate", "training.log_every_steps",
            "training.gpu_stats_every_steps", "training.keep_last_checkpoints", "lazy_loading.buffer_size",
            "data.max_seq_length", "evaluation.top_k", "evaluation.top_g", "evaluation.batch_size")


MAX_YAML_DEPTH = 16      # a config nests 2 or 3 levels (section, key, a list of masks)
MAX_YAML_ALIASES = 64    # anchors are fine; a "billion laughs" file of aliases of aliases is not
MAX_YAML_BYTES = 2 ** 20


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain types only, no tags that build objects) that refuses what no config needs:
    nesting deeper than MAX_YAML_DEPTH and more than MAX_YAML_ALIASES aliases, each of which would
    otherwise expand into memory and into every message that shows the value."""

    depth = aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name): expanded, they multiply")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def file_kind(path) -> str:
    """What `path` is, in words ("a FIFO (named pipe)", "a character device", ...; "a regular file",
    "a directory"), following symlinks (/dev/stdin is then what standard input is)."""
    return _kind_of(os.stat(path).st_mode)


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "no regular file"


def open_regular(path):
    """A file a user names (a config, calibration, parser state, labels), opened for reading in binary, or
    OSError: one that is not a regular file (a FIFO, a device, a directory) is refused instead of read, as
    reading it could wait forever or never end. Opened without blocking, so that a FIFO with no writer is
    refused too, then read as usual."""
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


def read_yaml(path) -> object:
    """A YAML file of plain types, bounded (size, nesting, aliases): anything else is one ConfigError."""
    try:
        with open_regular(path) as handle:
            text = handle.read(MAX_YAML_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: over {MAX_YAML_BYTES // 2 ** 20} MB: not a config file")
    try:
        return yaml.load(text.decode("utf-8"), Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as error:   # a number of thousands of digits
        raise ConfigError(f"{path}: invalid YAML: {short_text(str(error), 120)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {short_text(' '.join(str(error).split()), 300)}") from None


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 6
_SHORT.maxlevel = 3


def short(value) -> str:
    """A bounded repr for messages: whatever a value holds, the line stays short."""
    return _SHORT.repr(value)


def short_text(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """Dataclass defaults < YAML file < overrides ({"section.key": value}); every value type-checked."""
    config = Config()
    if path:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section_name, values in _canonical_layout(raw, path).items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section_name}' must be a mapping")
            for key, value in values.items():
                set_value(config, f"{section_name}.{key}", value, source=path)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_value(config, dotted, value, source="command line")
    check_values(config)
    return config


# The original design's config.yaml nests some settings elsewhere; both layouts load, and the resolved
# config a run saves is always the canonical one.
ORIGINAL_LAYOUT = {("training", "num_epochs"): ("training", "epochs"),
                   ("training", "early_stopping"): ("early_stopping", None),
                   ("data", "lazy_loading"): ("lazy_loading", None)}


def _canonical_layout(raw: dict, source: str) -> dict:
    """The original design's keys moved to where this config keeps them; a setting given in both places
    with different values is an error naming both."""
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for (section, key), (target, target_key) in ORIGINAL_LAYOUT.items():
        if not isinstance(raw.get(section), dict) or key not in raw[section]:
            continue
        value = raw[section].pop(key)
        moved = value if target_key is None else {target_key: value}
        if not isinstance(moved, dict):
            raise ConfigError(f"{source}: '{section}.{key}' must be a mapping")
        destination = raw.setdefault(target, {}) or {}
        raw[target] = destination
        for name, setting in moved.items():
            if name in destination and destination[name] != setting:
                raise ConfigError(f"{source}: '{target}.{name}' is given twice, as "
                                  f"{short(destination[name])} and "
                                  f"as {short(setting)} under '{section}.{key}'")
            destination[name] = setting
    return raw


# Keys earlier versions had: a checkpoint that holds one still loads; a config file that sets one is told why.
RETIRED = {"evaluation.probability_margin": "the probability bound is now set by evaluation.target_fpr (the "
                                            "fraction of normal calibration sessions it may flag)"}


def set_value(config: Config, dotted: str, value, source: str) -> None:
    """config.<dotted> = value, type-checked against the dataclass; an unknown key names itself (call
    check_values once all are set)."""
    section_name, _, key = dotted.partition(".")
    section = getattr(config, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"{source}: unknown config section '{section_name}' "
                          f"(known: {', '.join(f.name for f in dataclasses.fields(Config))})")
    hints = typing.get_type_hints(type(section))
    if dotted in RETIRED:
        if source == "checkpoint config":
            return  # a checkpoint written before the key was retired: its calibration is stored with it
        raise ConfigError(f"{source}: '{dotted}' is retired: {RETIRED[dotted]}")
    if key not in hints:
        raise ConfigError(f"{source}: unknown config key '{dotted}' "
                          f"(known in {section_name}: {', '.join(hints)})")
    setattr(section, key, _coerce(hints[key], value, dotted, source))


FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _coerce(expected, value, dotted: str, source: str):
    optional = typing.get_origin(expected) is typing.Union
    if optional:
        if value is None:
            return None
        expected = next(t for t in typing.get_args(expected) if t is not type(None))
    # YAML 1.1 reads 1e-3 and 1e9 (no dot) as strings, where --lr 1e-3 is a number: such a string is one
    # too (for an int key only in that exponent form, and only when whole: a quoted "3" stays a string)
    if expected is float and isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()):
        value = float(value)
    elif expected is int and isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()) \
            and "e" in value.lower() and float(value).is_integer():
        value = int(float(value))
    ok = (isinstance(value, bool) if expected is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else
          isinstance(value, int) and not isinstance(value, bool) if expected is int else
          isinstance(value, expected))
    if not ok:
        raise ConfigError(f"{source}: '{dotted}' must be "
                          f"{'null or ' if optional else ''}{expected.__name__}, got {short(value)} "
                          f"({type(value).__name__})")
    # every number bounded here, whatever the key: a float finite (NaN passes every comparison of the range
    # checks), an int within what a float holds exactly (the code divides, logs and formats them)
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{source}: '{dotted}' must be a finite number, got {short(value)}")
    if expected in (int, float) and abs(value) > MAX_CONFIG_NUMBER:
        raise ConfigError(f"{source}: '{dotted}' is out of range (at most 2**53 in size), got {short(value)}")
    return float(value) if expected is float else value


MAX_CONFIG_NUMBER = 2 ** 53


MAX_VOCAB_SIZE = 2 ** 24


def null_or_positive(value) -> bool:
    return value is None or value >= 1


def check_values(config: Config) -> None:
    def get(dotted):
        section, key = dotted.split(".")
        return getattr(getattr(config, section), key)
    from calibration import RULES  # here: calibration imports this module

    for dotted, allowed in {**CHOICES, "evaluation.decision_rule": RULES}.items():
        if get(dotted) not in allowed:
            raise ConfigError(f"'{dotted}' must be one of {', '.join(allowed)}, got {short(get(dotted))}")
    if not DEVICE.fullmatch(config.training.device):
        raise ConfigError("'training.device' must be auto, cpu, cuda or cuda:N, got "
                          f"{short(config.training.device)}")
    for dotted in POSITIVE:
        if get(dotted) <= 0:
            raise ConfigError(f"'{dotted}' must be > 0, got {short(get(dotted))}")
    checks = [("model.dropout", 0 <= config.model.dropout < 1, "in [0, 1)"),
              # an embedding and an output layer of this many rows, a count per event type: memory
              ("model.vocab_size", config.model.vocab_size <= MAX_VOCAB_SIZE, f"at most {MAX_VOCAB_SIZE:,}"),
              ("training.seed", 0 <= config.training.seed < 2 ** 32, "in [0, 2**32)"),
              ("data.validation_split", 0 <= config.data.validation_split < 1, "in [0, 1)"),
              ("data.window_context", 0 <= config.data.window_context < config.data.max_seq_length,
               "in [0, data.max_seq_length)"),
              ("training.max_grad_norm", config.training.max_grad_norm >= 0, ">= 0"),
              ("lazy_loading.num_workers", config.lazy_loading.num_workers >= 0, ">= 0"),
              ("lazy_loading.cache_workers", null_or_positive(config.lazy_loading.cache_workers), "null or "
                                                                                                  ">= 1"),
              ("training.warmup_steps", (config.training.warmup_steps or 0) >= 0, "null or >= 0"),
              ("training.save_every_steps", config.training.save_every_steps >= 0, ">= 0"),
              ("training.min_lr_ratio", 0 <= config.training.min_lr_ratio <= 1, "in [0, 1]"),
              ("early_stopping.patience", config.early_stopping.patience >= 1, ">= 1"),
              ("evaluation.target_fpr", 0 < config.evaluation.target_fpr < 0.5, "in (0, 0.5)"),
              ("preprocess.similarity", 0 <= config.preprocess.similarity <= 1, "in [0, 1]"),
              ("preprocess.depth", config.preprocess.depth >= 3, ">= 3"),
              ("preprocess.max_templates", null_or_positive(config.preprocess.max_templates), "null or >= 1"),
              ("preprocess.session_idle", null_or_positive(config.preprocess.session_idle), "null or >= 1"),
              ("preprocess.max_open_sessions", config.preprocess.max_open_sessions >= 1, ">= 1"),
              ("preprocess.masks", all(isinstance(m, str) for m in config.preprocess.masks), "a list of "
                                                                                             "strings"),
              ("detect.idle_lines", null_or_positive(config.detect.idle_lines), "null or >= 1"),
              ("detect.idle_seconds", (config.detect.idle_seconds or 1) > 0, "null or > 0"),
              ("detect.max_session_events", null_or_positive(config.detect.max_session_events),
               "null or >= 1"),
              ("detect.state_interval_s", config.detect.state_interval_s > 0, "> 0"),
              ("detect.poll_interval_s", config.detect.poll_interval_s > 0, "> 0"),
              ("detect.block_lines", config.detect.block_lines >= 1, ">= 1"),
              ("detect.prefix_nodes", config.detect.prefix_nodes >= 0, ">= 0"),
              ("detect.parse_workers", config.detect.parse_workers in (0, 1), "0 or 1"),
              ("detect.max_misses", config.detect.max_misses >= 0, ">= 0"),
              ("update.epochs", config.update.epochs >= 1, ">= 1"),
              ("update.learning_rate", config.update.learning_rate > 0, "> 0"),
              ("update.replay_sessions", config.update.replay_sessions >= 0, ">= 0"),
              ("update.feedback_repeats", config.update.feedback_repeats >= 1, ">= 1")]
    for dotted, ok, rule in checks:
        if not ok:
            raise ConfigError(f"'{dotted}' must be {rule}, got {short(get(dotted))}")


def reader_options(config: Config) -> dict:
    """The data settings every reader of session files takes (dataset.iter_sessions and friends)."""
    data = config.data
    return dict(event_ids_field=data.event_ids_field, label_field=data.label_field,
                session_id_field=data.session_id_field, json_array_key=data.json_array_key,
                skip_bad_records=data.skip_bad_records)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved in a checkpoint (same type checks as a YAML file)."""
    flat = {f"{section}.{key}": value for section, keys in values.items() for key, value in keys.items()}
    config = Config()
    for dotted, value in flat.items():
        set_value(config, dotted, value, source="checkpoint config")
    return config


def save_config(config: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------- errors and files
class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint."""


USER_ERRORS = (UserError,)  # dataset.DataError (dataset.py imports nothing of utils) is added by the scripts


def exit_on_user_error(main, errors: tuple, logger: logging.Logger | None = None):
    """Run main(); a user error becomes one clear line on stderr (and in the run's log file) and exit code
    2, a failing disk (full, read-only, no permission) one line and exit code 1: never a traceback."""
    try:
        return main()
    except errors as error:
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
    """One run per output directory: a second run there is refused, naming the holder (pid, host). The lock
    is an flock, so it dies with its process; a lock file whose holder has ended is taken over, with a
    warning."""

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
    """A training run's claim on its output directory (run.json: its id, when it started, the checkpoints it
    wrote). A new run is refused a directory that holds another run's files unless told to move them aside;
    pruning removes only checkpoints this run wrote. Call claim() while holding the OutputLock."""

    def __init__(self, output_dir: Path, run_id: str, started: str, checkpoints: list[str]):
        self.output_dir, self.run_id, self.started = output_dir, run_id, started
        self.checkpoints = checkpoints
        self.moved_aside: Path | None = None   # where --overwrite moved another run's files

    @classmethod
    def read(cls, output_dir: Path) -> "RunRecord | None":
        """The run.json there, or None (absent); a damaged one is a ConfigError naming it."""
        path, damaged = output_dir / RUN_FILE, "damaged run record; move the folder aside or pass --overwrite"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            record = cls(output_dir, data["run_id"], data["started"], data["checkpoints"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}: {damaged}") from None
        if not (isinstance(record.run_id, str) and isinstance(record.started, str)
                and isinstance(record.checkpoints, list)
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
        if (existing is not None or found) and not same_run:
            if not overwrite:
                raise ConfigError(cls._refusal(output_dir, existing, found))
            moved_to = cls._move_aside(output_dir, existing)
            existing, found = None, []
        else:
            moved_to = None
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
        return (f"{output_dir} holds the files of another training run, {who}: {holds}. Continue it with "
                f"--resume {output_dir / 'checkpoints' / newest}, train into "
                "another --output-dir, or pass --overwrite to move its files to "
                f"{output_dir / PREVIOUS_RUNS}/")

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
                                                "checkpoints": sorted(set(self.checkpoints))})

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


def save_checkpoint(state: dict, path) -> None:
    """Tensors and plain types only (loadable with weights_only=True), written atomically."""
    atomic_write(path, lambda handle: torch.save(state, handle))


ZIP_MAGIC = b"PK\x03\x04"  # how a zip archive, and so every torch.save file, begins


def load_checkpoint(path, map_location="cpu", for_resume: bool = False) -> dict:
    """A checkpoint written by train.py, loaded with weights_only=True (never unpickling code) and validated:
    every key the code reads, with its type, shape and range (for_resume: also the training state). Its
    calibration comes back in the current form (calibration.checked). Anything else is one CheckpointError
    line naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        candidates = (path / "best_model.pt", path / "checkpoints" / "best_model.pt")
        inside = next((p for p in candidates if p.is_file()), None)
        raise CheckpointError(f"{path} is a directory: pass a checkpoint file, "
                              + (f"e.g. {inside}" if inside else "such as "
                                                                 "OUTPUT_DIR/checkpoints/best_model.pt"))
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open_regular(path) as handle:
            head = handle.read(4)
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({error.strerror or error})") from None
    not_ours = f"{path} is not a checkpoint written by train.py"
    if not head:
        raise CheckpointError(f"{not_ours} (empty file)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the end
        truncated = head == ZIP_MAGIC
        raise CheckpointError(f"{not_ours} ({'truncated' if truncated else 'not a zip archive'})")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{not_ours} (unsafe content refused: it holds pickled objects, not only "
                              "tensors and plain types)") from None
    except Exception:  # torch raises many types for damaged archives
        raise CheckpointError(f"{not_ours} (damaged archive)") from None
    keys = set(checkpoint if isinstance(checkpoint, dict) else ())
    missing = {"model_state_dict", "model_args", "config"} - keys
    if missing:
        raise CheckpointError(f"{path}: not a DeepLog checkpoint (missing {', '.join(sorted(missing))})")
    try:
        _check_model_keys(checkpoint)
        _check_records(checkpoint)
        if for_resume:
            _check_training_state(checkpoint)
    except (ValueError, TypeError, KeyError, ConfigError) as error:
        detail = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise CheckpointError(f"{path}: damaged checkpoint ({detail})") from None
    return checkpoint


MODEL_ARGS = {"vocab_size": int, "embedding_dim": int, "hidden_size": int, "num_layers": int,
              "dropout": float}


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model_keys(checkpoint: dict) -> None:
    """model_args, model_state_dict and config: the weights fit the arguments (checked on their shapes
    before any model is built, so that an absurd vocab_size costs no memory), the config is a valid one."""
    args, weights = checkpoint["model_args"], checkpoint["model_state_dict"]
    _expect(isinstance(args, dict) and set(args) == set(MODEL_ARGS),
            f"model_args must hold exactly {', '.join(MODEL_ARGS)}")
    for key, kind in MODEL_ARGS.items():
        value = args[key]
        _expect(_is_int(value) and value >= 1 if kind is int else
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                f"model_args['{key}'] must be {'an int >= 1' if kind is int else 'a number in [0, 1)'}, "
                f"got {value!r}"[:160])
    _expect(isinstance(weights, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in weights.items()),
            "model_state_dict must map names to tensors")
    from model import DeepLog  # model imports nothing of utils at the top: no cycle

    expected = DeepLog.state_shapes(**args)   # computed, never allocated: an absurd size costs nothing
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    wrong = [f"{k} missing" for k in expected if k not in stored]
    wrong += [f"{k} unknown" for k in stored if k not in expected]
    wrong += [f"{k} is {list(stored[k])}, not {list(shape)}" for k, shape in expected.items()
              if k in stored and stored[k] != shape]
    _expect(not wrong, f"weights do not fit the stored model_args {short(args)}: {'; '.join(wrong[:3])}")
    config = checkpoint["config"]
    _expect(isinstance(config, dict) and all(isinstance(v, dict) for v in config.values()),
            "config must be a mapping of sections")
    check_values(config_from_dict(checkpoint["config"]))   # a ConfigError names the key, this names the file
    for key in ("split_scheme", "run_id"):
        _expect(checkpoint.get(key) is None or isinstance(checkpoint[key], str), f"{key} must be a string")


def _check_records(checkpoint: dict) -> None:
    """What detection reads besides the weights: the event sets and pairs of training, the count vectors
    and the calibration (upgraded to the current form here, the one place a stored one is read)."""
    vocab_size = checkpoint["model_args"]["vocab_size"]
    sets, pairs = checkpoint.get("event_sets"), checkpoint.get("event_pairs")
    _expect(sets is None or isinstance(sets, list) and all(
        isinstance(s, list) and all(_is_int(e) and 0 <= e < vocab_size for e in s) for s in sets),
        f"event_sets must be null or lists of event IDs in [0, {vocab_size})")
    if pairs is not None:
        _expect(isinstance(pairs, torch.Tensor) and pairs.dim() == 2 and pairs.shape[1] == 2
                and not pairs.is_floating_point() and pairs.dtype != torch.bool,
                f"event_pairs must be an [n, 2] integer tensor, got "
                f"{list(pairs.shape) if isinstance(pairs, torch.Tensor) else type(pairs).__name__}")
        _expect(not len(pairs) or 0 <= int(pairs.min()) and int(pairs.max()) < vocab_size,
                f"event_pairs must hold event IDs in [0, {vocab_size})")
    if checkpoint.get("count_vectors") is not None:
        from model import CountVectors  # model imports nothing of utils at the top: no cycle
        CountVectors.from_state(checkpoint["count_vectors"])
    if checkpoint.get("calibration") is not None:
        import calibration
        try:
            checkpoint["calibration"] = calibration.checked(checkpoint["calibration"], "its calibration")
        except calibration.CalibrationError as error:
            raise ValueError(str(error)) from None
    _check_lineage(checkpoint)


SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_lineage(checkpoint: dict) -> None:
    """What an update (train.py --update) records: its "parent" checkpoint and the "feedback" it learned;
    both absent (None) in a checkpoint of training."""
    parent, learned = checkpoint.get("parent"), checkpoint.get("feedback")
    if parent is not None:
        _expect(isinstance(parent, dict) and isinstance(parent.get("path"), str)
                and isinstance(parent.get("sha256"), str) and SHA256.fullmatch(parent["sha256"]) is not None
                and (parent.get("run_id") is None or isinstance(parent["run_id"], str))
                and (parent.get("step") is None or _is_int(parent["step"]) and parent["step"] >= 0)
                and (parent.get("epoch") is None or _is_int(parent["epoch"]) and parent["epoch"] >= 1),
                "parent must hold path, sha256 (64 hex digits), run_id, step and epoch")
    if learned is not None:
        _expect(isinstance(learned, dict) and isinstance(learned.get("path"), str)
                and isinstance(learned.get("sha256"), str) and SHA256.fullmatch(learned["sha256"]) is not None
                and _is_int(learned.get("sessions")) and learned["sessions"] >= 1
                and all(_is_int(learned.get(k)) and learned[k] >= 0 for k in ("replay_sessions", "epochs")),
                "feedback must hold path, sha256 (64 hex digits), sessions (>= 1), replay_sessions, epochs")


def _check_training_state(checkpoint: dict) -> None:
    """What a resume restores: each key of TrainState.state_dict with its type."""
    for key in ("optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "early_stopping",
                "history", "data_position"):
        _expect(isinstance(checkpoint[key], dict), f"{key} must be a mapping")
    _expect(_is_int(checkpoint["step"]) and checkpoint["step"] >= 0, "step must be an int >= 0")
    history = checkpoint["history"]
    _expect(set(history) == {"epoch", "train_loss", "val_loss", "learning_rate", "epoch_time"}
            and all(isinstance(v, list) for v in history.values())
            and len({len(v) for v in history.values()}) == 1, "history must hold five lists of one length")
    position = checkpoint["data_position"]
    for key, ok in (("epoch", lambda v: _is_int(v) and v >= 1),
                    ("batches_done", lambda v: _is_int(v) and v >= 0),
                    ("epoch_tokens", lambda v: _is_int(v) and v >= 0),
                    ("epoch_loss_sum", lambda v: isinstance(v, (int, float)) and math.isfinite(v)),
                    ("epoch_time", lambda v: isinstance(v, (int, float)) and v >= 0),
                    ("order", lambda v: isinstance(v, dict))):
        _expect(ok(position[key]),
                f"data_position['{key}'] is out of range or mistyped: {position[key]!r}"[:160])
    stopping = checkpoint["early_stopping"]
    _expect(isinstance(stopping.get("best_loss"), (int, float)) and _is_int(stopping.get("bad_epochs")),
            "early_stopping must hold best_loss (a number) and bad_epochs (an int)")
    states = checkpoint["rng_state"]
    _expect(isinstance(states, list) and states and all(map(_rng_state_ok, states)),
            "rng_state must hold every rank's RNG states (torch, cuda, numpy, python)")
    _check_optimizer_state(checkpoint)


def _rng_state_ok(state) -> bool:
    """One rank's rng_state() as saved: the shapes set_rng_state needs, so that it cannot fail later."""
    if not isinstance(state, dict) or not isinstance(state.get("cuda"), list):
        return False
    torch_state, numpy_state, python_state = state.get("torch"), state.get("numpy"), state.get("python")
    return (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
            and torch_state.numel() == torch.get_rng_state().numel()
            and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in state["cuda"])
            and isinstance(numpy_state, dict) and isinstance(numpy_state.get("keys"), torch.Tensor)
            and numpy_state["keys"].numel() == 624 and not numpy_state["keys"].is_floating_point()
            and _is_int(numpy_state.get("pos")) and 0 <= numpy_state["pos"] <= 624
            and _is_int(numpy_state.get("has_gauss")) and isinstance(numpy_state.get("gauss"), float)
            and isinstance(python_state, list) and len(python_state) == 3
            and isinstance(python_state[0], list) and len(python_state[0]) == 625
            and all(_is_int(v) for v in python_state[0]) and _is_int(python_state[1])
            and (python_state[2] is None or isinstance(python_state[2], float)))


def _check_optimizer_state(checkpoint: dict) -> None:
    """The optimizer state belongs to this model: one parameter group over its parameters, and each
    parameter's moments of the parameter's shape."""
    shapes = [tuple(v.shape) for k, v in checkpoint["model_state_dict"].items() if k != "seen_events"]
    state = checkpoint["optimizer_state_dict"]
    groups = state.get("param_groups")
    _expect(isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and groups[0].get("params") == list(range(len(shapes)))
            and isinstance(state.get("state"), dict),
            f"optimizer_state_dict is not the optimizer of this model ({len(shapes)} parameters, one group)")
    for index, moments in state["state"].items():
        _expect(_is_int(index) and 0 <= index < len(shapes) and isinstance(moments, dict) and all(
            tuple(v.shape) == shapes[index] for k, v in moments.items()
            if isinstance(v, torch.Tensor) and k != "step"),
            f"optimizer_state_dict holds moments of another shape than parameter {index}")


def model_from_checkpoint(checkpoint: dict, path) -> "DeepLog":
    """The DeepLog of a loaded checkpoint (load_checkpoint), in eval mode on the CPU, with its calibration and
    record of event types seen together in training, scoring in the windows it was trained with."""
    from model import CoOccurrence, DeepLog

    model = DeepLog(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model_state_dict"])   # the shapes were checked by load_checkpoint
    model.use_training_windows(checkpoint)
    model.calibration = checkpoint.get("calibration")
    model.co_occurrence = CoOccurrence.from_checkpoint(checkpoint)
    return model.eval()


# ----------------------------------------------------------------------------- training state
class TrainState:
    """What a checkpoint saves and a resume restores, in one place, so that both read as one schema: the
    model (unwrapped) and its arguments, optimizer, scheduler, GradScaler, early stopping, history, the
    step, the data position (epoch, batches done, the epoch's running loss and time), every rank's RNG
    state, the resolved config and the record of event sets seen in training."""

    def __init__(self, model, optimizer, scheduler, scaler, early_stopping, config: "Config"):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.early_stopping, self.config = early_stopping, config
        self.history: dict = {"epoch": [], "train_loss": [], "val_loss": [], "learning_rate": [],
                              "epoch_time": []}
        self.step = 0
        self.epoch, self.batches_done = 1, 0              # where the data loader resumes
        self.epoch_loss_sum, self.epoch_tokens, self.epoch_time = 0.0, 0, 0.0   # the epoch so far
        self.event_sets: list | None = None
        self.event_pairs: torch.Tensor | None = None
        self.data_order: dict = {}  # the settings that fix the batch order: a resume under others is inexact
        self.run: RunRecord | None = None   # the master's claim on the output directory (None on other ranks)
        self.total_steps, self.stopped_early = 0, False

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0
            self.epoch_loss_sum, self.epoch_tokens, self.epoch_time = 0.0, 0, 0.0

    def state_dict(self, rng_states: list[dict]) -> dict:
        return {"model_state_dict": self.model.state_dict(), "model_args": self.model.model_args,
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(),
                "scaler_state_dict": self.scaler.state_dict(),
                "early_stopping": self.early_stopping.state_dict(), "rng_state": rng_states,
                "history": self.history, "step": self.step, "epoch": self.epoch,
                "data_position": {"epoch": self.epoch, "batches_done": self.batches_done,
                                  "epoch_loss_sum": self.epoch_loss_sum, "epoch_tokens": self.epoch_tokens,
                                  "epoch_time": self.epoch_time, "order": self.data_order},
                "config": config_to_dict(self.config), "world_size": len(rng_states),
                "event_sets": self.event_sets,  # which event types co-occur in normal training sessions
                "event_pairs": self.event_pairs,  # and which pairs of them share one: [n, 2] IDs
                "split_scheme": SPLIT_SCHEME, "run_id": self.run.run_id if self.run is not None else None}

    def load_state_dict(self, checkpoint: dict) -> list[dict]:
        """Restore everything but the RNGs, whose per-rank states are returned for the caller to apply
        (a checkpoint validated by load_checkpoint(for_resume=True); what torch still refuses is one line)."""
        try:
            self.model.load_state_dict(checkpoint["model_state_dict"])
            self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
            self.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
            self.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"the checkpoint's training state does not fit this run "
                                  f"({str(error).splitlines()[0][:200]})") from None
        self.early_stopping.load_state_dict(checkpoint["early_stopping"])
        self.history, self.step = checkpoint["history"], checkpoint["step"]
        position = checkpoint["data_position"]
        self.epoch, self.batches_done = position["epoch"], position["batches_done"]
        self.epoch_loss_sum, self.epoch_tokens = position["epoch_loss_sum"], position["epoch_tokens"]
        self.epoch_time = position["epoch_time"]
        if self.event_sets is None:
            self.event_sets = checkpoint.get("event_sets")
        if self.event_pairs is None:
            self.event_pairs = checkpoint.get("event_pairs")
        return checkpoint["rng_state"]

    def save(self, path, runtime: "Runtime") -> None:
        """Every rank calls this (each rank's RNG state is gathered); the master writes, atomically."""
        states = all_gather(rng_state(), runtime)
        if runtime.is_master:
            save_checkpoint(self.state_dict(states), path)
            if self.run is not None:
                self.run.wrote(Path(path).name)

    def prune(self, prefix: str, keep: int) -> None:
        """Keep this run's newest `keep` checkpoints named prefix_N.pt (master only: it owns the record)."""
        if self.run is not None:
            self.run.prune(prefix, keep)


# How dataset.split_draws assigns sessions to the validation split and its halves. Checkpoints record it:
# a checkpoint of another scheme cannot tell which sessions it trained on.
SPLIT_SCHEME = "splitmix64-v2"


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG training touches, as tensors and plain types."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
            "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- precision
def amp_settings(config: Config, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, or None for fp32; whether fp16 loss scaling is needed).

    CUDA: bf16 where supported, else fp16 with GradScaler. CPU: bf16 only where the CPU computes it
    natively (AVX512-BF16 or AMX; measured 1.5x faster than fp32 there, benchmarks/README.md), else fp32,
    since emulated bf16 is slower than fp32.
    """
    wanted = config.training.amp_dtype
    if not config.training.mixed_precision:
        return None, False
    if device.type == "cpu":
        native_bf16 = any(getattr(torch.cpu, probe, lambda: False)()
                          for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return (torch.bfloat16 if wanted == "bfloat16" or (wanted == "auto" and native_bf16) else None), False
    if device.type != "cuda":
        return None, False
    if wanted == "bfloat16" or (wanted == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


# ----------------------------------------------------------------------------- distributed
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False
    data_parallel_gpus: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str, use_multi_gpu: bool) -> Runtime:
    """DDP when launched by torchrun (RANK/WORLD_SIZE set), else one process, DataParallel if asked and
    possible."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        return Runtime(device, rank, local_rank, world_size, distributed=True)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device is '{device_name}' but no CUDA GPU is available")
    device = torch.device(device_name)
    several = device.type == "cuda" and use_multi_gpu and device.index is None
    gpus = torch.cuda.device_count() if several else 1
    return Runtime(device, data_parallel_gpus=max(gpus, 1))


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


def all_gather(value, runtime: Runtime) -> list:
    """Every rank's value (picklable plain data), in rank order; [value] in a single process."""
    if not runtime.distributed:
        return [value]
    gathered = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, runtime: Runtime, every_rank: bool = False) -> bool:
    """Whether `flag` holds on any rank (or, with every_rank, on all): one tiny all-reduce under DDP."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([int(flag)], device=runtime.device)
    op = torch.distributed.ReduceOp.MIN if every_rank else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(value, op=op)
    return bool(value.item())


def lockstep(batches, runtime: Runtime):
    """Yield until any rank runs out of batches: a rank that stopped alone would leave the others waiting
    in DDP's gradient all-reduce forever. One tiny all-reduce per step under DDP, nothing otherwise."""
    iterator = iter(batches)
    while True:
        item = next(iterator, None)
        if not any_rank(item is not None, runtime, every_rank=True):
            return
        yield item


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum metrics over ranks (no-op in a single process)."""
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


class Stopped(Exception):
    """A stop signal arrived after the last training step (the checkpoints are all written by then)."""


class StopSignal:
    """SIGTERM or SIGINT (kill of a nohup run, a scheduler's preemption, Ctrl-C). With raise_now (before the
    training loop and after it) the work stops at once, as Stopped; in the loop the flag asks it to stop at
    the next step boundary, where a resumable checkpoint is written; a second signal stops at once.
    Installed before any work, so that no moment is left to the default (die without a word, leaving
    worker processes and temp files behind)."""

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

    def check(self, runtime: "Runtime", step: int, every: int) -> bool:
        """Whether to stop now. Under DDP all ranks must agree, so the flag is all-reduced every `every`
        steps."""
        if runtime.distributed and step % every:
            return False
        return any_rank(self.received is not None, runtime)

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
    """The warm-up of a run: training.warmup_steps when set, else scaled to the run (a tenth of its steps,
    at most AUTO_WARMUP_STEPS), so that a short run still reaches its learning rate."""
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


class LossWindow:
    """The loss since the last flush, kept on the device (.item() only at log time) in float64, so the
    epoch's sum does not depend on when it is flushed: a resumed run's history is bit-identical."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)

    def add(self, loss_sum, tokens) -> None:
        self.loss += loss_sum.double()
        self.tokens += tokens

    def flush_into(self, state: TrainState) -> int:
        """Move the window into the epoch's running sums; returns its token count."""
        tokens = int(self.tokens.item())
        state.epoch_loss_sum += self.loss.item()
        state.epoch_tokens += tokens
        self.loss.zero_(), self.tokens.zero_()
        return tokens


class Throughput:
    """Predicted tokens per second and the share of wall time spent waiting for the next batch, since the
    previous log line: the two numbers that say whether the input pipeline keeps the GPUs busy."""

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


# ----------------------------------------------------------------------------- GPU stats
def visible_gpu_indices(count: int) -> list[int]:
    """NVML numbers every GPU of the machine; report only those CUDA_VISIBLE_DEVICES lets this run use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    if all(part.isdigit() and int(part) < count for part in parts):
        return [int(part) for part in parts]
    return list(range(count))  # UUIDs or MIG names: no mapping to NVML indices, show them all


class GPUMonitor:
    """Per-GPU memory, utilisation, temperature and power via pynvml; a one-time note when unavailable."""

    def __init__(self, logger: logging.Logger, device_indices: list[int] | None = None):
        self.handles = []
        self.indices = []
        if not torch.cuda.is_available():
            logger.info("GPU stats: no CUDA GPU, running on CPU (no GPU field in step lines)")
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            count = pynvml.nvmlDeviceGetCount()
            self.indices = device_indices if device_indices is not None else visible_gpu_indices(count)
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        except Exception as error:  # ImportError, NVMLError (driver missing, no permission, ...)
            self.handles = []
            logger.info(f"GPU stats: pynvml unavailable ({type(error).__name__}: {error}); "
                        f"install nvidia-ml-py for per-GPU memory/utilisation; no GPU field in step lines")

    def _query(self, handle):
        memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        utilisation = self.nvml.nvmlDeviceGetUtilizationRates(handle)
        return memory, utilisation

    def summary(self) -> str | None:
        """'GPU: [0:12345MB|95%] [1:...]' or None without pynvml."""
        if not self.handles:
            return None
        try:
            parts = []
            for index, handle in zip(self.indices, self.handles):
                memory, utilisation = self._query(handle)
                parts.append(f"[{index}:{memory.used // 2**20}MB|{utilisation.gpu}%]")
            return "GPU: " + " ".join(parts)
        except Exception:
            return None

    def details(self) -> list[str]:
        lines = []
        for index, handle in zip(self.indices, self.handles):
            try:
                memory, utilisation = self._query(handle)
                temperature = self.nvml.nvmlDeviceGetTemperature(handle, self.nvml.NVML_TEMPERATURE_GPU)
                power = self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000
                lines.append(f"GPU {index}: memory {memory.used // 2**20}/{memory.total // 2**20}MB | "
                             f"util {utilisation.gpu}% | temp {temperature}C | power {power:.0f}W")
            except Exception as error:
                lines.append(f"GPU {index}: stats unavailable ({error})")
        return lines
