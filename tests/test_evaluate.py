"""Scores, metrics and thresholds on hand-made cases; reports; detection; evaluate.py end to end."""
import itertools
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    HDFS_DIR,
    REPO,
    fixed_model,
    hand_calibration,
    known,
    needs_hdfs,
    run_script,
    write_config,
)

import calibration as C
import detect as D
import evaluate as E
import scoring as S
from checkpoint import co_occurrence_of, load_model, load_trained
from config import config_from_dict
from dataset import is_validation, iter_sessions
from model import DeepLog


def _chunks(sessions: Counter, chunk_size: int = S.CHUNK_SIZE) -> list[list]:
    """Every session as often as it occurs, in chunks: what evaluate() and fit_calibration() read."""
    return list(S.chunked(sessions.elements(), chunk_size))


def test_score_sessions_columns():
    model = fixed_model()
    scores = S.score_sessions(model, [(0, 3), (1,), (0, 3, 1), (3, 0, 0)], [1, 2],
                              co_occurrence=known({0, 3}, {0, 1}))
    assert scores["predictions"].tolist()[:2] == [3, 2]
    assert scores["misses_at_1"].tolist()[:2] == [2, 2] and scores["misses_at_2"].tolist()[:2] == [2, 1]
    assert scores["max_rank"].tolist()[:2] == [5, 5]
    assert scores["novel_set"].tolist() == [0, 1, 1, 0]
    # (1, 3) never shared a session; {1} alone is no pair
    assert scores["novel_pair"].tolist() == [0, 0, 1, 0]
    log_z = math.log(sum(math.exp(i) for i in range(1, 7)))
    assert scores["min_log_prob"][0] == pytest.approx(1 - log_z)             # the end, ranked last
    assert scores["loss_sum"][0] == pytest.approx(3 * log_z - (6 + 3 + 1))


def test_confusion_weights_every_session_by_its_count():
    # normal: weight 2 of 10 flagged; abnormal: weights 5 and 4 of 10 flagged
    metrics = E.confusion(fp=2.0, normal=10.0, tp=9.0, abnormal=10.0)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (9, 2, 8, 1)
    assert metrics["precision"] == pytest.approx(9 / 11) and metrics["recall"] == pytest.approx(0.9)
    assert metrics["fpr"] == pytest.approx(0.2)
    assert metrics["f1"] == pytest.approx(2 * (9 / 11) * 0.9 / (9 / 11 + 0.9))


def test_calibration_and_rules_on_hand_made_sessions():
    model = fixed_model()
    normal = Counter({(0, 1): 9, (0,): 1})       # scores at k=2: 1/3 (end missed), 1/2
    calibration = E.fit_calibration(model, _chunks(normal), top_k=2, top_g=5, target_fpr=0.2, source="hand",
                                    default_rule="combined", co_occurrence=known({0, 1}, {0}))
    assert calibration["score_thresholds"] == {"p90": pytest.approx(1 / 3), "p95": 0.5, "p99": 0.5}
    log_z = math.log(sum(math.exp(i) for i in range(1, 7)))
    assert calibration["least_likely_normal_log_prob"] == pytest.approx(1 - log_z)
    # 10 sessions are too few for a quantile at 0.1 (half the target each bound): the model-implied bound.
    # Every position puts p_c = e^(6-c) / z on event c; over the 29 positions, classes 4 and 3 together hold
    # 1.25 sessions' worth of mass (more than 0.1 x 10), class 4 alone 0.34: the bound sits just above class
    # 3's surprisal (3.456 nats), at the next bin edge; the calibration sessions (events 0 and 1) stay above
    # it.
    assert calibration["log_probability_bound"] == pytest.approx(-(math.floor((log_z - 3) / 0.01) + 1) * 0.01)
    assert calibration["probability_bound_method"].startswith("model-implied at 10%")
    # the end: p = e^1 / z everywhere, which the model calls unlikely at every position (0.12 sessions' worth
    # in all), so its own estimate would flag every session: the calibration sessions' bound holds instead
    assert calibration["log_end_probability_bound"] == pytest.approx(1 - log_z)
    assert calibration["end_probability_bound_method"].startswith("the calibration sessions' bound")
    assert "probability_bound" not in calibration
    assert calibration["flagged_on_calibration"]["score_p90"] == pytest.approx(0.1)
    assert calibration["flagged_on_calibration"]["combined"] == 0.0

    abnormal = Counter({(0, 1): 2, (2, 3, 4): 3, (7,): 1})
    results, _ = E.evaluate(model, calibration, _chunks(normal), _chunks(abnormal), top_k=2,
                            default_rule="combined", co_occurrence=known({0, 1}, {0}))
    rules = results["rules"]
    # (0, 1) looks normal to every rule; (2, 3, 4) and (7,) are novel event sets; (7,) is beyond the
    # vocabulary; (2, 3, 4) holds event 4, below the event bound, and pairs never seen together
    assert (rules["event_set"]["tp"], rules["event_set"]["fn"], rules["event_set"]["fp"]) == (4, 2, 0)
    assert (rules["event_pair"]["tp"], rules["event_pair"]["fn"], rules["event_pair"]["fp"]) == (3, 3, 0)
    assert (rules["probability"]["tp"], rules["probability"]["fn"]) == (4, 2)
    assert (rules["score_p90"]["tp"], rules["score_p90"]["fp"]) == (4, 1)   # score 1/2 > 1/3 for (0,)
    assert rules["top_g"]["tp"] == 6 and rules["top_g"]["fp"] == 10         # the end always ranks 5 >= g
    assert results["default"] == {"rule": "combined", **rules["combined"]}
    assert results["next_event"]["total_predictions"] == 9 * 3 + 2
    assert results["next_event"]["top1_accuracy"] == pytest.approx(10 / 29)
    assert results["normal_scores"]["count"] == 10 and results["normal_scores"]["distinct"] == 2
    assert results["normal_scores"]["mean"] == pytest.approx((9 / 3 + 1 / 2) / 10)
    assert results["unknown_events"] == {"normal": 0, "abnormal": 1}


def test_report_names_say_which_checkpoint_and_never_overwrite(tmp_path):
    names = []
    for _ in range(3):
        path = E.output_name(tmp_path, "evaluation_results", "out/checkpoints/epoch_3.pt", None, ".json")
        path.write_text("{}")
        names.append(path.name)
    assert len(set(names)) == 3
    assert re.fullmatch(r"evaluation_results_epoch_3_\d{8}-\d{6}\.json", names[0])
    assert all(re.fullmatch(r"evaluation_results_epoch_3_\d{8}-\d{6}(_\d)?\.json", name) for name in names)
    assert E.output_name(tmp_path, "evaluation_results", "best_model.pt", "dev",
                         ".json").name.endswith("_dev.json")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_sessions):
    """train.py with evaluation after training, on normal sessions plus labelled abnormal ones."""
    root = tmp_path_factory.mktemp("evaluated")
    normal, abnormal = sample_sessions
    data, abnormal_dir = root / "data", root / "abnormal"
    data.mkdir(), abnormal_dir.mkdir()
    (data / "s.jsonl").write_text("".join(json.dumps({"event_ids": s, "session_id": f"n{i}"}) + "\n"
                                          for i, s in enumerate(normal)))
    (abnormal_dir / "a.txt").write_text("".join(" ".join(map(str, s)) + "\n" for s in abnormal))
    config = write_config(root / "c.yaml", {
        "training": {"evaluate_after_training": True, "epochs": 4, "learning_rate": 0.01},
        "data": {"validation_split": 0.3, "abnormal_dir": str(abnormal_dir)}})
    out = root / "out"
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, out, data, abnormal_dir, result


def test_training_ends_with_calibration_and_reports(trained):
    _, out, _, _, result = trained
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    calibration = json.loads((out / "calibration.json").read_text())
    assert checkpoint["calibration"] == calibration
    assert calibration["top_k"] == 10 and "calibration half" in calibration["source"]
    assert checkpoint["event_sets"] and all(isinstance(s, list) for s in checkpoint["event_sets"])
    pairs = checkpoint["event_pairs"]   # an [n, 2] tensor: exactly the pairs of the recorded sets
    assert pairs.dtype == torch.long and pairs.shape[1] == 2 and (pairs[:, 0] < pairs[:, 1]).all()
    assert {tuple(p) for p in pairs.tolist()} == {pair for s in checkpoint["event_sets"]
                                                  for pair in itertools.combinations(sorted(s), 2)}
    report_json, = out.glob("evaluation_results_*.json")
    results = json.loads(report_json.read_text())
    for m in results["rules"].values():
        assert m["tp"] + m["fn"] == 60 and m["fp"] + m["tn"] == results["normal_scores"]["count"]
    assert results["default"]["rule"] == "combined"
    assert 0 < results["next_event"]["top1_accuracy"] <= results["next_event"]["top5_accuracy"] <= 1
    report_text, = out.glob("evaluation_report_*.txt")
    assert "DETECTION" in report_text.read_text() and "combined" in report_text.read_text()
    pictures = list(out.glob("score_distribution_*.png"))   # named like the report
    assert ("matplotlib not installed" in result.stdout) != (pictures == [out / report_json.name.replace(
        "evaluation_results", "score_distribution").replace(".json", ".png")])


def elsewhere(data: Path, tmp_path: Path) -> Path:
    """A copy of the training data: the stored thresholds were fitted on the calibration half of the original
    files, which evaluate.py therefore refuses to score; a copy elsewhere stands for other data."""
    import shutil
    return Path(shutil.copytree(data, tmp_path / "elsewhere"))


def test_evaluate_cli_on_given_data_uses_stored_thresholds(trained, tmp_path):
    _, out, data, abnormal_dir, _ = trained
    data = elsewhere(data, tmp_path)
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--data-dir",
                        data, "--abnormal-dir", abnormal_dir, "--output-dir", tmp_path, "--tag", "t")
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(next(tmp_path.glob("evaluation_results_*_t.json")).read_text())
    stored = json.loads((out / "calibration.json").read_text())
    assert results["calibration"] == stored
    assert results["normal_scores"]["count"] == 240 and results["abnormal_sessions"]["count"] == 60
    distinct = results["normal_scores"]["distinct"] + results["abnormal_sessions"]["distinct"]
    assert results["timing"]["distinct_sessions"] == results["timing"]["scored_sessions"] == distinct
    assert results["rules"]["combined"]["recall"] > 0.5   # it detects something on its own data


def test_calibrate_on_refits_and_saves(trained, tmp_path):
    import random

    import generate_sample
    _, out, data, _, _ = trained
    quiet_day = tmp_path / "quiet_day.txt"   # other normal sessions than the ones scored
    rng = random.Random(999)
    quiet_day.write_text("".join(" ".join(map(str, generate_sample.normal_session(rng))) + "\n"
                                 for _ in range(100)))
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--data-dir",
                        data, "--output-dir", tmp_path, "--calibrate-on", quiet_day, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    refitted, = tmp_path.glob("calibration_best_model_*.json")     # beside the run's, never over it
    assert not (tmp_path / "calibration.json").exists()
    calibration = json.loads(refitted.read_text())
    assert (calibration["source"] == str(quiet_day) and calibration["top_k"] == 3
            and calibration["sessions"] == 100)
    results = json.loads(next(tmp_path.glob("evaluation_results_*.json")).read_text())
    assert results["calibration"] == calibration and "false_positive_rate" in results
    assert f"Thresholds applied: fitted now, --calibrate-on; fitted on {quiet_day} at " \
           f"{calibration['fitted_at']}" in result.stdout
    # every run says which thresholds
    stored = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--data-dir",
                        elsewhere(data, tmp_path), "--output-dir", tmp_path)
    assert f"Thresholds applied: stored in {out / 'checkpoints' / 'best_model.pt'}" in stored.stdout


def test_detect_writes_one_line_per_session(trained, tmp_path):
    _, out, _, _, _ = trained
    sessions = tmp_path / "new.jsonl"
    rows = [{"session_id": "same1", "event_ids": [1, 2, 2]}, {"session_id": "same2", "event_ids": [1, 2, 2]},
            {"session_id": "alien", "event_ids": [28, 28, 28]}]
    sessions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    detections = tmp_path / "out.jsonl"
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt",
                        "--detect", sessions, "--output", detections)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in detections.read_text().splitlines()]
    assert [line["session_id"] for line in lines] == ["same1", "same2", "alien"]
    assert {k: v for k, v in lines[0].items() if k != "session_id"} == \
        {k: v for k, v in lines[1].items() if k != "session_id"}
    alien = lines[2]
    assert alien["verdict"] == "abnormal" and alien["novel_event_set"] and alien["misses"]
    assert alien["misses"][0]["actual"] == 28 and len(alien["misses"]) <= 3
    # to stdout when no --output is given, and the log goes to stderr
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt",
                        "--detect", sessions)
    assert [json.loads(line)["session_id"]
            for line in result.stdout.splitlines()] == ["same1", "same2", "alien"]


def test_detect_streams_in_chunks_with_the_same_verdicts(trained, tmp_path):
    _, out, data, _, _ = trained
    model, checkpoint = load_trained(out / "checkpoints" / "best_model.pt", torch.device("cpu"))
    outputs = []
    for chunk_size in (7, 10000):
        path = tmp_path / f"d{chunk_size}.jsonl"
        with open(path, "w") as handle:
            D.score_files(model, checkpoint["calibration"], data, {}, "combined", handle,
                          co_occurrence=co_occurrence_of(checkpoint), chunk_size=chunk_size)
        outputs.append(path.read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 240


def test_from_checkpoint_and_the_manual_route_agree(trained):
    _, out, *_ = trained
    path = out / "checkpoints" / "best_model.pt"
    model = load_model(path, map_location="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    manual = DeepLog(**checkpoint["model_args"])
    manual.load_state_dict(checkpoint["model_state_dict"])
    manual.eval()
    batch = [[1, 2, 2, 3], [1, 2]]
    assert torch.equal(model.calculate_anomaly_score(batch, top_k=3),
                       manual.calculate_anomaly_score(batch, top_k=3))
    assert model.calibration == checkpoint["calibration"]


class _Payload:
    """A pickled object that would run code on load: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def _truncated_checkpoint(path):
    torch.save({"model_state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])


def _damaged_checkpoint(path):
    torch.save({"model_state_dict": {"w": torch.zeros(1000)}}, path)
    data = bytearray(path.read_bytes())
    data[100:300] = bytes(200)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "x.pt: checkpoint not found"),
    (lambda p: p.write_bytes(b""), "x.pt is not a checkpoint written by train.py (empty file)"),
    (lambda p: p.write_bytes(b"\x00garbage"), "x.pt is not a checkpoint written by train.py (not a zip "
                                              "archive)"),
    (_truncated_checkpoint, "x.pt is not a checkpoint written by train.py (truncated)"),
    (_damaged_checkpoint, "x.pt is not a checkpoint written by train.py (damaged archive)"),
    (lambda p: torch.save({"model_state_dict": _Payload()}, p), "(unsafe content refused"),
    (lambda p: torch.save({"something": 1}, p), "not a DeepLog checkpoint"),
    (lambda p: (p / "checkpoints").mkdir(parents=True) or torch.save({}, p / "checkpoints" / "best_model.pt"),
     "x.pt is a directory: pass a checkpoint file, e.g. "),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, make, message):
    path = tmp_path / "x.pt"
    make(path)
    result = run_script("evaluate.py", "--checkpoint", path)
    output = result.stderr + result.stdout
    assert result.returncode == 2 and message in output
    error_lines = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and "weights_only=False" not in output and "code ran" not in output
    assert "Traceback" not in output


def test_checkpoint_of_another_vocab_and_unreadable_data(trained, tmp_path):
    _, out, _, _, _ = trained
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    checkpoint["model_args"]["vocab_size"] = 50
    torch.save(checkpoint, tmp_path / "other.pt")
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "other.pt")
    assert result.returncode == 2 and "weights do not fit" in result.stdout + result.stderr
    (tmp_path / "bad.jsonl").write_text('{"event_ids": [1, 2}\n')
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt",
                        "--data-dir", tmp_path / "bad.jsonl", "--output-dir", tmp_path)
    assert result.returncode == 2 and "bad.jsonl: line 1: malformed JSON" in result.stdout + result.stderr


def test_thresholds_are_never_fitted_on_the_scored_data_and_bad_calibration_files(trained, tmp_path):
    _, out, data, _, _ = trained
    checkpoint = out / "checkpoints" / "best_model.pt"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--data-dir", data, "--calibrate-on", data,
                        "--output-dir", tmp_path)
    assert result.returncode == 2 and "shares 1 file(s) with the sessions being scored" in result.stderr
    # the same files reached another way: a file inside the scored folder, or the checkpoint's own data
    for extra in (["--data-dir", data, "--calibrate-on", data / "s.jsonl"], ["--calibrate-on", data],
                  ["--data-dir", data / "s.jsonl", "--calibrate-on", data]):
        result = run_script("evaluate.py", "--checkpoint", checkpoint, *extra, "--output-dir", tmp_path)
        assert (result.returncode == 2
                and "shares 1 file(s) with the sessions being scored" in result.stderr), extra
    # the stored thresholds were fitted on the calibration half of this data: scoring it would reuse those
    # sessions
    (tmp_path / "elsewhere.jsonl").write_text('{"event_ids": [1, 2]}\n')
    for extra in (["--data-dir", data], ["--data-dir", tmp_path / "elsewhere.jsonl", "--abnormal-dir", data]):
        result = run_script("evaluate.py", "--checkpoint", checkpoint, *extra, "--output-dir", tmp_path)
        assert (result.returncode == 2
                and f"shares 1 file(s) with the training data {data}" in result.stderr), extra
    (tmp_path / "c.json").write_text('{"top_k": 10}')
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--calibration", tmp_path / "c.json",
                        "--output-dir", tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and \
        "c.json: not a calibration (missing top_g, sessions, score_thresholds, " \
        "least_likely_normal_log_prob, log_probability_bound, event_set_rule, " \
        "flagged_on_calibration)" in result.stderr
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", data,
                        "--output", "/nonexistent/x")
    assert result.returncode == 2 and "--output /nonexistent/x: cannot write" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def hdfs_trained(tmp_path_factory):
    """train.py, with evaluation after training, on the HDFS training sessions: the output directory."""
    root = tmp_path_factory.mktemp("hdfs")
    config = write_config(root / "c.yaml", {
        "training": {"evaluate_after_training": True, "epochs": 2, "batch_size": 64, "learning_rate": 0.01},
        "data": {"abnormal_dir": None}})
    out = root / "out"
    result = run_script("train.py", "--config", config, "--data-dir", HDFS_DIR / "hdfs_train",
                        "--output-dir", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@needs_hdfs
def test_hdfs_end_to_end_small(hdfs_trained):
    """A small, fast version of benchmarks/hdfs.py: the pipeline works on the real benchmark data."""
    out = hdfs_trained
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt",
                        "--data-dir", HDFS_DIR / "hdfs_dev_normal",
                        "--abnormal-dir", HDFS_DIR / "hdfs_dev_abnormal",
                        "--output-dir", out, "--tag", "dev")
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(next(out.glob("evaluation_results_*_dev.json")).read_text())
    assert results["normal_scores"]["count"] == 1000 and results["abnormal_sessions"]["count"] == 5051
    assert results["next_event"]["top10_accuracy"] > 0.95
    assert results["rules"]["event_set"]["recall"] > 0.95 and results["rules"]["event_set"]["fpr"] < 0.01


def _history(tmp_path):
    (tmp_path / "training_history.json").write_text(json.dumps(
        {"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [0.9, 0.6], "learning_rate": [1e-3, 1e-4],
         "epoch_time": [1.0, 1.0]}))


def _plot_inputs():
    calibration = hand_calibration()
    _, histograms = E.evaluate(fixed_model(), calibration, [[(0, 3), (0, 3), (0, 3), (1,)]], [[(0, 3), (1,)]],
                               top_k=2, default_rule="combined")
    return histograms, {"calibration": calibration, "top_k": 2}


def test_pictures_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    import logging
    _history(tmp_path)
    E.plot_training_curve(tmp_path, logging.getLogger("test"))
    E.plot_scores(*_plot_inputs(), tmp_path / "score_distribution.png", logging.getLogger("test"))
    for name in ("training_curve.png", "score_distribution.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_one_note_and_no_picture(tmp_path, monkeypatch, caplog):
    import logging
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    _history(tmp_path)
    with caplog.at_level(logging.INFO, logger="test-mpl"):
        E.plot_training_curve(tmp_path, logging.getLogger("test-mpl"))
        E.plot_scores(*_plot_inputs(), tmp_path / "score_distribution.png", logging.getLogger("test-mpl"))
    assert not list(tmp_path.glob("*.png"))
    assert [r.message for r in caplog.records if "matplotlib not installed" in r.message] == [
        "matplotlib not installed: no training_curve.png (pip install matplotlib)",
        "matplotlib not installed: no score_distribution.png (pip install matplotlib)"]


# ----------------------------------------------------------------------------- the in-memory oracle
# evaluate.py before it streamed (commit bf5677a): every distinct session in a Counter, scored at once,
# metrics from whole arrays. The streaming code must give the same numbers.
def _oracle_collect(path, options: dict, all_abnormal: bool = False) -> tuple[Counter, Counter]:
    normal, abnormal = Counter(), Counter()
    for record in iter_sessions(path, None, **options):
        (abnormal if all_abnormal or record.label else normal)[tuple(record.event_ids)] += 1
    return normal, abnormal


def _oracle_weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, q / 100 * cumulative[-1] - 1e-9))
    return float(values[order][min(index, len(order) - 1)])


def _oracle_fit_calibration(model, normal: Counter, top_k: int, top_g: int, target_fpr: float, source: str,
                            default_rule: str, batch_size: int = 256, co_occurrence=None) -> dict:
    sessions, counts = list(normal), np.array(list(normal.values()), dtype=np.float64)
    scores = S.score_sessions(model, sessions, [top_k, top_g], batch_size, co_occurrence)
    anomaly = scores[f"misses_at_{top_k}"] / scores["predictions"]
    finite = np.isfinite(scores["min_log_prob"])
    least_likely = float(scores["min_log_prob"][finite].min()) if finite.any() else 0.0
    # the whole table at once (target_fpr_threshold and ImpliedTail themselves are tested on hand-made scores)
    implied = C.ImpliedTail()
    implied.add(model, sessions, counts, batch_size * S.POSITIONS_PER_SESSION)
    half = target_fpr / 2
    plan = C.plan_rules(co_occurrence, target_fpr, model.vocab_size)   # tested apart, in test_calibration.py
    event_column = "min_event_log_prob" if plan["unseen_events_flag"] else "min_seen_event_log_prob"
    bounds = {which: C.target_fpr_threshold(-scores[column], counts, counts.sum(), half,
                                            implied.threshold(which, half, counts.sum()))
              for which, column in (("event", event_column), ("end", "end_log_prob"))}
    calibration = {
        "version": C.VERSION, "top_k": top_k, "top_g": top_g, "default_rule": default_rule, "source": source,
        "sessions": int(counts.sum()), "distinct_sessions": len(sessions),
        "score_thresholds": {f"p{q}": _oracle_weighted_percentile(anomaly, counts, q) for q in E.PERCENTILES},
        "least_likely_normal_log_prob": least_likely, "target_fpr": target_fpr,
        "log_probability_bound": -bounds["event"][0], "probability_bound_method": bounds["event"][1],
        "log_end_probability_bound": -bounds["end"][0], "end_probability_bound_method": bounds["end"][1],
        "event_set_rule": co_occurrence is not None and co_occurrence.sets is not None,
        "event_pair_rule": co_occurrence is not None and co_occurrence.pairs is not None, **plan}
    calibration["flagged_on_calibration"] = {
        rule: float(counts[_oracle_verdicts(scores, calibration, rule)].sum() / counts.sum())
        for rule in E.RULES}
    calibration["expected_fpr"] = C.expected_rates(calibration)
    return calibration


def _oracle_verdicts(scores: dict, calibration: dict, rule: str) -> np.ndarray:
    if rule == "combined":
        return np.logical_or.reduce([_oracle_verdicts(scores, calibration, rule) for rule in
                                     calibration.get("combined_rules",
                                                     ("probability", "event_set", "event_pair"))])
    if rule == "count_vector":
        distance = calibration.get("count_vector_distance")
        return scores["count_distance"] > (np.inf if distance is None else distance)
    if rule == "event_set":
        return scores["novel_set"] > 0
    if rule == "event_pair":
        return scores["novel_pair"] > 0
    if rule == "top_g":
        return scores["max_rank"] >= calibration["top_g"]
    if rule == "probability":
        events = ("min_event_log_prob" if calibration.get("unseen_events_flag", True)
                  else "min_seen_event_log_prob")
        return (scores[events] < calibration["log_probability_bound"]) | \
            (scores["end_log_prob"] < calibration["log_end_probability_bound"])
    top_k = calibration["top_k"]
    return scores[f"misses_at_{top_k}"] / scores["predictions"] > calibration["score_thresholds"][rule[6:]]


def _oracle_confusion(abnormal_pred_normal, normal_w, abnormal_pred_abnormal, abnormal_w) -> dict:
    fp = float(normal_w[abnormal_pred_normal].sum())
    tn = float(normal_w.sum()) - fp
    tp = float(abnormal_w[abnormal_pred_abnormal].sum())
    fn = float(abnormal_w.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn), "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "fpr": fp / (fp + tn) if fp + tn else 0.0}


def _oracle_evaluate(model, calibration: dict, normal: Counter, abnormal: Counter, top_k: int,
                     default_rule: str, batch_size: int = 256, co_occurrence=None) -> tuple[dict, tuple]:
    ks = [*E.ACCURACY_KS, top_k, calibration["top_g"]]
    results: dict = {"top_k": top_k}
    normal_scores = S.score_sessions(model, list(normal), ks, batch_size, co_occurrence) if normal else None
    normal_w = np.array(list(normal.values()), dtype=np.float64)
    if normal_scores is not None:
        predictions = float((normal_scores["predictions"] * normal_w).sum())
        loss_count = (normal_scores["loss_count"] * normal_w).sum()
        results["next_event"] = {
            "loss": float((normal_scores["loss_sum"] * normal_w).sum() / max(loss_count, 1)),
            "total_predictions": int(predictions),
            **{f"top{k}_accuracy": 1 - float((normal_scores[f"misses_at_{k}"] * normal_w).sum()) / predictions
               for k in E.ACCURACY_KS}}
        anomaly = normal_scores[f"misses_at_{top_k}"] / normal_scores["predictions"]
        mean = float((anomaly * normal_w).sum() / normal_w.sum())
        results["normal_scores"] = {
            "mean": mean,
            "std": float(math.sqrt((((anomaly - mean) ** 2) * normal_w).sum() / normal_w.sum())),
            "count": int(normal_w.sum()), "distinct": len(normal),
            "reference_percentiles": {f"p{q}": _oracle_weighted_percentile(anomaly, normal_w, q)
                                       for q in E.PERCENTILES}}
    results["unknown_events"] = {}
    if normal_scores is not None:
        results["unknown_events"]["normal"] = int((normal_scores["unknown"] * normal_w).sum())
    plot_data = (normal_scores, normal_w, None, None)
    if abnormal:
        abnormal_w = np.array(list(abnormal.values()), dtype=np.float64)
        abnormal_scores = S.score_sessions(model, list(abnormal), ks, batch_size, co_occurrence)
        results["unknown_events"]["abnormal"] = int((abnormal_scores["unknown"] * abnormal_w).sum())
        empty = np.zeros(0, dtype=bool)
        results["rules"] = {}
        for rule in E.RULES:
            on_normal = (_oracle_verdicts(normal_scores, calibration, rule) if normal_scores is not None
                         else empty)
            results["rules"][rule] = _oracle_confusion(on_normal, normal_w if normal else np.zeros(0),
                                                       _oracle_verdicts(abnormal_scores, calibration, rule),
                                                       abnormal_w)
        results["default"] = {"rule": default_rule, **results["rules"][default_rule]}
        results["abnormal_sessions"] = {"count": int(abnormal_w.sum()), "distinct": len(abnormal)}
        plot_data = (normal_scores, normal_w, abnormal_scores, abnormal_w)
    elif normal_scores is not None:
        flagged = {rule: float(normal_w[_oracle_verdicts(normal_scores, calibration, rule)].sum())
                   for rule in E.RULES}
        results["false_positive_rate"] = {rule: n / normal_w.sum() for rule, n in flagged.items()}
        results["default"] = {"rule": default_rule, "fpr": results["false_positive_rate"][default_rule]}
    return results, plot_data


def _oracle_validation_sessions(config, options: dict) -> tuple[Counter, Counter, Counter]:
    data, seed = config.data, config.training.seed
    calibration, evaluation, abnormal = Counter(), Counter(), Counter()
    for record in iter_sessions(data.preprocessed_dir, None, **options):
        events = tuple(record.event_ids)
        if record.label:
            abnormal[events] += 1
        elif data.validation_split == 0 or is_validation(record.file, record.index, seed,
                                                         data.validation_split):
            half = calibration if is_validation(record.file, record.index, seed + 1, 0.5) else evaluation
            half[events] += 1
    return calibration, evaluation, abnormal


# ----------------------------------------------------------------------------- streaming == in memory
def _assert_same(actual, expected, ignored=(), where="results"):
    """Every key of `expected` (but `ignored`) has the same value in `actual`; floats to 1e-12 relative
    (absolute near 0)."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            if key not in ignored:
                _assert_same(actual[key], value, ignored, f"{where}.{key}")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12), where
    else:
        assert actual == expected, where


def _shuffled_chunks(sessions: Counter, chunk_size: int, seed: int = 0) -> list[list]:
    """Every occurrence as its own entry, shuffled so that duplicates fall into different chunks."""
    occurrences = list(sessions.elements())
    random.Random(seed).shuffle(occurrences)
    return list(S.chunked(occurrences, chunk_size))


def _whole_array_histograms(scores: dict, weights: np.ndarray, top_k: int) -> dict:
    """The plot's histograms from all scores at once, on the bins evaluate() accumulates."""
    return {"score": np.histogram(scores[f"misses_at_{top_k}"] / scores["predictions"], E.SCORE_EDGES,
                                  weights=weights)[0],
            "log10_probability": np.histogram(np.maximum(scores["min_log_prob"], -30) / math.log(10),
                                              E.LOG10_PROBABILITY_EDGES, weights=weights)[0]}


@pytest.mark.parametrize("target_fpr", [0.3, 0.001])
def test_streaming_gives_the_in_memory_numbers_on_sample_data(trained, target_fpr):
    """Chunks of 7 sessions and a cache of 5, so that sessions are evicted and scored again."""
    _, out, data, abnormal_dir, _ = trained
    model, checkpoint = load_trained(out / "checkpoints" / "best_model.pt", torch.device("cpu"))
    co_occurrence = co_occurrence_of(checkpoint)
    normal, _ = _oracle_collect(data, {})
    _, abnormal = _oracle_collect(abnormal_dir, {}, all_abnormal=True)
    # ID 28 never occurs in training: probability 0, so these are below any probability bound
    calibration_sessions = normal + Counter({(28, 28, 28): 2, (1, 2, 28): 1})
    args = (10, 9, target_fpr, "sample", "combined", 256, co_occurrence)
    expected = _oracle_fit_calibration(model, calibration_sessions, *args)
    calibration = E.fit_calibration(model, _shuffled_chunks(calibration_sessions, 7), *args, max_cached=5)
    _assert_same(calibration, expected, ignored={"distinct_sessions"})
    flagged = calibration["flagged_on_calibration"]["probability"]
    assert flagged == 3 / calibration_sessions.total() if target_fpr == 0.001 else 0.2 < flagged <= target_fpr
    assert calibration["percentile_method"] == "exact" and calibration["distinct_sessions"] is None
    assert calibration["scored_sessions"] > len(calibration_sessions)   # evicted sessions were scored again

    for abnormal_side in (abnormal, Counter()):   # rules with abnormal data, false-positive rates without
        expected, (normal_scores, normal_w, abnormal_scores, abnormal_w) = _oracle_evaluate(
            model, calibration, normal, abnormal_side, 10, "combined", 256, co_occurrence)
        results, histograms = E.evaluate(model, calibration, _shuffled_chunks(normal, 7),
                                         _shuffled_chunks(abnormal_side, 7), 10, "combined", 256,
                                         co_occurrence, max_cached=5)
        _assert_same(results, expected, ignored={"distinct"})
        assert (results["normal_scores"]["distinct"] is None
                and results["normal_scores"]["scored"] > len(normal))
        assert results["normal_scores"]["percentile_method"] == "exact"
        expected_histograms = {"normal": _whole_array_histograms(normal_scores, normal_w, 10)}
        if abnormal_side:
            assert results["rules"]["probability"]["tp"] > 0   # the bound is exercised
            expected_histograms["abnormal"] = _whole_array_histograms(abnormal_scores, abnormal_w, 10)
        assert histograms.keys() == expected_histograms.keys()
        for side, expected_side in expected_histograms.items():
            for name, counts in expected_side.items():
                assert histograms[side][name].tolist() == counts.tolist(), (side, name)

    # a cache that holds every session scores each once: the distinct counts are exact
    results, _ = E.evaluate(model, calibration, _shuffled_chunks(normal, 7), _shuffled_chunks(abnormal, 7),
                            10, "combined", 256, co_occurrence)
    assert results["normal_scores"]["distinct"] == results["normal_scores"]["scored"] == len(normal)
    assert results["abnormal_sessions"]["distinct"] == len(abnormal)


def test_calibration_thresholds_from_the_sketch_stay_within_its_error(trained):
    _, out, data, _, _ = trained
    model, _ = load_trained(out / "checkpoints" / "best_model.pt", torch.device("cpu"))
    normal, _ = _oracle_collect(data, {})
    # at top-2 the sample's normal sessions have dozens of distinct scores: more than the 10 kept exactly
    expected = _oracle_fit_calibration(model, normal, 2, 9, 0.001, "sample", "combined")
    calibration = E.fit_calibration(model, _shuffled_chunks(normal, 7), 2, 9, 0.001, "sample", "combined",
                                    max_exact_scores=10)
    assert calibration["percentile_method"] == "histogram of 65536 bins, error <= 1.53e-05"
    scores = S.score_sessions(model, list(normal), [2])
    anomaly, counts = (scores["misses_at_2"] / scores["predictions"],
                       np.array(list(normal.values()), dtype=float))
    for name, threshold in calibration["score_thresholds"].items():
        assert 0 <= threshold - expected["score_thresholds"][name] <= 1 / 65536
        # the rule's rate on the calibration sessions is exact for the threshold reported
        flagged = counts[anomaly > threshold].sum() / counts.sum()
        assert calibration["flagged_on_calibration"][f"score_{name}"] == flagged
    _assert_same(calibration, expected, ignored={"distinct_sessions", "score_thresholds", "score_p90",
                                                 "score_p95", "score_p99"})


def test_validation_sources_hold_the_in_memory_halves(trained, tmp_path):
    _, out, data, abnormal_dir, _ = trained
    config = config_from_dict(torch.load(out / "checkpoints" / "best_model.pt",
                                                 weights_only=True)["config"])
    mixed = tmp_path / "mixed"   # normal sessions, and labelled abnormal ones
    mixed.mkdir()
    (mixed / "s.jsonl").write_text((data / "s.jsonl").read_text())
    (mixed / "l.jsonl").write_text("".join(json.dumps({"event_ids": list(map(int, line.split())),
                                                       "label": 1}) + "\n"
                                           for line in (abnormal_dir / "a.txt").read_text().splitlines()))
    config.data.preprocessed_dir = str(mixed)
    config.lazy_loading.cache_dir = str(tmp_path / "cache")
    for split, from_cache in ((0.3, True), (0.0, True), (0.3, False), (0.0, False)):
        config.data.validation_split, config.lazy_loading.cache = split, from_cache
        expected = _oracle_validation_sessions(config, {})
        assert all(expected)
        for source, counter in zip(E.validation_sessions(config, {}, chunk_size=7), expected):
            assert Counter(tuple(session) for chunk in source for session in chunk) == counter


@needs_hdfs
def test_streaming_gives_the_in_memory_numbers_on_hdfs(hdfs_trained):
    """Chunks of 500 and a cache of 64 sessions on the HDFS data (1,816 distinct dev sessions)."""
    model, checkpoint = load_trained(hdfs_trained / "checkpoints" / "best_model.pt", torch.device("cpu"))
    co_occurrence = co_occurrence_of(checkpoint)
    args = (10, 9, 0.001, "hdfs_train", "combined", 256, co_occurrence)
    train, _ = _oracle_collect(HDFS_DIR / "hdfs_train", {})
    expected = _oracle_fit_calibration(model, train, *args)
    calibration = E.fit_calibration(model, S.file_chunks(HDFS_DIR / "hdfs_train", {}, abnormal=False,
                                                         chunk_size=500),
                                    *args, max_cached=64)
    _assert_same(calibration, expected, ignored={"distinct_sessions"})
    normal, _ = _oracle_collect(HDFS_DIR / "hdfs_dev_normal", {})
    _, abnormal = _oracle_collect(HDFS_DIR / "hdfs_dev_abnormal", {}, all_abnormal=True)
    expected, _ = _oracle_evaluate(model, calibration, normal, abnormal, 10, "combined", 256, co_occurrence)
    results, _ = E.evaluate(model, calibration,
                            S.file_chunks(HDFS_DIR / "hdfs_dev_normal", {}, chunk_size=500),
                            S.file_chunks(HDFS_DIR / "hdfs_dev_abnormal", {}, chunk_size=500), 10, "combined",
                            256, co_occurrence, max_cached=64)
    _assert_same(results, expected, ignored={"distinct"})
    assert results["abnormal_sessions"]["count"] == 5051 and results["rules"]["combined"]["tp"] > 0


# ----------------------------------------------------------------------------- accumulators by hand
def test_chunk_scorer_scores_a_session_once_while_it_is_cached():
    model = fixed_model()
    chunks = [[[0, 1], (0, 1), np.array([2])], [(0, 1), [3]], [(2,)]]
    lru = S.ChunkScorer(model, [2], max_cached=2)
    sessions, scores, counts = lru(chunks[0])
    assert (sessions == [(0, 1), (2,)] and counts.tolist() == [2, 1]
            and scores["misses_at_2"].tolist() == [1, 2])
    sessions, scores, counts = lru(chunks[1])   # (0, 1) from the cache, now the most recent; (3,) evicts (2,)
    fresh = S.score_sessions(model, sessions, [2])
    assert all(scores[name].tolist() == fresh[name].tolist() for name in fresh)
    lru(chunks[2])                              # (2,) scored again
    assert lru.scored == 4 and lru.distinct is None
    roomy = S.ChunkScorer(model, [2], max_cached=3)
    for chunk in chunks:
        roomy(chunk)
    assert roomy.scored == roomy.distinct == 3
    long_session = S.ChunkScorer(model, [2])
    long_session([[1] * (S.MAX_CACHED_LENGTH + 1)] * 2)
    # not cached: may be scored again later
    assert long_session.scored == 1 and long_session.distinct is None


def test_results_depend_neither_on_chunks_nor_on_the_cache():
    model, co_occurrence = fixed_model(), known({0, 1}, {0}, {1, 2, 3})
    normal = Counter({(0, 1): 9, (0,): 1, (1, 2, 3): 4, (0, 9): 2})
    abnormal = Counter({(0, 1): 2, (2, 3, 4): 3, (7,): 1})
    args = (2, 5, 0.25, "hand", "combined", 256, co_occurrence)
    expected_calibration = _oracle_fit_calibration(model, normal, *args)
    expected, _ = _oracle_evaluate(model, expected_calibration, normal, abnormal, 2, "combined", 256,
                                   co_occurrence)
    for chunk_size, max_cached in ((1, 0), (2, 1), (3, 100), (100, 100)):
        calibration = E.fit_calibration(model, _shuffled_chunks(normal, chunk_size), *args,
                                        max_cached=max_cached)
        _assert_same(calibration, expected_calibration, ignored={"distinct_sessions"})
        results, _ = E.evaluate(model, calibration, _shuffled_chunks(normal, chunk_size),
                                _shuffled_chunks(abnormal, chunk_size), 2, "combined", 256, co_occurrence,
                                max_cached=max_cached)
        _assert_same(results, expected, ignored={"distinct"})
        assert results["normal_scores"]["distinct"] == (len(normal) if max_cached == 100 else None)


def test_few_calibration_sessions_flag_only_events_of_probability_zero():
    model = fixed_model()
    normal = Counter({(0, 1): 9, (0,): 1, (0, 9): 2})   # 9 >= vocab_size: probability 0
    calibration = E.fit_calibration(model, _chunks(normal), 2, 5, 0.001, "hand", "combined")
    # the model's own estimate puts both bounds below anything it gives probability (each of the 35 positions
    # holds more mass on class 4, and on the end, than 0.0005 x 12 sessions allow): only probability 0 is
    # flagged
    log_z = math.log(sum(math.exp(i) for i in range(1, 7)))
    assert (calibration["log_probability_bound"] < 2 - log_z
            and calibration["log_end_probability_bound"] < 1 - log_z)
    # the end of every session
    assert calibration["least_likely_normal_log_prob"] == pytest.approx(1 - log_z)
    assert calibration["flagged_on_calibration"]["probability"] == 2 / 12
    _assert_same(calibration, _oracle_fit_calibration(model, normal, 2, 5, 0.001, "hand", "combined"))
    with pytest.raises(C.CalibrationError, match=r"target false-positive rate 0.5: must be in \(0, 0.5\)"):
        E.fit_calibration(model, _chunks(normal), 2, 5, 0.5, "hand", "combined")


def test_empty_sides_and_empty_chunks():
    model = fixed_model()
    normal, abnormal = Counter({(0, 1): 3, (0,): 1}), Counter({(2, 3): 2, (0, 1): 1})
    calibration = E.fit_calibration(model, [[], *_chunks(normal), []], 2, 5, 0.25, "hand", "combined")
    _assert_same(calibration, _oracle_fit_calibration(model, normal, 2, 5, 0.25, "hand", "combined"))
    only_abnormal, histograms = E.evaluate(model, calibration, [[]], _chunks(abnormal), 2, "combined")
    _assert_same(only_abnormal, _oracle_evaluate(model, calibration, Counter(), abnormal, 2, "combined")[0])
    assert "next_event" not in only_abnormal and list(histograms) == ["abnormal"]
    assert only_abnormal["rules"]["top_g"]["fp"] == only_abnormal["rules"]["top_g"]["tn"] == 0
    only_normal, _ = E.evaluate(model, calibration, _chunks(normal), [], 2, "combined")
    _assert_same(only_normal, _oracle_evaluate(model, calibration, normal, Counter(), 2, "combined")[0])
    assert "rules" not in only_normal and only_normal["false_positive_rate"]["top_g"] == 1.0
    with pytest.raises(E.DataError, match="no sessions to evaluate"):
        E.evaluate(model, calibration, [], [[]], 2, "combined")
    with pytest.raises(C.CalibrationError, match="hand: no normal sessions to calibrate on"):
        E.fit_calibration(model, [[]], 2, 5, 0.25, "hand", "combined")


@pytest.mark.parametrize("rule", [None, "top_g", "score_p95", "probability"])
def test_the_model_gives_the_same_verdicts_as_detect(trained, tmp_path, rule):
    """checkpoint.load_model(...), scoring.verdict(model, sessions): the --detect verdicts."""
    _, out, data, abnormal_dir, _ = trained
    sessions = [json.loads(line)["event_ids"] for line in (data / "s.jsonl").read_text().splitlines()[:60]]
    sessions += [list(map(int, line.split()))
                 for line in (abnormal_dir / "a.txt").read_text().splitlines()[:60]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"event_ids": s}) + "\n" for s in sessions))
    checkpoint = out / "checkpoints" / "best_model.pt"
    rule_flag = ["--rule", rule] if rule else []
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", path, *rule_flag)
    assert result.returncode == 0, result.stderr
    detected = [json.loads(line)["verdict"] for line in result.stdout.splitlines()]
    model = load_model(checkpoint)
    assert S.verdict(model, sessions, rule) == detected
    if rule is None:  # the default rule flags some and passes others: the equality above means something
        assert 0 < detected.count("abnormal") < len(detected)


def test_detect_over_a_bad_record_writes_what_came_before_and_says_it_is_partial(trained, tmp_path):
    _, out, _, _, _ = trained
    good = [{"session_id": f"s{i}", "event_ids": [1, 2, 2 + i % 3]} for i in range(5000)]
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + "not json\n" + json.dumps(good[0]) + "\n")
    checkpoint, detections = out / "checkpoints" / "best_model.pt", tmp_path / "out.jsonl"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", path, "--output", detections)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("line 5001: malformed JSON" in result.stderr
            and "the 5000 sessions before it were written" in result.stderr)
    assert "partial" in result.stderr and len(detections.read_text().splitlines()) == 5000
    assert "(--skip-bad-records skips such records)" in result.stderr   # the flag is off, and would skip it
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", path, "--output", detections,
                        "--skip-bad-records")
    assert result.returncode == 0, result.stderr
    assert len(detections.read_text().splitlines()) == 5001


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_detect_says_the_output_is_partial_and_how_many(trained, tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time
    _, out, _, _, _ = trained
    rng = random.Random(5)   # distinct sessions: none is scored from the cache, so detection takes seconds
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps({"session_id": f"s{i}", "event_ids": [rng.randrange(1, 29) for _ in
                                                                              range(40)]}) + "\n"
                            for i in range(16_000)))
    detections = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "--checkpoint",
                                str(out / "checkpoints" / "best_model.pt"), "--detect", str(path), "--output",
                                str(detections)], cwd=REPO, text=True, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not detections.exists() or detections.stat().st_size == 0):
        time.sleep(0.05)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, signal_name).value and "Traceback" not in stderr
    lines = detections.read_text().splitlines()
    assert 0 < len(lines) < 16_000
    assert all(json.loads(line)["session_id"] for line in lines)   # whole lines
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: {signal_name}: --output {detections} is partial: it holds the first {len(lines)} "
        "sessions, as whole lines")


def test_the_report_names_where_the_abnormal_sessions_came_from(trained, tmp_path):
    _, out, data, abnormal_dir, _ = trained
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "s.jsonl").write_text((data / "s.jsonl").read_text() + "".join(
        json.dumps({"event_ids": list(map(int, line.split())), "label": 1}) + "\n"
        for line in (abnormal_dir / "a.txt").read_text().splitlines()))
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--data-dir",
                        mixed, "--output-dir", tmp_path / "reports")
    assert result.returncode == 0, result.stderr
    report = next((tmp_path / "reports").glob("evaluation_report_*.txt")).read_text()
    assert f"Abnormal:    label 1 in {mixed}" in report and "Abnormal:    None" not in report


# ----------------------------------------------------------------------------- names, plots and faults of #7
def test_result_keys_say_what_they_hold(trained):
    """The bound is stored as a natural log under a name that says so; the score percentiles of the scored
    data are for reference, and the report says so."""
    _, out, _, _, _ = trained
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    results = json.loads(next(out.glob("evaluation_results_*.json")).read_text())
    for calibration in (json.loads((out / "calibration.json").read_text()), checkpoint["calibration"],
                        results["calibration"]):
        assert "probability_bound" not in calibration
        assert calibration["log_probability_bound"] <= calibration["least_likely_normal_log_prob"] < 0
        assert calibration["target_fpr"] == 0.0005
        for method in (calibration["probability_bound_method"], calibration["end_probability_bound_method"]):
            assert method.startswith(("model-implied at 0.025% over every position of", "the calibration "
                                                                                         "sessions'"))
        assert calibration["log_end_probability_bound"] < 0
    assert "recommended_thresholds" not in results["normal_scores"]
    assert list(results["normal_scores"]["reference_percentiles"]) == ["p90", "p95", "p99"]
    report = next(out.glob("evaluation_report_*.txt")).read_text()
    bound = results["calibration"]["log_probability_bound"]
    end_bound = results["calibration"]["log_end_probability_bound"]
    assert (f"Probability rule: an actual event less likely than p={math.exp(bound):.3g} or an end of "
            f"session less likely than p={math.exp(end_bound):.3g} (target FPR 0.05%, "
            "half for each bound;") in report
    assert (f"natural logs log_probability_bound {bound:.4f}, log_end_probability_bound {end_bound:.4f} "
            "in the JSON)") in report
    percentiles = "  ".join(f"{p}={v:.4f}"
                            for p, v in results["normal_scores"]["reference_percentiles"].items())
    assert f"  Percentiles: {percentiles} (exact)\n  (of these scores, for reference: " \
           "the thresholds applied are the calibrated ones below;" in report


def test_calibrations_written_before_the_rename_still_work(trained, tmp_path):
    """Checkpoints and calibration.json files from before name the bound "probability_bound": every reader
    takes it, with the same verdicts."""
    _, out, data, abnormal_dir, _ = trained
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    old = dict(checkpoint["calibration"])   # as versions before target_fpr wrote it, config included
    old.pop("version")   # written before calibrations had one
    old["probability_bound"] = old.pop("log_probability_bound")
    for key in ("target_fpr", "probability_bound_method", "log_end_probability_bound",
                "end_probability_bound_method", "event_pair_rule"):
        del old[key]
    old["probability_margin"] = 0.001
    old_config = {section: dict(values) for section, values in checkpoint["config"].items()}
    for key in ("target_fpr", "event_set_rule", "event_pair_rule"):
        del old_config["evaluation"][key]
    old_config["evaluation"]["probability_margin"] = 0.001
    torch.save({**checkpoint, "calibration": old, "config": old_config}, tmp_path / "old.pt")
    (tmp_path / "old_calibration.json").write_text(json.dumps(old))
    sessions = tmp_path / "mixed.jsonl"
    sessions.write_text((data / "s.jsonl").read_text() + "".join(
        json.dumps({"event_ids": list(map(int, line.split()))}) + "\n"
        for line in (abnormal_dir / "a.txt").read_text().splitlines()))
    detected = []
    for extra in ([out / "checkpoints" / "best_model.pt"], [tmp_path / "old.pt"],
                  [out / "checkpoints" / "best_model.pt", "--calibration",
                   tmp_path / "old_calibration.json"]):
        result = run_script("evaluate.py", "--checkpoint", *extra, "--detect", sessions,
                            "--rule", "probability")
        assert result.returncode == 0, result.stderr
        detected.append([json.loads(line)["verdict"] for line in result.stdout.splitlines()])
    # an old calibration keeps its single bound on every prediction, the end included
    events = [json.loads(line)["event_ids"] for line in sessions.read_text().splitlines()]
    scores = S.score_sessions(load_model(tmp_path / "old.pt"), [tuple(e) for e in events],
                              [10])
    single_bound = ["abnormal" if lp < old["probability_bound"] else "normal"
                    for lp in scores["min_log_prob"]]
    assert (detected[1] == detected[2] == single_bound and "abnormal" in single_bound
            and "normal" in single_bound)
    assert S.verdict(load_model(tmp_path / "old.pt"), events, "probability") == single_bound
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "old.pt",
                        "--data-dir", elsewhere(data, tmp_path), "--abnormal-dir", abnormal_dir,
                        "--output-dir", tmp_path / "reports")
    assert result.returncode == 0, result.stderr
    report = next((tmp_path / "reports").glob("evaluation_report_*.txt")).read_text()
    assert f"Probability rule: an actual event less likely than " \
           f"p={math.exp(old['probability_bound']):.3g} (" in report


@pytest.mark.parametrize("thresholds", [
    {"p90": 0.0, "p95": 0.0, "p99": 0.053},     # HDFS: p90 = p95, p99 close by
    {"p90": 0.05, "p95": 0.051, "p99": 0.052},  # close but unequal
    {"p90": 0.1, "p95": 0.1, "p99": 0.1}])
def test_thresholds_are_named_in_the_legend_never_over_the_bars(thresholds):
    groups = E.threshold_groups(thresholds)
    assert [value for _, value in groups] == sorted(set(thresholds.values()))   # one line per distinct value
    assert sorted("=".join(label for label, _ in groups).split("=")) == sorted(thresholds)
    if thresholds["p90"] == thresholds["p95"] == 0.0:
        assert groups == [("p90=p95", 0.0), ("p99", 0.053)]
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots()
    axis.hist([0.0], [0, 0.5, 1], weights=[100])
    lines = E.draw_thresholds(axis, thresholds)
    labels = [text.get_text() for text in axis.legend().get_texts()]
    plt.close(figure)
    assert labels == [f"{label} threshold {value:.3g}" for label, value in groups]
    assert len({line.get_linestyle() for line in lines}) == len(groups)   # told apart without the labels
    assert not axis.texts                                                  # nothing written over the bars


def test_event_set_panel_counts_what_the_rule_flags(tmp_path):
    import logging
    model, co_occurrence = fixed_model(), known({0, 1}, {0})
    calibration = E.fit_calibration(model, _chunks(Counter({(0, 1): 3})), 2, 5, 0.25, "hand", "combined",
                                    co_occurrence=co_occurrence)
    normal = Counter({(0, 1): 5, (0,): 2, (0, 2): 1})          # (0, 2): a novel set in the normal data
    abnormal = Counter({(0, 1): 2, (2, 3, 4): 3, (7,): 1})
    results, histograms = E.evaluate(model, calibration, _shuffled_chunks(normal, 3),
                                     _shuffled_chunks(abnormal, 2), 2, "combined",
                                     co_occurrence=co_occurrence)
    assert E.record_counts(histograms) == {"normal": (1.0, 7.0), "abnormal": (4.0, 2.0)}
    event_set = results["rules"]["event_set"]
    assert (event_set["fp"], event_set["tn"], event_set["tp"], event_set["fn"]) == (1, 7, 4, 2)
    pytest.importorskip("matplotlib")
    E.plot_scores(histograms, {**results, "calibration": calibration}, tmp_path / "with.png",
                  logging.getLogger("t"))
    # without a record of the event sets of training: no counts, and the panel says so
    _, without = E.evaluate(model, calibration, _chunks(normal), _chunks(abnormal), 2, "combined")
    assert E.record_counts(without) is None
    E.plot_scores(without, {**results, "calibration": calibration}, tmp_path / "without.png",
                  logging.getLogger("t"))
    for name in ("with.png", "without.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect_on_a_full_disk_says_what_was_written(trained, tmp_path):
    """Writes to /dev/full fail with ENOSPC: one line naming the output and the cause, exit 1, no
    traceback."""
    import subprocess
    import sys
    _, out, data, _, _ = trained
    checkpoint = out / "checkpoints" / "best_model.pt"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", data, "--output", "/dev/full",
                        "--output-dir", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    message = "error: --output /dev/full: cannot write (No space left on device): the output is partial, " \
              "it holds the first 0 sessions"
    assert result.stderr.strip().splitlines() == [message]
    assert message in (tmp_path / "evaluation.log").read_text()
    with open("/dev/full", "w") as full:   # the JSON lines to stdout, on a full disk
        result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(checkpoint),
                                 "--detect", str(data)],
                                cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=300)
    assert (result.returncode == 1 and "Traceback" not in result.stderr
            and "Exception ignored" not in result.stderr)
    assert "error: stdout: cannot write (No space left on device): the output is partial, " \
           "it holds the first 0 sessions" in result.stderr


def test_a_failed_write_leaves_whole_lines_and_says_how_many(tmp_path, monkeypatch):
    """The disk fills up in the middle of the second chunk: the file keeps the first chunk's lines, whole."""
    import errno
    import os
    model = fixed_model()
    calibration = E.fit_calibration(model, _chunks(Counter({(0, 1): 3})), 2, 5, 0.25, "hand", "combined")
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps({"session_id": f"s{i}", "event_ids": [0, 1]}) + "\n"
                            for i in range(5)))
    real_write, calls = os.write, []

    def filling_up(descriptor, chunk):
        calls.append(len(chunk))
        if len(calls) == 1:
            return real_write(descriptor, chunk)
        if len(calls) == 2:
            return real_write(descriptor, chunk[:10])   # part of a line, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    output = tmp_path / "out.jsonl"
    with open(output, "w") as handle, monkeypatch.context() as patch:
        patch.setattr(os, "write", filling_up)
        with pytest.raises(D.OutputFailed) as failure:
            D.score_files(model, calibration, data, {}, "combined", handle, chunk_size=2,
                          out_name="--output out.jsonl")
    assert str(failure.value) == "[Errno 28] --output out.jsonl: cannot write (No space left on device): " \
                                 "the output is partial, it holds the first 2 sessions"
    assert [json.loads(line)["session_id"] for line in output.read_text().splitlines()] == ["s0", "s1"]


def test_detect_reports_the_bad_records_it_skipped(trained, tmp_path):
    _, out, _, _, _ = trained
    path = tmp_path / "new.jsonl"
    path.write_text(json.dumps({"event_ids": [1, 2]}) + "\nnot json\n" + json.dumps({"event_ids": [1, "x"]}) +
                    "\n" + json.dumps({"event_ids": [1, 2, 3]}) + "\n")
    checkpoint = out / "checkpoints" / "best_model.pt"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", path, "--skip-bad-records")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2   # the JSON lines; the log went to stderr
    assert re.search(r"WARNING \| Skipped 2 bad records \(--skip-bad-records\); the first: .*new\.jsonl: "
                     r"line 2: "
                     r"malformed JSON", result.stderr), result.stderr
    path.write_text(json.dumps({"event_ids": [1, 2]}) + "\n")
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", path, "--skip-bad-records",
                        "--output", tmp_path / "d.jsonl", "--output-dir", tmp_path)
    assert result.returncode == 0 and "Skipped 0 bad records (--skip-bad-records)" in result.stdout


def test_a_missing_input_to_detect_leaves_no_output_file(trained, tmp_path):
    output = tmp_path / "verdicts.jsonl"
    result = run_script("detect.py", "--checkpoint", trained[1] / "checkpoints" / "best_model.pt",
                        tmp_path / "missing", "--output", output)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'missing'}: no such file or directory\n"
    assert not output.exists()


def test_the_report_says_each_thing_one_way(trained):
    """Rates in one unit (percent), and a record rule is 'on, in combined' only where 'combined' takes it
    (never 'on' beside a 'left out' further down)."""
    out = trained[1]
    report = next(out.glob("evaluation_report_*.txt")).read_text()
    calibration = json.loads((out / "calibration.json").read_text())
    assert "target 0.05%" in report and not re.search(r"target (FPR )?0\.\d+[^\d%]", report)
    for rule, name in (("event_set", "Event-set"), ("event_pair", "Event-pair")):
        state = re.search(rf"{name} rule: (.+?)(    |\n)", report).group(1)
        assert state == ("on, in 'combined'" if rule in calibration["combined_rules"] else
                         "on alone, left out of 'combined'" if calibration[f"{rule}_rule"] else state)


def test_score_panels_show_where_the_data_is_and_count_in_plain_numbers(tmp_path):
    """The x range follows the bins that hold sessions and the thresholds (a bar at its edge stays in view,
    never squeezed into a sliver of a fixed 0..1 axis); counts read 1, 10, 100, or whole numbers when few."""
    histograms = {"normal": {"score": np.zeros(len(E.SCORE_EDGES) - 1)}}
    histograms["normal"]["score"][[0, 3]] = [162, 4]          # most sessions at score 0
    low, high = E.data_range(E.SCORE_EDGES, histograms, "score", [0.0])
    assert low < 0 < E.SCORE_EDGES[4] < high < 0.2
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (many, few) = plt.subplots(1, 2)
    many.bar([0, 1], [1, 500]), many.set_yscale("log")
    few.bar([0, 1], [1, 5]), few.set_yscale("log")
    E.plain_counts(many), E.plain_counts(few)
    figure.canvas.draw()
    labels = [t.get_text() for t in many.get_yticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"[\d.]+", text) for text in labels)   # no 2x10^0, no mathtext
    assert few.get_yscale() == "linear" and few.get_ylim()[0] == 0
    plt.close(figure)


@pytest.mark.parametrize("cache", [True, False])
def test_an_empty_calibration_half_is_named_and_warned_not_hidden(tmp_path, caplog, cache):
    """Tiny data whose calibration half holds no session: the thresholds are fitted on the evaluation half,
    and the source the report prints says so (not "calibration half"), with a WARNING."""
    import logging

    from config import load_config, reader_options
    from dataset import CALIBRATION, split_classes
    data = tmp_path / "d.txt"
    sides = split_classes(str(data), np.arange(1, 201), 42, 0.2)
    data.write_text("".join("\n" if side == CALIBRATION else "1 2 3\n" for side in sides.tolist()))
    config = load_config(None, {"data.preprocessed_dir": str(data), "data.validation_split": 0.2,
                                "training.seed": 42, "lazy_loading.cache": cache,
                                "lazy_loading.cache_dir": str(tmp_path / "cache")})
    with caplog.at_level(logging.WARNING):
        chunks, source, _, _ = E.calibration_sessions(config, reader_options(config), logging.getLogger("t"))
    assert sum(map(len, chunks)) == int((sides == 2).sum()) > 0           # the evaluation half's sessions
    assert "(the evaluation half, as the calibration half is empty: not held out)" in source
    assert "holds no normal session" in caplog.text


def test_the_report_never_names_abnormal_data_it_did_not_find():
    """Abnormal data named (label 1 in the training data) but none there: the header says so, beside the
    section that says there was none; and a share flagged on a few calibration sessions is marked as such."""
    results = {"data": {"normal": "n", "abnormal": "label 1 in x.jsonl"}, "false_positive_rate": {}}
    assert E.abnormal_data(results) == "label 1 in x.jsonl (none found there)"
    assert E.abnormal_data({**results, "rules": {}}) == "label 1 in x.jsonl"
    from calibration import FEW_TO_MEASURE, rule_summary
    calibration = E.fit_calibration(fixed_model(), _chunks(Counter({(0, 1): 3})), 2, 5, 0.25, "hand",
                                    "probability")
    assert calibration["sessions"] < FEW_TO_MEASURE
    assert "sessions flagged (too few to measure a rate)" in rule_summary(calibration, "probability")


def test_evaluation_data_with_ids_up_to_2_63_scores_them_as_unknown(trained, tmp_path):
    """IDs far beyond the vocabulary in the data evaluated (not trained on): scored as unknown events (the
    token cache's evaluation entries hold 64-bit IDs), never refused as beyond a vocabulary."""
    _, out, _, abnormal_dir, _ = trained
    data = tmp_path / "huge.jsonl"
    data.write_text('{"event_ids": [1, 9223372036854775807, 2]}\n{"event_ids": [1, 2, 3]}\n')
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt",
                        "--data-dir", data, "--abnormal-dir", abnormal_dir, "--output-dir", tmp_path / "e")
    assert result.returncode == 0, result.stderr
    results = json.loads(next((tmp_path / "e").glob("evaluation_results_*.json")).read_text())
    assert results["unknown_events"]["normal"] == 1 and results["normal_scores"]["count"] == 2
