"""values.py, DeepLog's parameter-value model: event vectors, the robust normaliser, the network's use of
history (context anomalies the per-type baseline cannot see), the threshold, the checkpoint form, and the
stage after training."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_script, write_config

import values as V
from checkpoint import CheckpointError, load_checkpoint, load_model


def test_event_vectors_hold_the_gap_and_the_values_on_a_log_scale():
    vectors = V.event_vectors([10.0, 12.5, None, 20.0], [[200, 0.25], [], [1], []])
    assert vectors.shape == (4, V.SLOTS)
    assert np.isnan(vectors[0, 0]) and vectors[1, 0] == pytest.approx(math.log1p(2.5))
    assert np.isnan(vectors[2, 0]) and np.isnan(vectors[3, 0])     # an unknown time: no gap on either side
    assert vectors[0, 1:3].tolist() == pytest.approx([math.log1p(200), math.log1p(0.25)])
    assert np.isnan(vectors[0, 3:]).all() and np.isnan(vectors[1, 1:]).all()
    assert V.event_vectors(None, [[-3]])[0, 1] == pytest.approx(-math.log1p(3))   # signed
    assert V.from_log_scale(V.log_scale(np.array([-5.0, 0.0, 1e6]))) == pytest.approx([-5, 0, 1e6])


def test_the_normaliser_is_robust_and_floored():
    rng = np.random.default_rng(0)
    sessions = [(np.array([1]), V.event_vectors(None, [[float(rng.normal(1000, 100))]])) for _ in range(400)]
    sessions += [(np.array([1]), V.event_vectors(None, [[1e9]])) for _ in range(8)]   # 2% wild values
    sessions += [(np.array([2]), V.event_vectors(None, [[7.0]])) for _ in range(50)]  # a constant
    normaliser = V.Normaliser.fit(sessions, 4)
    assert V.from_log_scale(normaliser.median[1, 1]) == pytest.approx(1000, rel=0.01)
    assert normaliser.scale[1, 1] == pytest.approx(0.1, rel=0.2)     # the outliers moved neither
    assert normaliser.scale[2, 1] == V.MIN_SCALE
    z = normaliser.normalise(np.array([2, 3, 9]), V.event_vectors(None, [[7.0], [1.0], [1.0]]))
    assert z[0, 1] == 0 and np.isnan(z[1]).all() and np.isnan(z[2]).all()   # never seen, unknown: no z


def synthetic(rng, kind: int, anomalous: bool = False):
    """Event 3's gap is short after event 1 and long after event 2; an anomalous session swaps them."""
    short, long = rng.lognormal(0, 0.3), rng.lognormal(math.log(100), 0.3)
    gap = (long if kind == 0 else short) if anomalous else (short if kind == 0 else long)
    times = [0.0, 0.3, 0.3 + gap, 0.5 + gap]
    return np.array([0, 1 + kind, 3, 4]), V.event_vectors(times, [[], [], [], [float(rng.normal(1000, 50))]])


def test_the_model_sees_a_value_normal_after_one_event_but_not_after_another():
    rng = np.random.default_rng(1)
    train = [synthetic(rng, i % 2) for i in range(1200)]
    calibration = [synthetic(rng, i % 2) for i in range(400)]
    normal = [synthetic(rng, i % 2) for i in range(400)]
    swapped = [synthetic(rng, i % 2, anomalous=True) for i in range(100)]
    normaliser = V.Normaliser.fit(train, 5)
    model = V.ParameterModel(V.ParameterNet(5, 16, 32), normaliser)

    def z_of(sessions):
        return lambda: [(e, normaliser.normalise(e, v).astype(np.float32)) for e, v in sessions]
    history = V.train_net(model, z_of(train), z_of(calibration), 30, 3e-3, 64, 3, 0, lambda _: None)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    model.threshold = V.fit_threshold([model.score(*s)["score"] for s in calibration], 0.01)
    recall = np.mean([model.score(*s)["score"] > model.threshold for s in swapped])
    fpr = np.mean([model.score(*s)["score"] > model.threshold for s in normal])
    base_threshold = V.fit_threshold([V.baseline_score(normaliser, *s) for s in calibration], 0.01)
    base_recall = np.mean([V.baseline_score(normaliser, *s) > base_threshold for s in swapped])
    assert recall >= 0.9 and fpr <= 0.03 and base_recall <= 0.2, (recall, fpr, base_recall)
    found = model.score(*swapped[0])
    assert (found["position"], found["slot"]) == (2, 0)    # event 3's gap, the one that was swapped


def test_the_threshold_leaves_the_target_share_of_normal_scores_above_it():
    scores = list(range(1, 1001))
    assert V.fit_threshold(scores, 0.01) == 990          # 10 of 1,000 above
    assert V.fit_threshold(scores[:50], 0.01) == 50      # fewer than 1 / target: the largest
    assert V.fit_threshold([], 0.01) == math.inf
    # the Gaussian on errors in their own spreads: 3 values judged per session at 0.3% -> each at 0.1%
    errors = np.random.default_rng(0).normal(0, 1, 200_000)
    threshold = V.gaussian_threshold(3, 0.003)
    assert threshold == pytest.approx(3.29, rel=0.01)
    sessions = np.abs(errors[:199_998].reshape(-1, 3)).max(1)
    assert np.mean(sessions > threshold) == pytest.approx(0.003, rel=0.25)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train.py on sessions with times and values (event 3's duration: about 1 s; a few slow sessions
    labelled abnormal)."""
    root = tmp_path_factory.mktemp("values")
    rng = np.random.default_rng(2)
    lines = []
    for i in range(600):
        slow = i % 50 == 0
        duration = rng.lognormal(math.log(30 if slow else 1), 0.2)
        times = [i * 100.0, i * 100.0 + 0.5, i * 100.0 + 0.5 + duration]
        lines.append({"session_id": f"s{i}", "event_ids": [1, 2, 3], "label": int(slow), "times": times,
                      "values": [[], [float(rng.integers(100, 120))], [round(duration, 4)]]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = write_config(root / "c.yaml", {"training": {"epochs": 1, "evaluate_after_training": True},
                                            "data": {"validation_split": 0.3}, "parameter": {"epochs": 15}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", root / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_training_stores_the_parameter_model_and_reports_its_rule(trained):
    checkpoint = trained / "run" / "checkpoints" / "best_model.pt"
    model = load_model(checkpoint)
    assert model.parameter_model is not None and model.parameter_model.threshold > 0
    log = (trained / "run" / "training.log").read_text()
    assert "Parameter model epoch 1/15" in log and "Parameter model: trained in" in log
    report = next((trained / "run").glob("evaluation_report_*.txt")).read_text()
    section = report.split("PARAMETER MODEL")[1]
    results = json.loads(next((trained / "run").glob("evaluation_results_*.json")).read_text())["parameter"]
    assert results["abnormal"]["sessions"] == 12 and results["abnormal"]["flagged"] >= 11   # the slow ones
    assert results["normal"]["flagged"] <= 1 and "e.g. s" in section
    example = results["examples"][0]
    assert example["what"] in ("time since the previous event", "value 1")
    assert example["actual"] > example["expected_range"][1]   # slower than the range expected


def test_a_damaged_parameter_model_is_refused(trained, tmp_path):
    stored = torch.load(trained / "run" / "checkpoints" / "best_model.pt", weights_only=True)
    stored["parameter_model"]["median"] = torch.zeros(3, 2)
    torch.save(stored, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="parameter_model's median must be a tensor"):
        load_checkpoint(tmp_path / "bad.pt")


def test_without_times_or_values_no_parameter_model_is_trained(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("".join("1 2 3\n" for _ in range(200)))
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1, "evaluate_after_training": True}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameter_model" not in torch.load(tmp_path / "run" / "checkpoints" / "best_model.pt",
                                               weights_only=True)
    assert "Parameter model" not in (tmp_path / "run" / "training.log").read_text()


def test_detection_names_the_odd_value_and_the_range_expected(trained, tmp_path):
    """detect.py: a session whose step took 30 times its usual time is abnormal under 'combined', its line
    saying which event, which value, what it was and the range expected; the usual ones are normal."""
    sessions = tmp_path / "new.jsonl"
    lines = [{"session_id": "slow", "event_ids": [1, 2, 3], "times": [0.0, 0.5, 30.5],
              "values": [[], [110.0], [30.0]]},
             {"session_id": "usual", "event_ids": [1, 2, 3], "times": [0.0, 0.5, 1.5],
              "values": [[], [110.0], [1.0]]}]
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_script("detect.py", "--checkpoint", trained / "run" / "checkpoints" / "best_model.pt",
                        sessions, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    output = (tmp_path / "out.jsonl").read_text().splitlines()
    verdicts = {v["session_id"]: v for v in map(json.loads, output)}
    assert verdicts["usual"]["verdict"] == "normal" and "parameter" not in verdicts["usual"]
    slow = verdicts["slow"]
    assert slow["verdict"] == "abnormal" and slow["event_ids"] == [1, 2, 3]
    found = slow["parameter"]
    assert (found["position"], found["event"]) == (2, 3) and found["actual"] == 30.0
    assert found["what"] in ("time since the previous event", "value 1")
    low, high = found["expected_range"]
    assert low < 1.0 < high < 30.0


def test_the_sessions_the_sweep_found_suspicious_are_not_trained_on(tmp_path):
    """values.records_of leaves out what the training-data sweep names (evaluate.parameter_stage passes
    Sweep.flags): contamination handling applies to the parameter model too."""
    from config import load_config
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"event_ids": [1, 2, 3] if i % 10 == 0 else [1, 2],
                                        "times": [0.0, 1.0, 2.0][:3 if i % 10 == 0 else 2]}) + "\n"
                            for i in range(300)))
    config = load_config(None, {"data.preprocessed_dir": str(data), "data.validation_split": 0.2})
    kept = [r.event_ids for r in V.records_of(config, (V.TRAIN,))]
    assert [1, 2, 3] in kept and len(kept) > 200
    left = [r.event_ids for r in V.records_of(config, (V.TRAIN,), leave_out=lambda e: len(e) == 3)]
    assert [1, 2, 3] not in left and len(left) == kept.count([1, 2])


def test_live_detection_of_whole_sessions_gives_the_batch_parameter_verdicts(trained, tmp_path):
    """detect.py --follow on sessions with times and values (JSON lines on standard input): the verdicts
    and what the parameter rule found, as the batch run gives them."""
    import subprocess
    import sys

    from conftest import REPO
    lines = [{"session_id": f"s{i}", "event_ids": [1, 2, 3], "times": [0.0, 0.5, 0.5 + duration],
              "values": [[], [110.0], [duration]]} for i, duration in enumerate([1.0, 30.0, 1.2, 25.0, 0.9])]
    sessions = tmp_path / "new.jsonl"
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    checkpoint = trained / "run" / "checkpoints" / "best_model.pt"
    out = tmp_path / "batch.jsonl"
    result = run_script("detect.py", "--checkpoint", checkpoint, sessions, "--output", out)
    assert result.returncode == 0, result.stderr
    batch = {v["session_id"]: v for v in map(json.loads, out.read_text().splitlines())}
    live = subprocess.run([sys.executable, str(REPO / "detect.py"), "--checkpoint", str(checkpoint), "-",
                           "--follow"], cwd=REPO, input=sessions.read_text(), capture_output=True, text=True,
                          timeout=300)
    assert live.returncode == 0, live.stderr[-2000:]
    verdicts = {v["session_id"]: v for v in map(json.loads, live.stdout.splitlines()) if "verdict" in v}
    assert sorted(verdicts) == sorted(batch) == [f"s{i}" for i in range(5)]
    assert [verdicts[s]["verdict"] for s in sorted(batch)] == [batch[s]["verdict"] for s in sorted(batch)]
    assert [batch[s]["verdict"] for s in ("s1", "s3")] == ["abnormal", "abnormal"]
    for name, verdict in verdicts.items():
        drop = {"at", "raw"}   # live names the JSON line, batch the raw log line where it has one
        assert {k: v for k, v in verdict.get("parameter", {}).items() if k not in drop} == \
            {k: v for k, v in batch[name].get("parameter", {}).items() if k not in drop}


def test_the_python_verdict_takes_times_and_values_as_detect_does(trained):
    from scoring import verdict
    model = load_model(trained / "run" / "checkpoints" / "best_model.pt")
    sessions = [[1, 2, 3], [1, 2, 3]]
    times = [[0.0, 0.5, 30.5], [0.0, 0.5, 1.5]]
    values = [[[], [110.0], [30.0]], [[], [110.0], [1.0]]]
    assert verdict(model, sessions, times=times, values=values) == ["abnormal", "normal"]
    assert verdict(model, sessions) == ["normal", "normal"]                     # the key model alone
    assert verdict(model, sessions, "probability", times, values) == ["normal", "normal"]   # not 'combined'
    found = model.parameter_model.odd(sessions[0], times[0], values[0])
    assert found["position"] == 2 and found["actual"] == 30.0
