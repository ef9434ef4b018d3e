"""Every saved file validated where it is loaded (#15): damaged calibrations (calibration.json, or stored in a
checkpoint), damaged checkpoint keys and training states are one line "error: ..." naming the file and what is
wrong, exit code 2, no traceback, nothing written or overwritten; calibrations round-trip, and older forms
upgrade to the same verdicts.

One tiny model is trained once for the module; the damaged files are copies of what it wrote. Most cases run
the scripts' main() in this process (a subprocess costs ~2 s of imports each); a few run them as
subprocesses, end to end."""
from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, write_config

import calibration as C
import evaluate
import rules
import train
import utils
from checkpoint import CheckpointError, load_checkpoint, load_model
from config import load_config
from rules import verdicts

REPORTS = ("evaluation_results*", "evaluation_report*", "score_distribution*", "calibration*.json", "*.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample_sessions):
    """train.py, one epoch, evaluation (so a calibration) after training; other normal sessions to evaluate.
    Trained in this process (half the time of a subprocess), without pictures."""
    root = tmp_path_factory.mktemp("saved")
    normal, _ = sample_sessions
    data, other = root / "data", root / "other"
    data.mkdir(), other.mkdir()
    (data / "s.jsonl").write_text("".join(json.dumps({"event_ids": s}) + "\n" for s in normal[:120]))
    (other / "s.jsonl").write_text("".join(json.dumps({"event_ids": s}) + "\n" for s in normal[200:230]))
    config = write_config(root / "c.yaml", {"training": {"evaluate_after_training": True, "epochs": 1},
                                            "data": {"validation_split": 0.3}})
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "pyplot_or_note", lambda picture, logger: None)
        code, stderr = _main(train, ["--config", config, "--data-dir", data, "--output-dir", out])
    assert code in (0, None), stderr
    best, epoch = out / "checkpoints" / "best_model.pt", out / "checkpoints" / "epoch_1.pt"
    return {"root": root, "config": config, "out": out, "data": data, "other": other, "best": best,
            "epoch": epoch, "best_state": torch.load(best, weights_only=True),
            "epoch_state": torch.load(epoch, weights_only=True)}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _main(module, argv, capsys=None) -> tuple[int, str]:
    """module.main(argv) in this process: (exit code, stderr; captured by capsys, or here). Anything but
    SystemExit (a traceback, in a subprocess) fails the test. What the script leaves for the end of its
    process (train.py: the release of the output folder's lock) runs at its end; signal handlers are put
    back."""
    out, err, at_exit = io.StringIO(), io.StringIO(), []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with contextlib.ExitStack() as stack:
        if capsys is None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(atexit, "register", at_exit.append)
        try:
            code = module.main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
        finally:
            logger = logging.getLogger("deeplog")
            for handler in list(logger.handlers):
                handler.close()
                logger.removeHandler(handler)
            for release in at_exit:
                release()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return code, capsys.readouterr().err if capsys is not None else out.getvalue() + err.getvalue()


def _assert_one_error_line(code, stderr: str, *names: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in names:
        assert name.lower() in lines[0].lower(), (name, lines[0])


def _reports(directory: Path) -> list[Path]:
    return [p for pattern in REPORTS for p in directory.glob(pattern)] if directory.exists() else []


# ----------------------------------------------------------------------------- damaged calibrations
def _without(key):
    def damage(c):
        del c[key]
        return c
    return damage


def _set(key, value, inner=None):
    def damage(c):
        if inner is None:
            c[key] = value
        else:
            c[key][inner] = value
        return c
    return damage


def _with_count_vector_and_no_distance(c):
    c["combined_rules"] = [*dict.fromkeys([*c["combined_rules"], "count_vector"])]
    c["count_vector_distance"] = None
    return c


def _old(drop=(), **changes):
    """An older form (no version, so no expected rates yet) whose damage is met while it is upgraded."""
    dropped = ("version", "expected_fpr", *drop)
    return lambda c: {**{k: v for k, v in c.items() if k not in dropped}, **changes}


RULES = "flagged_on_calibration"
# name: (damage of the loaded dict, or what replaces it; what the error line must name)
DAMAGES = {
    "a number": (lambda c: 5, "not a calibration"),
    "a list": (lambda c: [c], "not a calibration"),
    "a string": (lambda c: "calibration", "not a calibration"),
    "missing top_g": (_without("top_g"), "top_g"),
    "missing combined_rules (current version)": (_without("combined_rules"), "combined_rules"),
    "NaN bound": (_set("log_probability_bound", math.nan), "log_probability_bound"),
    "positive bound": (_set("log_probability_bound", 0.5), "log_probability_bound"),
    "positive end bound": (_set("log_end_probability_bound", 1.0), "log_end_probability_bound"),
    "string for a number": (_set("log_probability_bound", "-3.7"), "log_probability_bound"),
    "string for top_k": (_set("top_k", "10"), "top_k"),
    "bool for top_k": (_set("top_k", True), "top_k"),
    "top_k 0": (_set("top_k", 0), "top_k"),
    "top_g -1": (_set("top_g", -1), "top_g"),
    "unknown default_rule": (_set("default_rule", "majority"), "default_rule"),
    "thresholds without p95": (lambda c: c["score_thresholds"].pop("p95") and c, "score_thresholds"),
    "thresholds decreasing": (_set("score_thresholds", {"p90": 0.9, "p95": 0.5, "p99": 0.7}),
                              "score_thresholds"),
    "threshold NaN": (_set("score_thresholds", math.nan, "p99"), "score_thresholds"),
    "flagged 2.0": (_set(RULES, 2.0, "combined"), RULES),
    "flagged a list": (_set(RULES, [0.1]), RULES),
    "flagged by an unknown rule": (_set(RULES, 0.1, "majority"), RULES),
    "combined_rules unknown rule": (_set("combined_rules", ["probability", "majority"]), "combined_rules"),
    "combined_rules empty": (_set("combined_rules", []), "combined_rules"),
    "combined_rules repeated": (_set("combined_rules", ["probability", "probability"]), "combined_rules"),
    "combined_rules nested list": (_set("combined_rules", [["probability"]]), "combined_rules"),
    "combined_rules a string": (_set("combined_rules", "probability"), "combined_rules"),
    "count_vector without distance": (_with_count_vector_and_no_distance, "count_vector_distance"),
    "negative distance": (_set("count_vector_distance", -1.0), "count_vector_distance"),
    "unknown key": (_set("majority_vote", True), "majority_vote"),
    "version 99": (_set("version", 99), "version"),
    "version a string": (_set("version", "3"), "version"),
    "sessions 0": (_set("sessions", 0), "sessions"),
    "target_fpr 0.7": (_set("target_fpr", 0.7), "target_fpr"),
    "expected_fpr without target": (_set("target_fpr", None), "target_fpr"),
    "novelty keys": (_set("novelty_on_training", {"event_type": 0}), "novelty_on_training"),
    "novelty negative": (_set("novelty_on_training", -1, "event_set"), "novelty_on_training"),
    "bound beyond a float": (_set("log_probability_bound", -10 ** 400), "log_probability_bound"),
    "top_g beyond 64 bits": (_set("top_g", 10 ** 40), "top_g"),
    "novelty beyond 64 bits": (_set("novelty_on_training", 2 ** 70, "event_set"), "novelty_on_training"),
    "keys that are not strings": (lambda c: {**c, 1: 0, "extra": 0}, "unknown key"),
    "old form, infinite training_sessions": (_old(training_sessions=math.inf), "training_sessions"),
    "old form, zero training_sessions": (_old(training_sessions=0), "training_sessions"),
    "old form, flagged a list": (_old(["novelty_on_training"], novelty_on_training=None, **{RULES: [0.1]}),
                                 RULES),
    "old form, novelty a list": (_old(novelty_on_training=[0, 1, 0]), "novelty_on_training"),
}


def _bound_of_5000_digits(text: bytes) -> bytes:
    return re.sub(rb'"log_probability_bound": [^,]+', b'"log_probability_bound": -' + b"9" * 5000, text)


# damage only a file can have: its text (json.dumps writes NaN and Infinity, as json.loads reads them)
TEXT_DAMAGES = {
    "invalid JSON": (lambda text: text[:-20], "invalid JSON"),
    "empty file": (lambda text: b"", "invalid JSON"),
    "invalid UTF-8": (lambda text: text.replace(b'"source": "', b'"source": "\xff\xfe', 1), "UTF-8"),
    "deeply nested": (lambda text: b"[" * 100_000, "invalid JSON"),
    "NaN written as JSON allows": (
        lambda text: json.dumps({**json.loads(text), "count_vector_distance": math.nan}).encode(),
        "count_vector_distance"),
    "a bound of 5000 digits": (_bound_of_5000_digits, "log_probability_bound"),
}


def _stored_calibration(run) -> dict:
    return json.loads((run["out"] / "calibration.json").read_text())


def _evaluate_args(run, checkpoint, out, *more):
    return ["--checkpoint", checkpoint, *more, "--data-dir", run["other"], "--output-dir", out]


def test_stored_calibration_and_checkpoint_are_accepted(run, tmp_path, capsys, monkeypatch):
    """The control: the undamaged files evaluate (exit 0, reports written): the damage is what fails."""
    monkeypatch.setattr(evaluate, "pyplot_or_note", lambda picture, logger: None)
    out = tmp_path / "eval"
    code, stderr = _main(evaluate, _evaluate_args(run, run["best"], out, "--calibration",
                                                   run["out"] / "calibration.json"), capsys)
    assert code == 0, stderr
    assert list(out.glob("evaluation_results*.json")) and not list(out.glob("calibration.json"))


@pytest.mark.parametrize("name", [*DAMAGES, *TEXT_DAMAGES])
def test_damaged_calibration_json_is_one_error_line(run, tmp_path, capsys, name):
    path = tmp_path / "calibration.json"
    if name in TEXT_DAMAGES:
        damage, words = TEXT_DAMAGES[name]
        content = damage((run["out"] / "calibration.json").read_bytes())
        assert content != (run["out"] / "calibration.json").read_bytes()
        path.write_bytes(content)
    else:
        damage, words = DAMAGES[name]
        path.write_text(json.dumps(damage(_stored_calibration(run))))
    before = _digest(run["best"])
    out = tmp_path / "eval"
    code, stderr = _main(evaluate, _evaluate_args(run, run["best"], out, "--calibration", path), capsys)
    _assert_one_error_line(code, stderr, str(path), words)
    assert _reports(out) == []
    assert _digest(run["best"]) == before


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_calibration_in_checkpoint_is_one_error_line(run, tmp_path, capsys, name):
    checkpoint = copy.deepcopy(run["best_state"])
    damage, words = DAMAGES[name]
    checkpoint["calibration"] = damage(copy.deepcopy(checkpoint["calibration"]))
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    before = _digest(path)
    out = tmp_path / "eval"
    code, stderr = _main(evaluate, _evaluate_args(run, path, out), capsys)
    _assert_one_error_line(code, stderr, str(path), "calibration", words)
    assert _reports(out) == []
    assert _digest(path) == before
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert isinstance(error.value, utils.UserError)
    assert str(path) in str(error.value) and words.lower() in str(error.value).lower()
    assert stderr.strip() == f"error: {error.value}"


def test_deeply_nested_calibration_json_as_a_subprocess(run, tmp_path):
    """End to end: a fresh interpreter's recursion limit, stderr and exit code as a user sees them."""
    path = tmp_path / "calibration.json"
    path.write_bytes(b"[" * 100_000)
    out = tmp_path / "eval"
    result = run_script("evaluate.py", *_evaluate_args(run, run["best"], out, "--calibration", path))
    _assert_one_error_line(result.returncode, result.stderr, str(path), "JSON")
    assert _reports(out) == []


# ----------------------------------------------------------------------------- damaged checkpoint keys
def _key(key, value):
    """The checkpoint with `key` replaced: by value, or by value(the current one) where value is callable."""
    return lambda c: {**c, key: value(c[key]) if callable(value) else value}


def _inner(key, name, value):
    """The checkpoint with c[key][name] replaced (as _key does); value None: removed."""
    def damage(c):
        part = dict(c[key])
        if value is None:
            del part[name]
        else:
            part[name] = value(part[name]) if callable(value) else value
        return {**c, key: part}
    return damage


def _drop(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


def _wider(tensor):
    return torch.zeros(tensor.shape[0], tensor.shape[1] + 1)


WEIGHTS, ARGS, COUNTS = "model_state_dict", "model_args", "count_vectors"
CHECKPOINT_DAMAGES = {
    "event_pairs [n, 3]": (_key("event_pairs", torch.zeros(4, 3, dtype=torch.long)), "event_pairs"),
    "event_pairs float": (_key("event_pairs", lambda pairs: pairs.float()), "event_pairs"),
    "event_pairs IDs >= vocab_size": (_key("event_pairs", lambda pairs: pairs + 1000), "event_pairs"),
    "event_pairs negative": (_key("event_pairs", lambda pairs: -pairs - 1), "event_pairs"),
    "event_pairs a list": (_key("event_pairs", lambda pairs: pairs.tolist()), "event_pairs"),
    "event_pairs 1-d": (_key("event_pairs", lambda pairs: pairs.flatten()), "event_pairs"),
    "event_sets a dict": (_key("event_sets", {"0": [1, 2]}), "event_sets"),
    "event_sets a string": (_key("event_sets", "1 2 3"), "event_sets"),
    "event_sets ID out of range": (_key("event_sets", [[1, 2], [3, 10 ** 6]]), "event_sets"),
    "event_sets negative ID": (_key("event_sets", [[1, -2]]), "event_sets"),
    "event_sets a float ID": (_key("event_sets", [[1, 2.5]]), "event_sets"),
    "event_sets a bool ID": (_key("event_sets", [[True, 2]]), "event_sets"),
    "event_sets flat": (_key("event_sets", [1, 2, 3]), "event_sets"),
    # refused from the shapes, before a model of 10**12 rows could be built (a MemoryError fails the test)
    "vocab_size 10**12": (_inner(ARGS, "vocab_size", 10 ** 12), ARGS),
    "missing hidden_size": (_inner(ARGS, "hidden_size", None), ARGS),
    "dropout 1.5": (_inner(ARGS, "dropout", 1.5), "dropout"),
    "hidden_size a string": (_inner(ARGS, "hidden_size", "32"), "hidden_size"),
    "model_args a string": (_key(ARGS, "DeepLog(29)"), ARGS),
    "hidden_size that does not fit the weights": (_inner(ARGS, "hidden_size", 8), "weights"),
    "a weight of the wrong shape": (_inner(WEIGHTS, "lstm.weight_hh_l0", _wider), "weight_hh_l0"),
    "embedding of the wrong shape": (_inner(WEIGHTS, "embedding.weight", torch.zeros(3, 16)),
                                     "embedding.weight"),
    "a missing weight": (_inner(WEIGHTS, "head.weight", None), "head.weight"),
    "a weight that is a list": (_inner(WEIGHTS, "head.bias", [0.0] * 30), WEIGHTS),
    "model_state_dict a list": (_key(WEIGHTS, lambda weights: list(weights)), WEIGHTS),
    "missing model_state_dict": (_drop(WEIGHTS), WEIGHTS),
    "config unknown key": (_key("config", lambda config: {**config, "training": {
        **config["training"], "learning_speed": 2}}), "learning_speed"),
    "config wrong type": (_key("config", lambda config: {**config, "training": {
        **config["training"], "batch_size": "16"}}), "batch_size"),
    "config a list": (_key("config", lambda config: [config]), "config"),
    "config value out of its range": (_key("config", lambda config: {**config, "model": {
        **config["model"], "num_layers": -1}}), "'model.num_layers' must be > 0"),
    "config learning rate NaN": (_key("config", lambda config: {**config, "training": {
        **config["training"], "learning_rate": float("nan")}}), "must be a finite number"),
    "config section a string": (_inner("config", "training", "fast"), "config"),
    "count_vectors a list": (_key(COUNTS, [1, 2]), COUNTS),
    "count_vectors without weights": (_inner(COUNTS, "weights", None), COUNTS),
    "count_vectors float entries": (_inner(COUNTS, "entries", lambda entries: entries.float()), COUNTS),
    "count_vectors entries [n, 2]": (_inner(COUNTS, "entries", lambda entries: entries[:, :2]), COUNTS),
    "count_vectors weight 0": (_inner(COUNTS, "weights", lambda weights: torch.zeros_like(weights)), COUNTS),
    "count_vectors vector index out of range": (
        _inner(COUNTS, "entries", lambda entries: entries + torch.tensor([10 ** 6, 0, 0])), COUNTS),
    "split_scheme a number": (_key("split_scheme", 3), "split_scheme"),
    "a list, not a checkpoint": (lambda c: [c[ARGS]], "not a DeepLog checkpoint"),
}
@pytest.mark.parametrize("name", list(CHECKPOINT_DAMAGES))
def test_damaged_checkpoint_is_one_error_line(run, tmp_path, capsys, name):
    damage, words = CHECKPOINT_DAMAGES[name]
    path = tmp_path / "damaged.pt"
    torch.save(damage(copy.deepcopy(run["best_state"])), path)
    before = _digest(path)
    out = tmp_path / "eval"
    code, stderr = _main(evaluate, _evaluate_args(run, path, out), capsys)
    _assert_one_error_line(code, stderr, str(path), words)
    assert _reports(out) == [] and _digest(path) == before
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(path) in str(error.value)


# ----------------------------------------------------------------------------- damaged training states
def _rng(change):
    """Every rank's RNG state changed: change(its dict) is the new one."""
    return _key("rng_state", lambda states: [change(copy.deepcopy(state)) for state in states])


def _numpy_without_pos(state):
    del state["numpy"]["pos"]
    return state


POSITION = "data_position"
RESUME_DAMAGES = {
    "step -1": (_key("step", -1), "step"),
    "step a float": (_key("step", 6.0), "step"),
    "history lists of different lengths": (_inner("history", "val_loss", lambda loss: loss * 2), "history"),
    "history missing a list": (_inner("history", "epoch_time", None), "history"),
    "data_position missing epoch": (_inner(POSITION, "epoch", None), "epoch"),
    "data_position epoch 0": (_inner(POSITION, "epoch", 0), "epoch"),
    "data_position loss NaN": (_inner(POSITION, "epoch_loss_sum", math.nan), "epoch_loss_sum"),
    "data_position a list": (_key(POSITION, [2, 0]), POSITION),
    "rng_state a dict": (_key("rng_state", lambda states: states[0]), "rng_state"),
    "rng_state empty": (_key("rng_state", []), "rng_state"),
    "rng_state torch state float": (_rng(lambda s: {**s, "torch": s["torch"].float()}), "rng_state"),
    "rng_state numpy keys short": (
        _rng(lambda s: {**s, "numpy": {**s["numpy"], "keys": s["numpy"]["keys"][:10]}}), "rng_state"),
    "rng_state python a string": (_rng(lambda s: {**s, "python": "random"}), "rng_state"),
    "optimizer_state_dict a list": (_key("optimizer_state_dict", [1, 2]), "optimizer_state_dict"),
    "early_stopping without best_loss": (_key("early_stopping", {"bad_epochs": 0}), "early_stopping"),
    "missing scheduler_state_dict": (_drop("scheduler_state_dict"), "scheduler_state_dict"),
}
# damage deeper in the RNG and optimizer states, caught by the loader before anything is touched
LATE = {
    "rng_state torch state truncated": (_rng(lambda s: {**s, "torch": s["torch"][:100]}), "rng_state"),
    "rng_state numpy without pos": (_rng(_numpy_without_pos), "rng_state"),
    "rng_state python state damaged": (_rng(lambda s: {**s, "python": [[1, 2], 3, None]}), "rng_state"),
}
LATE_NAMELESS = {"optimizer_state_dict of another model": (
    _key("optimizer_state_dict", {"state": {}, "param_groups": []}), "optimizer")}


def _checkpoints(run) -> dict:
    return {p.name: _digest(p) for p in sorted((run["out"] / "checkpoints").iterdir())}


@pytest.mark.parametrize("name", [*RESUME_DAMAGES, *LATE, *LATE_NAMELESS])
def test_damaged_training_state_refuses_resume(run, tmp_path, capsys, monkeypatch, name):
    damage, words = {**RESUME_DAMAGES, **LATE, **LATE_NAMELESS}[name]
    path = tmp_path / "damaged.pt"
    torch.save(damage(copy.deepcopy(run["epoch_state"])), path)
    before, log = _checkpoints(run), (run["out"] / "training.log").read_bytes()
    monkeypatch.chdir(tmp_path)   # whatever happens, no outputs/ beside the repository
    code, stderr = _main(train, ["--config", run["config"], "--resume", path], capsys)
    _assert_one_error_line(code, stderr, str(path), words)
    assert _checkpoints(run) == before
    assert (run["out"] / "training.log").read_bytes() == log   # refused before the run's folder was touched


def test_undamaged_training_state_passes_the_resume_checks(run):
    checkpoint = load_checkpoint(run["epoch"], for_resume=True)
    assert checkpoint["step"] >= 1 and checkpoint["data_position"]["epoch"] >= 1


def test_damaged_training_state_as_a_subprocess(run, tmp_path):
    checkpoint = copy.deepcopy(run["epoch_state"])
    checkpoint["history"]["train_loss"].append(1.0)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    before = _checkpoints(run)
    result = run_script("train.py", "--config", run["config"], "--resume", path, cwd=tmp_path, timeout=60)
    _assert_one_error_line(result.returncode, result.stderr, str(path), "history")
    assert _checkpoints(run) == before


# ----------------------------------------------------------------------------- round trips and older forms
def test_fitted_calibration_loads_back_as_stored(run, tmp_path):
    stored = torch.load(run["best"], weights_only=True)["calibration"]
    loaded = C.load_calibration(run["out"] / "calibration.json")
    assert loaded == stored == _stored_calibration(run)
    assert load_checkpoint(run["best"])["calibration"] == stored
    assert load_model(run["best"]).calibration == stored
    C.save_calibration(tmp_path / "again.json", loaded)
    assert C.load_calibration(tmp_path / "again.json") == stored


def _old_form(current: dict) -> dict:
    """What a version-2 toolkit wrote: no version, probability_bound, no end bound, no combined_rules and
    none of the rule plan's keys."""
    old = {k: v for k, v in current.items() if k not in (
        "version", "log_probability_bound", "log_end_probability_bound", "end_probability_bound_method",
        "combined_rules", "unseen_events_flag", "count_vector_distance", "training_sessions",
        "novelty_on_training", "novelty_is_normal", "expected_fpr", "event_pair_rule", "target_fpr",
        "percentile_method", "distinct_sessions", "scored_sessions", "fitted_at")}
    return {**old, "probability_bound": current["log_probability_bound"]}


def test_checked_is_idempotent(run):
    for form in (_stored_calibration(run), _old_form(_stored_calibration(run)), {"probability_margin": 0.5,
                 **_old_form(_stored_calibration(run))}):
        once = C.checked(copy.deepcopy(form), "once")
        assert C.checked(copy.deepcopy(once), "twice") == once
        assert once["version"] == C.VERSION


def test_old_form_with_target_fpr_gets_its_expected_rates(run):
    current = _stored_calibration(run)
    old = {k: v for k, v in current.items() if k not in ("version", "expected_fpr")}
    upgraded = C.checked(old, "old")
    assert upgraded["expected_fpr"] == pytest.approx(current["expected_fpr"])


# five sessions, by hand: scores as scoring.score_sessions gives them (top_k 2)
SCORES = {"predictions": np.array([4, 4, 4, 4, 4]), "misses_at_2": np.array([0, 1, 2, 4, 0]),
          "max_rank": np.array([1, 3, 6, 9, 2]), "min_log_prob": np.array([-1.0, -4.0, -6.0, -2.0, -1.5]),
          "min_event_log_prob": np.array([-1.0, -4.0, -6.0, -2.0, -1.5]),
          "min_seen_event_log_prob": np.array([-1.0, -4.0, -6.0, -2.0, -1.5]),
          "end_log_prob": np.array([-0.5, -0.5, -0.5, -9.0, -0.5]),
          "novel_set": np.array([0, 0, 0, 0, 1]), "novel_pair": np.array([0, 0, 1, 0, 1]),
          "count_distance": np.array([0.0, 1.0, 9.0, 2.0, 3.0])}
# what the version-2 rules said of them, with bound -5 (natural log), top_g 5, thresholds 0.1 / 0.3 / 0.6:
# probability = least likely event below the bound (no end bound); combined = probability, event_set and
# event_pair
BEFORE = {"probability": [0, 0, 1, 0, 0], "event_set": [0, 0, 0, 0, 1], "event_pair": [0, 0, 1, 0, 1],
          "combined": [0, 0, 1, 0, 1], "count_vector": [0, 0, 0, 0, 0], "top_g": [0, 0, 1, 1, 0],
          "score_p90": [0, 1, 1, 1, 0], "score_p95": [0, 0, 1, 1, 0], "score_p99": [0, 0, 0, 1, 0]}


def test_old_form_upgrades_to_the_same_verdicts():
    old = {"top_k": 2, "top_g": 5, "sessions": 100, "score_thresholds": {"p90": 0.1, "p95": 0.3, "p99": 0.6},
           "least_likely_normal_log_prob": -4.5, "probability_bound": -5.0, "probability_margin": 0.9,
           "event_set_rule": True, "flagged_on_calibration": {"probability": 0.01, "combined": 0.02},
           "source": "validation split of somewhere"}
    upgraded = C.checked(copy.deepcopy(old), "old calibration.json")
    assert upgraded["log_probability_bound"] == -5.0 and "probability_bound" not in upgraded
    assert upgraded["log_end_probability_bound"] is None and upgraded["expected_fpr"] is None
    assert upgraded["combined_rules"] == ["probability", "event_set", "event_pair"]
    assert "0.9" in upgraded["probability_bound_method"]
    assert set(BEFORE) == set(rules.RULES)
    for rule, expected in BEFORE.items():
        assert verdicts(SCORES, upgraded, rule).astype(int).tolist() == expected, rule


def test_old_form_file_loads_upgraded(tmp_path):
    old = {"top_k": 2, "top_g": 5, "sessions": 100, "score_thresholds": {"p90": 0.1, "p95": 0.3, "p99": 0.6},
           "least_likely_normal_log_prob": -4.5, "probability_bound": -5.0, "event_set_rule": True,
           "flagged_on_calibration": {}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(old))
    loaded = C.load_calibration(path)
    assert loaded == C.checked(old, "elsewhere")
    for rule, expected in BEFORE.items():
        assert verdicts(SCORES, loaded, rule).astype(int).tolist() == expected, rule


def test_a_fifo_named_as_any_file_a_user_gives_is_refused_at_once(tmp_path):
    """A config, calibration, parser state, labels CSV or checkpoint that is a FIFO: refused as not a
    regular file, without waiting for a writer that never comes."""
    import os

    import logparse
    import preprocess
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    readers = [(load_config, utils.ConfigError), (C.load_calibration, C.CalibrationError),
               (logparse.load_state, logparse.PreprocessError),
               (preprocess.read_labels, logparse.PreprocessError),
               (load_checkpoint, CheckpointError)]
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("a FIFO was waited on"))
    try:
        for read, error in readers:
            signal.alarm(10)
            refused = re.escape(f"{fifo}") + ".*a FIFO \\(named pipe\\), not a regular file"
            with pytest.raises(error, match=refused):
                read(str(fifo))
            signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
