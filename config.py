"""The one config object: dataclass defaults < config.yaml < CLI flags, every value type- and range-checked,
an unknown key an error naming it; the resolved config is saved with every run and checkpoint.

Examples:

    from config import load_config
    config = load_config("config.yaml", {"training.epochs": 3})   # defaults < YAML < overrides
    print(config.training.learning_rate)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from rules import RULES
from utils import ConfigError, atomic_write_text, open_regular, short, short_text


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
    overlap: int = 0              # records on each side sharing lines with a record (overlapping windows)
    skip_bad_records: bool = False
    assume_clean: bool = False    # true: every normal-labelled training session is normal (no sweep)
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


MAX_VALUES = 4   # numeric parameters kept per event: preprocess.py writes them, values.py models them


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
    time_field: typing.Optional[str] = None     # a log-format field holding the time (time windows; with
                                                # --session-key, each event's time kept in "times")
    time_format: typing.Optional[str] = None    # strptime format of time_field; null: epoch seconds
    labels: typing.Optional[str] = None         # CSV of session id, label (Normal/Anomaly or 0/1)
    label_field: typing.Optional[str] = None    # a log-format field that labels each line
    normal_value: str = "-"                     # ... and its value on normal lines
    session_idle: typing.Optional[int] = None   # a session not named for this many lines is complete: written
    max_open_sessions: int = 1_000_000          # beyond this, the least recently active session is written
    values: bool = True                         # keep each event's numeric parameters ("values")


@dataclass
class DetectConfig:
    """detect.py --follow (live detection): when a session is complete, how often the place is saved."""
    idle_lines: typing.Optional[int] = None     # a session without an event for this many lines is closed;
                                                # null: the parser state's session_idle, else derived
                                                # from the training data's gaps, else 100,000
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
class ParameterConfig:
    """DeepLog's parameter-value model (values.py): trained after the key model when the data has times or
    values (preprocess.py's "times"/"values")."""
    enabled: bool = True            # false: keys only, even where the data has times or values
    epochs: int = 20
    learning_rate: float = 3.0e-3
    batch_size: int = 64
    embedding_dim: int = 32
    hidden_size: int = 64
    patience: int = 3               # epochs without a better validation loss before it stops
    max_sessions: int = 100_000     # sessions of each split side it reads (the first ones): it reads the
                                    # data files each epoch, so this bounds its time on 100+ GB


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
    parameter: ParameterConfig = field(default_factory=ParameterConfig)

CHOICES = {"training.optimizer": ("adam", "adamw"), "training.lr_schedule": ("cosine", "linear", "constant"),
           "training.amp_dtype": ("auto", "bfloat16", "float16")}
# and evaluation.decision_rule: one of calibration.RULES, the rules' owner (checked in check_values)
POSITIVE = ("model.vocab_size", "model.embedding_dim", "model.hidden_size", "model.num_layers",
            "training.batch_size", "training.epochs", "training.learning_rate", "training.log_every_steps",
            "training.gpu_stats_every_steps", "training.keep_last_checkpoints", "lazy_loading.buffer_size",
            "data.max_seq_length", "evaluation.top_k", "evaluation.top_g", "evaluation.batch_size",
            "parameter.epochs", "parameter.learning_rate", "parameter.batch_size", "parameter.embedding_dim",
            "parameter.hidden_size", "parameter.patience", "parameter.max_sessions")


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



def resolve_config(path: str | None = None, layers=(), stored: dict | None = None,
                   sections: tuple[str, ...] = ()) -> Config:
    """The one way every script resolves its config: the dataclass defaults, or a checkpoint's stored config
    (`stored`: the trained model's settings), < the YAML file `path` (every section checked; over a stored
    config only its `sections` are taken) < each (source, {"section.key": value}) layer in turn, where None
    from the command line or a flag means "not given" (from a saved state it is a value); then every value
    checked."""
    config = config_from_dict(stored) if stored is not None else Config()
    if path:
        from_file = _read_config_file(path)
        for section in sections if stored is not None else [f.name for f in dataclasses.fields(Config)]:
            setattr(config, section, getattr(from_file, section))
    for source, values in layers:
        for dotted, value in values.items():
            if value is not None or not (source == "command line" or source.startswith("--")):
                set_value(config, dotted, value, source)
    check_values(config)
    return config


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """Dataclass defaults < YAML file < overrides ({"section.key": value}); every value type-checked."""
    return resolve_config(path, [("command line", overrides or {})])


def _read_config_file(path: str) -> Config:
    """The defaults with the YAML file's values over them, every value checked."""
    config = Config()
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
              ("data.overlap", 0 <= config.data.overlap <= 10_000, "in [0, 10000]"),
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


def settings_config(base_config: str | None, layers: list[tuple[str, dict]]) -> Config:
    """resolve_config with layers of `preprocess:` keys: defaults < the YAML file `base_config` < each
    (source, {preprocess key: value}) layer in turn."""
    return resolve_config(base_config, [(source, {f"preprocess.{k}": value for k, value in values.items()})
                                        for source, values in layers])
