"""One config object: dataclass defaults < YAML < CLI flags, strict keys and types."""
import pytest
import torch
import yaml

import train
import utils
from config import Config, TrainingConfig, config_from_dict, config_to_dict, load_config, save_config
from runtime import GPUMonitor, amp_settings, visible_gpu_indices
from utils import ConfigError


def test_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"training": {"epochs": 7, "learning_rate": 0.01},
                                    "data": {"preprocessed_dir": "from_yaml"}}))
    assert load_config().training.epochs == TrainingConfig().epochs
    config = train.resolve_config(train.parse_args(["--config", str(path), "--lr", "0.5", "--seed", "9"]))
    assert config.training.epochs == 7                  # YAML over the default
    assert config.training.learning_rate == 0.5         # flag over YAML
    assert config.data.preprocessed_dir == "from_yaml"  # YAML kept where no flag is given
    assert config.training.seed == 9
    assert config.training.batch_size == TrainingConfig().batch_size   # default kept
    assert train.resolve_config(train.parse_args(["--config", str(path), "--data-dir", "d", "--epochs", "2",
                                                  "--batch-size", "8", "--output-dir", "o",
                                                  "--device", "cpu"])
                                ).training.output_dir == "o"


def test_shipped_config_yaml_matches_the_dataclass_keys():
    """config.yaml carries every key, so users see the whole surface in one place."""
    import dataclasses

    import preprocess
    shipped = yaml.safe_load(open(train.Path(__file__).parent.parent / "config.yaml"))
    expected = {s: set(v) for s, v in config_to_dict(Config()).items()}
    expected["preprocess"] = {f.name for f in dataclasses.fields(preprocess.PreprocessConfig)}
    assert {s: set(v) for s, v in shipped.items()} == expected
    # same defaults: the file shows the defaults of the one config, it does not restate others
    assert preprocess.PreprocessConfig(**shipped["preprocess"]) == preprocess.PreprocessConfig()
    assert load_config(str(train.Path(__file__).parent.parent / "config.yaml")) == Config()


def test_the_warm_up_is_scaled_to_short_runs_unless_set():
    assert [utils.warmup_steps(None, total) for total in (22, 300, 760, 100_000)] == [2, 30, 50, 50]
    assert utils.warmup_steps(0, 22) == 0 and utils.warmup_steps(80, 22) == 80


@pytest.mark.parametrize("content,message", [
    ({"training": {"epochz": 3}}, "unknown config key 'training.epochz'"),
    ({"evaluation": {"probability_margin": 0.001}}, "'evaluation.probability_margin' is retired: the "
                                                    "probability bound is now set by evaluation.target_fpr"),
    ({"trainin": {"epochs": 3}}, "unknown config section 'trainin'"),
    ({"training": {"epochs": "3"}}, "'training.epochs' must be int"),
    ({"training": {"epochs": 2.5}}, "'training.epochs' must be int"),
    ({"training": {"mixed_precision": "yes"}}, "'training.mixed_precision' must be bool"),
    ({"training": {"epochs": 0}}, "'training.epochs' must be > 0"),
    ({"training": {"optimizer": "sgd"}}, "'training.optimizer' must be one of adam, adamw"),
    ({"data": {"validation_split": 1.5}}, "'data.validation_split' must be in [0, 1)"),
    ({"data": {"max_seq_length": 16, "window_context": 16}}, "'data.window_context' must be in"),
    ({"model": {"dropout": 1.0}}, "'model.dropout' must be in [0, 1)"),
    ({"data": {"abnormal_dir": 5}}, "'data.abnormal_dir' must be null or str"),
    ({"training": {"device": "gpu"}}, "'training.device' must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"training": {"learning_rate": "fast"}}, "'training.learning_rate' must be float, got 'fast'"),
])
def test_bad_config_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value)


def test_ints_are_accepted_for_floats_and_null_for_optionals(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1\ndata:\n  abnormal_dir: null\n")
    config = load_config(str(path))
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)
    assert config.data.abnormal_dir is None


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, {"training.epochs": 3, "model.hidden_size": 12})
    save_config(config, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == config
    assert config_from_dict(config_to_dict(config)) == config


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factor = utils.lr_multiplier(warmup_steps=10, total_steps=110, schedule="cosine", min_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    linear = utils.lr_multiplier(0, 100, "linear", 0.0)
    assert linear(50) == pytest.approx(0.5)
    assert utils.lr_multiplier(0, 100, "constant", 0.0)(99) == 1.0


def test_early_stopping_counts_epochs_without_improvement():
    stopper = utils.EarlyStopping(patience=2, min_delta=0.1)
    assert stopper.step(1.0) and not stopper.should_stop
    assert not stopper.step(0.95) and not stopper.should_stop   # within min_delta: no improvement
    assert not stopper.step(0.99) and stopper.should_stop
    restored = utils.EarlyStopping(2, 0.1)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best_loss == 1.0 and restored.should_stop


def test_format_duration():
    assert [utils.format_duration(s) for s in (10.5, 630, 9000)] == ["10.5s", "10.5m", "2h 30m"]


def test_gpu_monitor_without_gpu_says_so_once_and_gives_no_field(caplog):
    import logging
    logger = logging.getLogger("test-gpu")
    with caplog.at_level(logging.INFO, logger="test-gpu"):
        monitor = GPUMonitor(logger)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert monitor.summary() is None and monitor.details() == []
    assert len([r for r in caplog.records if "GPU stats" in r.message]) == 1


def test_gpu_monitor_when_pynvml_fails(monkeypatch, caplog):
    import logging
    import sys
    import types
    broken = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")
    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    logger = logging.getLogger("test-gpu2")
    with caplog.at_level(logging.INFO, logger="test-gpu2"):
        monitor = GPUMonitor(logger)
    assert monitor.summary() is None
    assert any("pynvml unavailable" in r.message and "NVML Shared Library" in r.message
               for r in caplog.records)


def test_gpu_monitor_formats_pynvml_readings(monkeypatch):
    import logging
    import sys
    import types
    fake = types.ModuleType("pynvml")
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) * 1000 * 2**20,
                                                                   total=80000 * 2**20)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=90 + h)
    fake.nvmlDeviceGetTemperature = lambda h, kind: 60
    fake.nvmlDeviceGetPowerUsage = lambda h: 250000
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monitor = GPUMonitor(logging.getLogger("x"))
    assert monitor.summary() == "GPU: [0:1000MB|90%] [1:2000MB|91%]"
    assert monitor.details()[1] == "GPU 1: memory 2000/80000MB | util 91% | temp 60C | power 250W"


def test_precision_choice_per_device(monkeypatch):
    config = load_config()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert amp_settings(config, cuda) == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert amp_settings(config, cuda) == (torch.float16, True)        # fp16 needs the GradScaler
    config.training.amp_dtype = "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert amp_settings(config, cuda) == (torch.float16, True)
    config.training.amp_dtype = "auto"
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert amp_settings(config, cpu) == ((torch.bfloat16 if native else None), False)
    config.training.mixed_precision = False
    assert (amp_settings(config, cuda) == (None, False)
            and amp_settings(config, cpu) == (None, False))


def test_gpu_stats_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpu_indices(4) == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3c,GPU-11aa")   # UUIDs: cannot map, show all
    assert visible_gpu_indices(2) == [0, 1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu_indices(3) == [0, 1, 2]


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; a float setting takes it as the number it means, like --lr 1e-3."""
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\n  weight_decay: 5E-2\n")
    config = load_config(str(path))
    assert config.training.learning_rate == 0.001 and config.training.weight_decay == 0.05


def test_the_original_design_layout_loads_as_the_canonical_one(tmp_path):
    original = tmp_path / "original.yaml"
    original.write_text(yaml.safe_dump({
        "training": {"num_epochs": 2, "batch_size": 32, "learning_rate": "1e-3",
                     "early_stopping": {"enabled": True, "patience": 5, "min_delta": 0.001}},
        "data": {"preprocessed_dir": "d", "lazy_loading": {"enabled": True, "buffer_size": 500,
                                                           "shuffle_buffer": False}}}))
    config = load_config(str(original))
    assert (config.training.epochs, config.training.batch_size,
            config.training.learning_rate) == (2, 32, 0.001)
    assert (config.early_stopping.patience, config.early_stopping.min_delta) == (5, 0.001)
    assert (config.lazy_loading.buffer_size, config.lazy_loading.shuffle_buffer) == (500, False)
    save_config(config, tmp_path / "saved.yaml")   # the saved resolved config is the canonical layout
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert "num_epochs" not in saved["training"] and saved["training"]["epochs"] == 2
    assert "lazy_loading" not in saved["data"] and saved["lazy_loading"]["buffer_size"] == 500
    assert load_config(str(tmp_path / "saved.yaml")) == config


def test_a_setting_given_in_both_layouts_with_two_values_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"training": {"epochs": 3, "num_epochs": 4}}))
    message = r"'training.epochs' is given twice, as 3 and as 4 under 'training.num_epochs'"
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def _laughs(levels: int) -> str:
    """The "billion laughs" shape: each level an alias of the one before, nine times."""
    lines = ["training:", '  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level, name in enumerate("bcdefghijk"[:levels]):
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{'abcdefghijk'[level]}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,message", [
    (_laughs(9), "more than 64 aliases"),
    ("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than 16 levels deep"),
    ("model:\n  dropout: &x [1, 2, 3, 4, 5, 6, 7, 8, 9]\ntraining:\n  epochs: [*x, *x, *x, *x, *x, *x, *x]\n",
     r"'model.dropout' must be float, got \[1, 2, 3, 4, 5, 6, \.\.\.\] \(list\)"),
    ("training:\n  device: " + "x" * 100_000 + "\n", "'training.device' must be auto, cpu, cuda or cuda:N"),
    ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "invalid YAML|not UTF-8"),
    # (beyond Python's limit for int() of a text, where a program keeps it: sys.set_int_max_str_digits)
    ("training:\n  epochs: " + "9" * 100_000 + "\n",
     "invalid YAML: Exceeds the limit|'training.epochs' is out of range"),
    ("training:\n  epochs: " + "9" * 4000 + "\n", r"'training.epochs' is out of range \(at most 2\*\*53"),
    ("detect:\n  block_lines: 1e30\n", r"'detect.block_lines' is out of range"),
    ("training:\n  learning_rate: .nan\n", "'training.learning_rate' must be a finite number, got nan"),
    ("training:\n  learning_rate: .inf\n", "'training.learning_rate' must be a finite number, got inf"),
    ("training:\n  learning_rate: 1.0e+400\n", "'training.learning_rate' must be a finite number, got inf"),
    ("evaluation:\n  target_fpr: .NaN\n", "'evaluation.target_fpr' must be a finite number"),
    ("training:\n  seed: -1\n", r"'training.seed' must be in \[0, 2\*\*32\), got -1"),
    ("training:\n  seed: 4294967296\n", r"'training.seed' must be in \[0, 2\*\*32\)"),
    ("model:\n  vocab_size: 99999999999999\n", "'model.vocab_size' must be at most 16,777,216"),
], ids=lambda value: value[:40] if isinstance(value, str) else None)
def test_configs_that_explode_are_one_short_error(tmp_path, text, message):
    """Aliases of aliases, deep nesting and huge values end in one short ConfigError, quickly, never in
    memory growth, a RecursionError or a message the size of the expanded value."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="latin-1" if "\xff" in text else "utf-8")
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(str(path))
    assert len(str(raised.value)) < 400


def test_numbers_yaml_reads_as_strings_are_numbers_for_int_keys_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 1e2\n  learning_rate: 1e-3\n")   # YAML 1.1: both are strings
    config = load_config(str(path))
    assert config.training.epochs == 100 and isinstance(config.training.epochs, int)
    assert config.training.learning_rate == 0.001
    path.write_text("training:\n  epochs: 1.5e0\n")
    with pytest.raises(ConfigError, match="'training.epochs' must be int, got '1.5e0'"):
        load_config(str(path))


def test_config_yaml_lists_every_key_at_its_default():
    """The defaults live in config.py's dataclasses; config.yaml documents each key with that same value, so
    the two never drift apart (a default changed in one place only fails here)."""
    from conftest import REPO
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    defaults = config_to_dict(Config())
    assert {section: set(keys) for section, keys in shipped.items()} == \
        {section: set(keys) for section, keys in defaults.items()}
    assert config_to_dict(load_config(str(REPO / "config.yaml"))) == defaults
