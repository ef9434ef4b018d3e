"""Checkpoints: the one owner of what a checkpoint holds. It writes them (atomically, tensors and plain types
only), loads them (weights_only=True: nothing is ever unpickled) and validates every key once, upgrades older
forms, and builds the model from one with its calibration and records.

Examples:

    from checkpoint import load_model
    model = load_model("outputs/checkpoints/best_model.pt")   # DeepLog, eval mode, with its calibration

    from checkpoint import load_checkpoint
    checkpoint = load_checkpoint("outputs/checkpoints/best_model.pt")    # the validated dict
    print(checkpoint["model_args"], checkpoint["config"]["data"]["max_seq_length"])
"""
from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

import calibration
import values
from config import Config, check_values, config_from_dict, config_to_dict
from dataset import SPLIT_SCHEME
from model import DeepLog
from rules import MAX_COUNT_ENTRIES, MAX_COUNT_VECTORS, CoOccurrence, CountVectors, pairs_of_sets
from runtime import Runtime, all_gather, rng_state
from utils import ConfigError, RunRecord, UserError, atomic_write, open_regular, short


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint."""


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
        _check_parameter_model(checkpoint)
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
        count_vectors_from_state(checkpoint["count_vectors"])
    if checkpoint.get("calibration") is not None:
        try:
            checkpoint["calibration"] = calibration.checked(checkpoint["calibration"], "its calibration")
        except calibration.CalibrationError as error:
            raise ValueError(str(error)) from None
    _check_lineage(checkpoint)


def _check_parameter_model(checkpoint: dict) -> None:
    """The parameter-value model (values.py), where the run trained one: its arguments, every tensor's
    shape, per-type tables of the checkpoint's vocabulary, a threshold."""
    state = checkpoint.get("parameter_model")
    if state is None:
        return
    _expect(isinstance(state, dict) and isinstance(state.get("args"), dict)
            and set(state["args"]) == {"vocab_size", "embedding_dim", "hidden_size"}
            and all(_is_int(v) and 1 <= v <= 2 ** 24 for v in state["args"].values()),
            "parameter_model must hold args (vocab_size, embedding_dim, hidden_size: positive integers)")
    vocab_size = state["args"]["vocab_size"]
    _expect(vocab_size == checkpoint["model_args"]["vocab_size"], "parameter_model's vocab_size is not the "
            "model's")
    expected = {k: tuple(v.shape) for k, v in values.ParameterNet(**state["args"]).state_dict().items()}
    weights = state.get("state_dict")
    _expect(isinstance(weights, dict) and set(weights) == set(expected) and all(
        isinstance(weights[k], torch.Tensor) and tuple(weights[k].shape) == shape
        for k, shape in expected.items()), "parameter_model's state_dict does not fit its args")
    for key in ("median", "scale", "error_scale", "low", "high"):
        table = state.get(key)
        _expect(isinstance(table, torch.Tensor) and tuple(table.shape) == (vocab_size, values.SLOTS),
                f"parameter_model's {key} must be a tensor of {vocab_size} x {values.SLOTS}")
    for key in ("threshold", "range_threshold"):
        threshold = state.get(key)
        _expect(threshold is None or isinstance(threshold, float) and not math.isnan(threshold),
                f"parameter_model's {key} must be a number or null")
    _expect(_is_int(state.get("calibration_sessions")), "parameter_model's calibration_sessions must be an "
            "integer")


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


def model_from_checkpoint(checkpoint: dict) -> DeepLog:
    """The DeepLog of a loaded checkpoint (load_checkpoint), in eval mode on the CPU, with its calibration and
    record of event types seen together in training, scoring in the windows it was trained with."""
    model = DeepLog(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model_state_dict"])   # the shapes were checked by load_checkpoint
    data = checkpoint["config"].get("data", {})
    model.set_windows(data.get("max_seq_length", model.max_seq_length),
                      data.get("window_context", model.window_context))
    model.calibration = checkpoint.get("calibration")
    model.co_occurrence = co_occurrence_of(checkpoint)
    # the parameter-value model, where the run trained one (values.py); None otherwise
    state = checkpoint.get("parameter_model")
    model.parameter_model = values.model_from_state(state) if state is not None else None
    return model.eval()


def load_trained(path, device="cpu") -> tuple[DeepLog, dict]:
    """The checkpoint (validated by its one loader) and its model on `device`, in eval mode."""
    # map to the CPU first: a checkpoint loads without the GPU it was saved on
    checkpoint = load_checkpoint(path, map_location="cpu")
    return model_from_checkpoint(checkpoint).to(device), checkpoint


def load_model(path, map_location="cpu") -> DeepLog:
    """The model of a checkpoint written by train.py, validated by its one loader (weights_only, no pickled
    code, every key checked), with its calibration and record of event types seen together in training,
    scoring in the windows it was trained with; on `map_location`, in eval mode."""
    return load_trained(path, map_location)[0]


# ----------------------------------------------------------------------------- the records of training
def co_occurrence_of(checkpoint: dict) -> CoOccurrence:
    """The checkpoint's "event_sets" (lists of IDs), "event_pairs" (an [n, 2] tensor) and "count_vectors".
    Checkpoints written before pairs were recorded get the pairs of their sets, which is what training would
    have recorded."""
    vocab_size = checkpoint["model_args"]["vocab_size"]
    sets, pairs = checkpoint.get("event_sets"), checkpoint.get("event_pairs")
    if pairs is not None:
        pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2).numpy()
        pairs = pairs[:, 0] * vocab_size + pairs[:, 1]
    elif sets is not None and "event_pairs" not in checkpoint:
        pairs = pairs_of_sets(sets, vocab_size)
    counts = checkpoint.get("count_vectors")
    return CoOccurrence(vocab_size, sets, pairs, None if counts is None else count_vectors_from_state(counts))


def pair_table(co_occurrence: CoOccurrence) -> torch.Tensor | None:
    """The pairs as an [n, 2] tensor of (first, second) IDs, as checkpoints store them."""
    if co_occurrence.pairs is None:
        return None
    return torch.from_numpy(np.stack(np.divmod(co_occurrence.pairs, co_occurrence.vocab_size), axis=1))


def count_vectors_from_state(state: dict) -> CountVectors:
    """From the checkpoint's "count_vectors": {"entries": [E, 3] integer tensor of (vector, event ID, count),
    "weights": [D] integer tensor}, and optionally "held_out_entries" and "held_out_weights" of the same forms
    (sessions the sweep kept out of the reference); ValueError saying what is wrong with any other content."""
    if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor)
                                              for k in ("entries", "weights")):
        raise ValueError("count_vectors must hold the tensors 'entries' and 'weights'")
    held_out = None
    if "held_out_entries" in state or "held_out_weights" in state:
        held_out = count_vectors_from_state({"entries": state.get("held_out_entries"),
                                             "weights": state.get("held_out_weights")})
    entries, weights = state["entries"], state["weights"]
    if entries.is_floating_point() or weights.is_floating_point() or entries.dim() != 2 \
            or entries.size(1) != 3 or weights.dim() != 1:
        raise ValueError("count_vectors: entries must be an [n, 3] and weights a [d] integer tensor")
    entries, weights = entries.long().numpy(), weights.long().numpy()
    if len(weights) > MAX_COUNT_VECTORS or len(entries) > MAX_COUNT_ENTRIES or (weights < 1).any() or \
            (entries < 0).any() or (entries[:, 2] < 1).any() or \
            (len(entries) and entries[:, 0].max() >= len(weights)):
        raise ValueError("count_vectors: counts, weights or vector indexes out of range")
    return CountVectors(entries, weights, held_out)


def count_vectors_state(counts: CountVectors | None) -> dict | None:
    """The count vectors as the checkpoint stores them (None: not recorded)."""
    if counts is None:
        return None
    state = {"entries": torch.from_numpy(counts.entries.copy()),
             "weights": torch.from_numpy(counts.weights.copy())}
    if counts.held_out is not None:
        state.update(held_out_entries=torch.from_numpy(counts.held_out.entries.copy()),
                     held_out_weights=torch.from_numpy(counts.held_out.weights.copy()))
    return state


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

