"""The sweep of the training data (sweep.py): the robust cut, the suspicious sets, the cleaned records, the
suspicious-sessions file, the rates it adds, and train.py end to end with unlabelled anomalies mixed in."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_script, write_config

import calibration as cal
import sweep
from checkpoint import count_vectors_from_state, count_vectors_state
from dataset import Record
from rules import CoOccurrence, CountVectors, pairs_of_sets


class FixedScorer:
    """A stand-in for scoring.ChunkScorer: each session's least likely prediction has the surprisal given
    by `surprisal[session]` (a dict keyed by the session tuple)."""

    def __init__(self, surprisal: dict):
        self.surprisal = surprisal

    def __call__(self, chunk):
        counts = {}
        for session in chunk:
            counts[tuple(session)] = counts.get(tuple(session), 0) + 1
        distinct = list(counts)
        scores = {"min_log_prob": np.array([-self.surprisal[s] for s in distinct]),
                  "loss_sum": np.array([self.surprisal[s] / 2 * len(s) for s in distinct]),
                  "loss_count": np.array([float(len(s)) for s in distinct])}
        return distinct, scores, np.array(list(counts.values()), dtype=float)


def _hand_made():
    """1,000 sessions of set {1, 2} and 100 of {1, 3}, surprisal spread over 1-3 nats; 10 of {1, 4} at 9 nats
    (the anomaly); {1, 5}: 1 session at 9 nats and 3 at 1.5 (a normal set with one odd session)."""
    rng = np.random.default_rng(0)
    sessions, surprisal = [], {}

    def add(session, value, times=1):
        surprisal[session] = value
        sessions.extend([list(session)] * times)

    for i in range(1000):
        add((1, 2) + (2,) * (i % 50), float(rng.uniform(1, 3)) if i % 50 else 2.0)
    for i in range(100):
        add((1, 3) + (3,) * i, float(rng.uniform(1, 3)))
    add((1, 4), 9.0, 10)
    add((1, 5, 5, 5), 9.0)
    add((1, 5), 1.5, 3)
    return sessions, surprisal


def test_histogram_median_and_mad_match_numpy():
    values = np.random.default_rng(1).normal(5, 2, 5000).clip(0, 50)
    histogram = sweep.Histogram()
    histogram.add(values, np.ones_like(values))
    median = histogram.median()
    assert abs(median - np.median(values)) <= sweep.BIN
    assert abs(histogram.mad(median) - np.median(np.abs(values - np.median(values)))) <= 2 * sweep.BIN
    assert histogram.total == 5000 and histogram.above(median) == pytest.approx(2500, abs=30)


def test_sweep_finds_the_rare_unlikely_set_and_keeps_normal_ones():
    sessions, surprisal = _hand_made()
    found = sweep.sweep(FixedScorer(surprisal), [sessions[:500], sessions[500:]], by_sets=True, classes=1000)
    assert found.suspicious_sets == {frozenset({1, 4})}     # {1, 5}: one session of four beyond the cut
    assert found.sessions == len(sessions) and found.suspicious == 10
    assert found.share == pytest.approx(10 / len(sessions))
    # the cut is the median + 4 scaled MADs of all sessions: the 11 sessions at 9 nats do not move it
    values = np.array([surprisal[tuple(s)] for s in sessions])
    median = np.median(values)
    expected = median + sweep.SPREAD * 1.4826 * np.median(np.abs(values - median))
    assert abs(found.cut - expected) < 0.1 and found.cut < 9
    assert found.flags([[1, 4], [4, 1, 4], [1, 2], [1, 5, 5, 5]]).tolist() == [True, True, False, False]
    kept = [s for chunk in found.kept([sessions]) for s in chunk]
    assert len(kept) == len(sessions) - 10 and [1, 4] not in kept


def test_sweep_session_by_session_without_a_record_of_sets():
    sessions, surprisal = _hand_made()
    found = sweep.sweep(FixedScorer(surprisal), [sessions], by_sets=False, classes=1000)
    assert found.suspicious_sets is None and found.suspicious == 11     # {1, 4} x 10 and (1, 5, 5, 5)
    assert found.flags([[1, 5, 5, 5], [1, 5], [1, 4]]).tolist() == [True, False, True]


def test_cleaned_records_drop_the_suspicious_sets_and_the_pairs_only_they_held():
    sessions, surprisal = _hand_made()
    found = sweep.sweep(FixedScorer(surprisal), [sessions], by_sets=True, classes=1000)
    sets = [{1, 2}, {1, 3}, {1, 4}, {1, 5}, {2, 3}]
    records = CoOccurrence(10, sets, pairs_of_sets(sets, 10))
    cleaned = found.cleaned(records)
    assert cleaned.sets == {frozenset(s) for s in sets} - {frozenset({1, 4})}
    assert set(cleaned.pairs.tolist()) == set(records.pairs.tolist()) - {1 * 10 + 4}
    assert found.removed_sets == 1
    assert cleaned.novel([[1, 4], [1, 2]])[0].tolist() == [1.0, 0.0]
    assert found.cleaned(CoOccurrence(10, None, None)).sets is None     # nothing recorded: nothing to clean


def test_clean_data_sweeps_nothing_but_its_far_tail():
    """Sessions all drawn from one distribution: the cut lies beyond almost all of them."""
    rng = np.random.default_rng(2)
    surprisal = {(1, 2) + (2,) * i: float(v) for i, v in enumerate(rng.gamma(4, 0.4, 2000))}
    found = sweep.sweep(FixedScorer(surprisal), [[list(s) for s in surprisal]], by_sets=False, classes=1000)
    assert found.share < 0.01


def test_suspicious_sessions_file(tmp_path, monkeypatch):
    sessions, surprisal = _hand_made()
    found = sweep.sweep(FixedScorer(surprisal), [sessions], by_sets=True, classes=1000)
    records = [Record("data/a.jsonl", i + 1, f"s{i}", s, 0) for i, s in enumerate(sessions)]
    path = tmp_path / sweep.FILE_NAME
    assert sweep.write_suspicious(found, records, path, tmp_path) == 10
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["record"] for r in rows] == [i + 1 for i, s in enumerate(sessions) if s == [1, 4]]
    assert rows[0]["session_id"] == f"s{rows[0]['record'] - 1}" and rows[0]["file"] == "data/a.jsonl"
    assert rows[0]["surprisal"] == 9.0 and rows[0]["event_ids"] == [1, 4] and rows[0]["rule"] == "sweep"
    monkeypatch.setattr(sweep, "MAX_LISTED", 3)
    assert sweep.write_suspicious(found, records, path, tmp_path) == 3
    assert len(path.read_text().splitlines()) == 3


def test_the_swept_share_is_added_to_the_record_rules_expected_rates():
    base = {"target_fpr": 0.001, "training_sessions": 1000, "sessions": 100, "count_vector_distance": 3.0,
            "novelty_on_training": {"event_type": 0, "event_set": 0, "event_pair": 0},
            "combined_rules": ["probability", "event_set", "event_pair"], "training_sweep": None}
    before = cal.expected_rates(base)
    summary = {"sessions": 1000, "suspicious_sessions": 20, "share": 0.02, "cut": 5.0, "median": 1.0,
               "mad": 0.5, "spread": 4.0, "removed_sets": 3, "count_outliers": 0, "by_sets": True,
               "informed": True, "file": sweep.FILE_NAME}
    after = cal.expected_rates({**base, "training_sweep": summary})
    assert after["probability"] == before["probability"]
    for rule in ("event_set", "event_pair", "count_vector", "combined"):
        assert after[rule] == pytest.approx(before[rule] + 0.02)


def _write(path, sessions, start=0):
    path.write_text("".join(json.dumps({"event_ids": s, "session_id": f"t{start + i}"}) + "\n"
                            for i, s in enumerate(sessions)))


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory, sample_sessions):
    """train.py on 240 normal sessions with 6 abnormal ones mixed in unlabelled, once with the sweep (the
    default) and once with data.assume_clean true."""
    root = tmp_path_factory.mktemp("contaminated")
    normal, abnormal = sample_sessions
    data = root / "data"
    data.mkdir()
    mixed = normal[:120] + abnormal[:6] + normal[120:]
    _write(data / "s.jsonl", mixed)
    runs = {}
    for name, clean in (("sweep", False), ("clean", True)):
        config = write_config(root / f"{name}.yaml", {
            "training": {"evaluate_after_training": True, "epochs": 4, "learning_rate": 0.01},
            "data": {"validation_split": 0.3, "abnormal_dir": None, "assume_clean": clean}})
        out = root / name
        result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", out)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = (out, result)
    return runs, mixed, abnormal[:6]


def test_training_sweeps_its_data_and_lists_what_looks_abnormal(contaminated):
    runs, mixed, mixed_in = contaminated
    out, result = runs["sweep"]
    rows = [json.loads(line) for line in (out / sweep.FILE_NAME).read_text().splitlines()]
    listed = [r["event_ids"] for r in rows]
    found = sum(s in listed for s in mixed_in)
    assert found >= 5, (found, listed)
    assert len(rows) <= 0.15 * len(mixed)     # and the tail of a tiny model on tiny data, not all
    for row in rows:
        assert mixed[row["record"] - 1] == row["event_ids"] and row["session_id"] == f"t{row['record'] - 1}"
    calibration = json.loads((out / "calibration.json").read_text())
    swept = calibration["training_sweep"]
    assert swept["suspicious_sessions"] == len(rows) and swept["sessions"] == len(mixed)
    log = (out / "training.log").read_text()
    assert "Training-data sweep:" in log
    assert f"of the {len(mixed)} normal-labelled sessions of the training data" in log
    assert "look abnormal, more than the target false-positive rate allows" in log   # 2%+ > 2 x 0.05%
    report, = out.glob("evaluation_report_*.txt")
    section = report.read_text().split("TRAINING DATA")[1]
    assert f"{len(rows)} of the {len(mixed)} normal-labelled sessions of the training data" in section
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    recorded = {frozenset(s) for s in checkpoint["event_sets"]}
    assert not any(frozenset(s) in recorded for s in mixed_in if s in listed)
    # the stated rate of combined holds the swept share on top of what the records alone would state
    assert calibration["expected_fpr"]["combined"] >= swept["share"]


def test_assume_clean_keeps_todays_behaviour(contaminated):
    runs, mixed, mixed_in = contaminated
    out, _ = runs["clean"]
    assert not (out / sweep.FILE_NAME).exists()
    assert json.loads((out / "calibration.json").read_text())["training_sweep"] is None
    assert "Training-data sweep" not in (out / "training.log").read_text()
    report, = out.glob("evaluation_report_*.txt")
    assert "not swept (data.assume_clean true" in report.read_text()
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    recorded = {frozenset(s) for s in checkpoint["event_sets"]}
    # the anomalies' sets in the training split are recorded as normal, as before the sweep
    assert sum(frozenset(s) in recorded for s in mixed_in) >= 1


def test_count_vector_outliers_leave_the_record_unless_most_sessions_repeat():
    found = sweep.Sweep(FixedScorer({}), 5.0, 1.0, 0.5, 31, set(), 0)
    rng = np.random.default_rng(3)
    # distinct normal sessions a few events from each other, one with 40 extra events of another type
    normal = [[1] * int(n) + [2] * int(m) for n, m in rng.integers(5, 15, size=(60, 2))]
    normal = [list(s) for s in {tuple(s) for s in normal}]
    odd = [1] * 10 + [3] * 40
    counts = CountVectors.from_chunks([normal + [odd]])
    trimmed = found.trim_count_outliers(counts)
    assert trimmed.sessions == len(normal) and found.count_outlier_sessions == 1 and found.suspicious == 1
    assert trimmed.nearest([odd])[0] >= 40     # the record no longer holds it
    assert found.flags([odd, normal[0]]).tolist() == [True, False]
    assert found.flags([odd], counts_too=False).tolist() == [False]
    # out of the reference, still in the training data's novelty (it brings a type no other one has),
    # through the checkpoint too
    assert trimmed.novelty(10) == counts.novelty(10) and counts.novelty(10)["event_type"] == 1
    back = count_vectors_from_state(count_vectors_state(trimmed))
    assert back.sessions == len(normal) and back.held_out.sessions == 1
    assert back.novelty(10) == counts.novelty(10)
    # most sessions repeat another one (HDFS): the MAD is 0 and counts as one event; sessions a few events
    # from the others stay, the odd one goes
    repeated = sweep.Sweep(FixedScorer({}), 5.0, 1.0, 0.5, 0, set(), 0)
    close = [[1, 2]] * 50 + [[1, 2, 2]] * 50 + [[1, 2, 2, 2, 2, 2]]
    counts = CountVectors.from_chunks([close])
    assert repeated.trim_count_outliers(counts) is counts and not repeated.count_outliers
    counts = CountVectors.from_chunks([close + [odd]])
    assert repeated.trim_count_outliers(counts).sessions == 101 and repeated.count_outlier_sessions == 1
    # too few sessions to measure a spread by: nothing is an outlier
    few = sweep.Sweep(FixedScorer({}), 5.0, 1.0, 0.5, 0, set(), 0)
    counts = CountVectors.from_chunks([normal[:sweep.MIN_COUNT_SESSIONS - 2] + [odd]])
    assert few.trim_count_outliers(counts) is counts and not few.count_outliers


def test_a_model_that_learned_nothing_sweeps_nothing():
    """A mean loss near ln(classes): the model guesses, and a robust cut over its scores would only pick
    noise. (The stand-in's loss per event is half the session's surprisal: about 1 nat here.)"""
    sessions, surprisal = _hand_made()
    found = sweep.sweep(FixedScorer(surprisal), [sessions], by_sets=True, classes=3)   # 0.75 ln 3 = 0.82
    assert not found.informed and found.suspicious == 0 and found.suspicious_sets == set()
    assert not found.flags([[1, 4]]).any()
    assert "learned too little to tell" in sweep.describe(found.summary(), "x.jsonl")


def test_suspicious_sessions_from_raw_logs_carry_their_raw_lines(tmp_path):
    """Sessions written by preprocess.py know their lines ("lines" runs, sources.json beside them): the file
    shows the raw lines behind each suspicious session."""
    raw = tmp_path / "app.log"
    raw.write_text("".join(f"line {n} of the log\n" for n in range(1, 11)))
    data = tmp_path / "sessions"
    data.mkdir()
    (data / "sources.json").write_text(json.dumps({"files": [str(raw)]}))
    sessions, surprisal = _hand_made()
    found = sweep.sweep(FixedScorer(surprisal), [sessions], by_sets=True, classes=1000)
    records = [Record(str(data / "sessions.jsonl"), 1, "normal", [1, 2], 0, [[0, 1, 2]]),
               Record(str(data / "sessions.jsonl"), 2, "odd", [1, 4], 0, [[0, 4, 1], [0, 8, 1]])]
    path = tmp_path / sweep.FILE_NAME
    assert sweep.write_suspicious(found, records, path, data) == 1
    row, = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["session_id"] == "odd" and row["raw_lines"] == ["line 4 of the log", "line 8 of the log"]


def test_two_odd_sessions_alike_do_not_hide_each_other():
    """Two anomalies 4 events apart and far from the normal sessions: the nearest other session of each is
    the other anomaly (rank 1: 4, like normal noise), the second nearest a normal one (rank 2: far)."""
    rng = np.random.default_rng(5)
    normal = [[1] * int(n) + [2] * int(m) for n, m in rng.integers(5, 9, size=(60, 2))]
    odd = [[1] * 10 + [3] * 30, [1] * 10 + [3] * 34]
    counts = CountVectors.from_chunks([normal + odd])
    rank1, rank2 = counts.leave_one_out(), counts.leave_one_out(rank=2)
    order = {tuple(map(tuple, counts.entries[counts.entries[:, 0] == v, 1:].tolist())): v
             for v in range(len(counts.weights))}
    odd_rows = [order[sweep.count_key(s)] for s in odd]
    assert rank1[odd_rows].tolist() == [4.0, 4.0] and min(rank2[odd_rows]) >= 30
    # rank 2 against brute force: the second smallest L1 distance to the other sessions, repeats included
    sessions = normal + odd
    dense = np.array([[s.count(t) for t in (1, 2, 3)] for s in sessions])
    for i, session in enumerate(sessions):
        others = np.sort(np.abs(np.delete(dense, i, axis=0) - dense[i]).sum(1))
        assert rank2[order[sweep.count_key(session)]] == others[1]
    found = sweep.Sweep(FixedScorer({}), 5.0, 1.0, 0.5, 0, set(), 0)
    trimmed = found.trim_count_outliers(counts)
    assert found.count_outlier_sessions == 2 and trimmed.sessions == len(normal)
    assert found.flags(odd).tolist() == [True, True]
