"""Scores, metrics and thresholds on hand-made cases; reports; detection; evaluate.py end to end."""
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

import evaluate as E
from conftest import HDFS_DIR, needs_hdfs, run_script, write_config
from model import DeepLog


def fixed_model(vocab_size=5):
    """A model whose prediction ignores the input: class c has rank c (class 0 best, end-of-session last)."""
    model = DeepLog(vocab_size, embedding_dim=4, hidden_size=4, num_layers=1, dropout=0.0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(model.num_classes, 0, -1, dtype=torch.float))
    return model.eval()


def test_anomaly_score_counts_start_and_end_predictions():
    model = fixed_model()        # 6 classes: events 0..4 and end (5), ranked 0..5
    # [0, 3]: predictions 0 (hit at k=2), 3 (miss), end (miss) -> 2 of 3
    # [1]:    predictions 1 (hit), end (miss)                  -> 1 of 2
    scores = model.calculate_anomaly_score([[0, 3], [1]], top_k=2)
    assert scores.tolist() == pytest.approx([2 / 3, 1 / 2])
    assert model.calculate_anomaly_score([0, 3], top_k=2).tolist() == pytest.approx([2 / 3])
    padded = torch.tensor([[0, 3], [1, -1]])
    assert model.calculate_anomaly_score(padded, top_k=2).tolist() == pytest.approx([2 / 3, 1 / 2])
    assert model.calculate_anomaly_score([[0, 3]], top_k=6).tolist() == [0.0]   # every class in the top 6


def test_unknown_and_unseen_events_are_misses_at_every_k():
    model = fixed_model()
    assert model.calculate_anomaly_score([[0, 9]], top_k=6).tolist() == pytest.approx([1 / 3])  # 9 >= vocab
    # ID 5 == vocab_size is unknown, not the end-of-session class (5): a miss even at k = 6
    assert model.calculate_anomaly_score([[5]], top_k=6).tolist() == pytest.approx([1 / 2])
    assert model.diagnose([[0, 9]], top_k=2)[0][0]["actual"] == 9
    model.seen_events[2] = False      # event 2 never occurred in training
    assert model.calculate_anomaly_score([[2]], top_k=6).tolist() == pytest.approx([1 / 2])
    ranks, log_probs = model.prediction_ranks(*model.encode([[2, 9]]))
    assert ranks.tolist() == [[6, 6, 5]] and math.isinf(log_probs[0, 0]) and math.isinf(log_probs[0, 1])


def test_diagnose_names_position_actual_and_expected():
    model = fixed_model()
    report = model.diagnose([[0, 3]], top_k=2)
    assert report == [[
        {"position": 1, "actual": 3, "probability": pytest.approx(math.exp(3) / sum(math.exp(i) for i in range(1, 7))),
         "expected": [0, 1]},
        {"position": 2, "actual": "<end>", "probability": pytest.approx(math.exp(1) / sum(math.exp(i) for i in
                                                                                          range(1, 7))),
         "expected": [0, 1]}]]
    assert len(model.diagnose([[0, 3]], top_k=2, max_misses=1)[0]) == 1


def test_score_sessions_columns():
    model = fixed_model()
    scores = E.score_sessions(model, [(0, 3), (1,)], [1, 2], event_sets={frozenset({0, 3})})
    assert scores["predictions"].tolist() == [3, 2]
    assert scores["misses_at_1"].tolist() == [2, 2] and scores["misses_at_2"].tolist() == [2, 1]
    assert scores["max_rank"].tolist() == [5, 5]
    assert scores["novel_set"].tolist() == [0, 1]
    log_z = math.log(sum(math.exp(i) for i in range(1, 7)))
    assert scores["min_log_prob"][0] == pytest.approx(1 - log_z)             # the end, ranked last
    assert scores["loss_sum"][0] == pytest.approx(3 * log_z - (6 + 3 + 1))


def test_weighted_percentile_counts_duplicates():
    values, weights = np.array([0.0, 0.5, 1.0]), np.array([97.0, 2.0, 1.0])
    assert E.weighted_percentile(values, weights, 90) == 0.0
    assert E.weighted_percentile(values, weights, 98) == 0.5
    assert E.weighted_percentile(values, weights, 99) == 0.5
    assert E.weighted_percentile(values, weights, 100) == 1.0


def test_confusion_weights_every_session_by_its_count():
    metrics = E.confusion(np.array([True, False]), np.array([2.0, 8.0]),
                          np.array([True, False, True]), np.array([5.0, 1.0, 4.0]))
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (9, 2, 8, 1)
    assert metrics["precision"] == pytest.approx(9 / 11) and metrics["recall"] == pytest.approx(0.9)
    assert metrics["fpr"] == pytest.approx(0.2)
    assert metrics["f1"] == pytest.approx(2 * (9 / 11) * 0.9 / (9 / 11 + 0.9))


def test_calibration_and_rules_on_hand_made_sessions():
    model = fixed_model()
    normal = Counter({(0, 1): 9, (0,): 1})       # scores at k=2: 1/3 (end missed), 1/2
    calibration = E.fit_calibration(model, normal, top_k=2, top_g=5, margin=0.5, source="hand",
                                    default_rule="combined", event_sets={frozenset({0, 1}), frozenset({0})})
    assert calibration["score_thresholds"] == {"p90": pytest.approx(1 / 3), "p95": 0.5, "p99": 0.5}
    log_z = math.log(sum(math.exp(i) for i in range(1, 7)))
    assert calibration["least_likely_normal_log_prob"] == pytest.approx(1 - log_z)
    assert calibration["probability_bound"] == pytest.approx(1 - log_z + math.log(0.5))
    assert calibration["flagged_on_calibration"]["score_p90"] == pytest.approx(0.1)
    assert calibration["flagged_on_calibration"]["combined"] == 0.0

    abnormal = Counter({(0, 1): 2, (2, 3, 4): 3, (7,): 1})
    results, _ = E.evaluate(model, calibration, normal, abnormal, top_k=2, default_rule="combined",
                            event_sets={frozenset({0, 1}), frozenset({0})})
    rules = results["rules"]
    # (0, 1) looks normal to every rule; (2, 3, 4) and (7,) are novel event sets; (7,) is beyond the vocabulary
    assert (rules["event_set"]["tp"], rules["event_set"]["fn"], rules["event_set"]["fp"]) == (4, 2, 0)
    assert (rules["probability"]["tp"], rules["probability"]["fn"]) == (1, 5)
    assert (rules["score_p90"]["tp"], rules["score_p90"]["fp"]) == (4, 1)   # score 1/2 > 1/3 for (0,)
    assert rules["top_g"]["tp"] == 6 and rules["top_g"]["fp"] == 10         # the end always ranks 5 >= g
    assert results["default"] == {"rule": "combined", **rules["combined"]}
    assert results["next_event"]["total_predictions"] == 9 * 3 + 2
    assert results["next_event"]["top1_accuracy"] == pytest.approx(10 / 29)
    assert results["normal_scores"]["count"] == 10 and results["normal_scores"]["distinct"] == 2
    assert results["normal_scores"]["mean"] == pytest.approx((9 / 3 + 1 / 2) / 10)
    assert results["unknown_events"] == {"normal": 0, "abnormal": 1}


def test_thresholds_fitted_at_another_k_are_refused():
    model = fixed_model()
    calibration = E.fit_calibration(model, Counter({(0,): 1}), 2, 5, 0.5, "hand", "combined")
    with pytest.raises(E.utils.ConfigError, match="fitted at top_k=2"):
        E.evaluate(model, calibration, Counter({(0,): 1}), Counter(), top_k=3, default_rule="combined")


def test_report_names_never_overwrite(tmp_path):
    first = E.report_paths(tmp_path, None)[0]
    first.write_text("{}")
    second = E.report_paths(tmp_path, None)[0]
    second.write_text("{}")
    third = E.report_paths(tmp_path, None)[0]
    assert len({first, second, third}) == 3
    assert re.fullmatch(r"evaluation_results_\d{8}\.json", first.name)
    assert re.fullmatch(r"evaluation_results_\d{8}_\d{6}\.json", second.name)
    assert E.report_paths(tmp_path, "dev")[0].name.endswith("_dev.json")


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
    root, out, data, abnormal_dir, result = trained
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    calibration = json.loads((out / "calibration.json").read_text())
    assert checkpoint["calibration"] == calibration
    assert calibration["top_k"] == 10 and "calibration half" in calibration["source"]
    assert checkpoint["event_sets"] and all(isinstance(s, list) for s in checkpoint["event_sets"])
    report_json, = out.glob("evaluation_results_*.json")
    results = json.loads(report_json.read_text())
    for m in results["rules"].values():
        assert m["tp"] + m["fn"] == 60 and m["fp"] + m["tn"] == results["normal_scores"]["count"]
    assert results["default"]["rule"] == "combined"
    assert 0 < results["next_event"]["top1_accuracy"] <= results["next_event"]["top5_accuracy"] <= 1
    report_text, = out.glob("evaluation_report_*.txt")
    assert "DETECTION" in report_text.read_text() and "combined" in report_text.read_text()
    assert ("matplotlib not installed" in result.stdout) != (out / "score_distribution.png").exists()


def test_evaluate_cli_on_given_data_uses_stored_thresholds(trained, tmp_path):
    root, out, data, abnormal_dir, _ = trained
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--data-dir", data,
                        "--abnormal-dir", abnormal_dir, "--output-dir", tmp_path, "--tag", "t")
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(next(tmp_path.glob("evaluation_results_*_t.json")).read_text())
    stored = json.loads((out / "calibration.json").read_text())
    assert results["calibration"] == stored
    assert results["normal_scores"]["count"] == 240 and results["abnormal_sessions"]["count"] == 60
    assert results["rules"]["combined"]["recall"] > 0.5   # it detects something on its own data


def test_calibrate_on_refits_and_saves(trained, tmp_path):
    import random

    import generate_sample
    root, out, data, abnormal_dir, _ = trained
    quiet_day = tmp_path / "quiet_day.txt"   # other normal sessions than the ones scored
    rng = random.Random(999)
    quiet_day.write_text("".join(" ".join(map(str, generate_sample.normal_session(rng))) + "\n" for _ in range(100)))
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--data-dir", data,
                        "--output-dir", tmp_path, "--calibrate-on", quiet_day, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["source"] == str(quiet_day) and calibration["top_k"] == 3 and calibration["sessions"] == 100
    results = json.loads(next(tmp_path.glob("evaluation_results_*.json")).read_text())
    assert results["calibration"] == calibration and "false_positive_rate" in results


def test_detect_writes_one_line_per_session(trained, tmp_path):
    root, out, data, abnormal_dir, _ = trained
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
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt", "--detect", sessions)
    assert [json.loads(line)["session_id"] for line in result.stdout.splitlines()] == ["same1", "same2", "alien"]


def test_detect_streams_in_chunks_with_the_same_verdicts(trained, tmp_path):
    root, out, data, _, _ = trained
    model, checkpoint = E.load_model(out / "checkpoints" / "best_model.pt", torch.device("cpu"))
    outputs = []
    for chunk_size in (7, 10000):
        path = tmp_path / f"d{chunk_size}.jsonl"
        with open(path, "w") as handle:
            E.detect(model, checkpoint["calibration"], data, {}, "combined", handle,
                     event_sets=E.known_event_sets(checkpoint), chunk_size=chunk_size)
        outputs.append(path.read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 240


def test_from_checkpoint_and_the_manual_route_agree(trained):
    root, out, *_ = trained
    path = out / "checkpoints" / "best_model.pt"
    model = DeepLog.from_checkpoint(path, map_location="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    manual = DeepLog(**checkpoint["model_args"])
    manual.load_state_dict(checkpoint["model_state_dict"])
    manual.eval()
    batch = [[1, 2, 2, 3], [1, 2]]
    assert torch.equal(model.calculate_anomaly_score(batch, top_k=3), manual.calculate_anomaly_score(batch, top_k=3))
    assert model.calibration == checkpoint["calibration"]


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "checkpoint not found"),
    (lambda p: p.write_bytes(b"\x00garbage"), "not a readable checkpoint"),
    (lambda p: torch.save({"something": 1}, p), "not a DeepLog checkpoint"),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, make, message):
    path = tmp_path / "x.pt"
    make(path)
    result = run_script("evaluate.py", "--checkpoint", path)
    assert result.returncode == 2 and message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_checkpoint_of_another_vocab_and_unreadable_data(trained, tmp_path):
    root, out, data, _, _ = trained
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
    root, out, data, abnormal_dir, _ = trained
    checkpoint = out / "checkpoints" / "best_model.pt"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--data-dir", data, "--calibrate-on", data,
                        "--output-dir", tmp_path)
    assert result.returncode == 2 and "is also the data being scored" in result.stdout + result.stderr
    (tmp_path / "c.json").write_text('{"top_k": 10}')
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--calibration", tmp_path / "c.json",
                        "--output-dir", tmp_path)
    assert result.returncode == 2 and "not a calibration.json (missing probability_bound, score_thresholds, " \
        "top_g)" in result.stdout + result.stderr
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", data, "--output", "/nonexistent/x")
    assert result.returncode == 2 and "--output /nonexistent/x: cannot write" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@needs_hdfs
def test_hdfs_end_to_end_small(tmp_path):
    """A small, fast version of benchmarks/hdfs.py: the pipeline works on the real benchmark data."""
    config = write_config(tmp_path / "c.yaml", {
        "training": {"evaluate_after_training": True, "epochs": 2, "batch_size": 64, "learning_rate": 0.01},
        "data": {"abnormal_dir": None}})
    out = tmp_path / "out"
    result = run_script("train.py", "--config", config, "--data-dir", HDFS_DIR / "hdfs_train", "--output-dir", out)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_script("evaluate.py", "--checkpoint", out / "checkpoints" / "best_model.pt",
                        "--data-dir", HDFS_DIR / "hdfs_dev_normal", "--abnormal-dir", HDFS_DIR / "hdfs_dev_abnormal",
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
    scores = E.score_sessions(fixed_model(), [(0, 3), (1,)], [2])
    calibration = {"top_k": 2, "score_thresholds": {"p90": 0.1, "p95": 0.2, "p99": 0.3}, "probability_bound": -5.0}
    return (scores, np.array([3.0, 1.0]), scores, np.array([1.0, 1.0])), {"calibration": calibration, "top_k": 2}


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
