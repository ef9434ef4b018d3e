"""Calibration on little data: confidence bounds, the count-vector record and rule, the rules `combined` keeps
from the training data's own novelty, and the false-positive rates a run states."""
import itertools
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO, fixed_model, hand_calibration, run_script, write_config

import calibration as C
import evaluate as E
from checkpoint import CheckpointError, count_vectors_from_state, count_vectors_state, load_checkpoint
from model import DeepLog
from rules import CoOccurrence, CountVectors, count_entries, pairs_of_sets, verdicts

SEQUENCES = REPO.parent / "shared" / "data" / "sequences"


def _tail(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(n, p), summed exactly."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k,n", [(0, 1), (0, 50), (1, 4855), (3, 50), (7, 2447), (50, 50)])
def test_binomial_bounds_are_clopper_pearson(k, n):
    lower, upper = C.binomial_bounds(k, n)
    if k == 0:
        assert lower == 0 and upper == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)
    else:
        assert 1 - _tail(k - 1, n, lower) == pytest.approx(0.05, abs=1e-6)   # P(X >= k) at the lower bound
    if k < n:
        assert _tail(k, n, upper) == pytest.approx(0.05, abs=1e-6)            # P(X <= k) at the upper bound
    else:
        assert upper == 1.0
    assert lower <= k / n <= upper


def _random_sessions(rng, count, vocab, longest):
    return [[rng.randrange(vocab) for _ in range(rng.randrange(0, longest))] for _ in range(count)]


def _dense(sessions, width):
    matrix = np.zeros((len(sessions), width))
    for row, events in enumerate(sessions):
        np.add.at(matrix[row], events, 1)
    return matrix


def test_count_vectors_nearest_and_leave_one_out_equal_brute_force():
    rng = random.Random(0)
    train = _random_sessions(rng, 60, 6, 8) + [[1, 2, 2]] * 3
    scored = _random_sessions(rng, 40, 9, 12)   # IDs 6..8 were never in training: they count in full
    record = CountVectors.from_chunks([train[:30], train[30:]])
    assert record.sessions == len(train)
    dense_train, dense_scored = _dense(train, 9), _dense(scored, 9)
    brute = np.abs(dense_scored[:, None] - dense_train[None]).sum(-1).min(1)
    assert record.nearest(scored).tolist() == brute.tolist()
    pairwise = np.abs(dense_train[:, None] - dense_train[None]).sum(-1)
    np.fill_diagonal(pairwise, np.inf)
    per_session = np.repeat(record.leave_one_out(), record.weights)
    assert sorted(per_session.tolist()) == sorted(pairwise.min(1).tolist())
    assert sorted(record.weights.tolist()) == sorted(Counter(map(lambda s: tuple(sorted(s)), train)).values())
    assert CountVectors.from_chunks([train[:30], train[30:]], max_sessions=35).sessions == 35   # the first 35
    # kept in a checkpoint as tensors, and back
    again = count_vectors_from_state(count_vectors_state(record))
    assert again.nearest(scored).tolist() == brute.tolist()


def test_count_vectors_record_stops_past_its_cap(monkeypatch):
    import rules
    monkeypatch.setattr(rules, "MAX_COUNT_VECTORS", 5)
    assert CountVectors.from_chunks([[[i] * i for i in range(1, 7)]]) is None
    assert CountVectors.from_chunks([[[i] * i for i in range(1, 6)]]) is not None


def test_novelty_counts_what_no_other_training_session_has():
    rng = random.Random(1)
    train = _random_sessions(rng, 40, 12, 5) + [[0, 1]] * 2
    novelty = CountVectors.from_chunks([train]).novelty(12)
    sets = [frozenset(s) for s in train]
    types = Counter(t for s in sets for t in s)
    pairs = Counter(p for s in sets for p in itertools.combinations(sorted(s), 2))
    same_set = Counter(sets)
    assert novelty == {
        "event_type": sum(any(types[t] == 1 for t in s) for s in sets),
        "event_set": sum(same_set[s] == 1 for s in sets),
        "event_pair": sum(any(pairs[p] == 1 for p in itertools.combinations(sorted(s), 2)) for s in sets)}


def _record(train, vocab_size):
    sets = {frozenset(s) for s in train}
    return CoOccurrence(vocab_size, sets, pairs_of_sets(sets, vocab_size), CountVectors.from_chunks([train]))


def test_plan_leaves_out_rules_whose_novelty_is_normal_in_training():
    rng = random.Random(2)
    varied = _random_sessions(rng, 50, 200, 6)         # most sessions bring types and sets no other has
    plan = C.plan_rules(_record(varied, 200), 0.0005, 200)
    assert plan["combined_rules"] == ["probability", "count_vector"]
    assert not plan["unseen_events_flag"] and all(plan["novelty_is_normal"].values())
    assert plan["count_vector_distance"] == CountVectors.from_chunks([varied]).leave_one_out().max()
    # many identical sessions and two variants: no novelty worth the name, every rule is kept
    steady = [[1, 2, 3]] * 3000 + [[1, 2, 3, 3]] * 200 + [[1, 2]] * 200
    plan = C.plan_rules(_record(steady, 20), 0.0005, 20)
    assert plan["combined_rules"] == ["probability", "event_set", "event_pair"]   # the finer tests
    assert plan["unseen_events_flag"] and plan["count_vector_distance"] == 0.0
    # without the count record (older checkpoints): the earlier combination
    old = CoOccurrence(20, {frozenset(s) for s in steady}, None)
    assert C.plan_rules(old, 0.0005, 20)["combined_rules"] == ["probability", "event_set"]


def test_verdicts_of_the_count_vector_rule_and_unseen_events():
    scores = {"predictions": np.array([3.0, 3, 3]), "count_distance": np.array([0.0, 2, 3]),
              "min_event_log_prob": np.array([-1.0, -np.inf, -1]),
              "min_seen_event_log_prob": np.array([-1.0, -1, -1]),
              "end_log_prob": np.zeros(3), "novel_set": np.array([0.0, 1, 0]), "novel_pair": np.zeros(3)}
    calibration = hand_calibration(log_end_probability_bound=-5.0, count_vector_distance=2.0,
                                   combined_rules=["probability", "count_vector"], unseen_events_flag=False)
    assert verdicts(scores, calibration, "count_vector").tolist() == [False, False, True]
    # unseen: not alone
    assert verdicts(scores, calibration, "probability").tolist() == [False, False, False]
    # event_set left out
    assert verdicts(scores, calibration, "combined").tolist() == [False, False, True]
    flagging = {**calibration, "unseen_events_flag": True, "combined_rules": ["probability", "event_set"]}
    assert verdicts(scores, flagging, "combined").tolist() == [False, True, False]
    assert verdicts(scores, {**calibration, "count_vector_distance": None},
                    "count_vector").tolist() == [False] * 3


def _model(vocab_size):
    torch.manual_seed(0)
    return DeepLog(vocab_size, embedding_dim=8, hidden_size=8, num_layers=1, dropout=0.0).eval()


def test_few_calibration_sessions_are_stated_with_a_bound_and_what_to_do():
    rng = random.Random(3)
    train = _random_sessions(rng, 40, 8, 6)
    calibration = E.fit_calibration(_model(8), [train[:5]], 3, 9, 0.0005, "five sessions", "combined",
                                    co_occurrence=_record(train, 8))
    rates = calibration["expected_fpr"]
    assert rates["count_vector"] == pytest.approx(1 / 41)
    assert rates["combined"] == pytest.approx(sum(rates[r] for r in ("probability", "count_vector")))
    warnings = C.calibration_warnings(calibration, "combined")
    assert any("5 calibration session(s), too few" in w and "--calibrate-on" in w for w in warnings)
    assert any("up to 2.49%" in w for w in warnings)   # combined's own bound is above 1%: said as a warning
    summary = C.rule_summary(calibration, "combined")
    assert f"at most {rates['combined']:.3%}" in summary and "left out" in summary
    # enough calibration sessions and a large, steady training set: no warning
    steady = [[1, 2, 3]] * 3000 + [[1, 2, 3, 3]] * 200
    calibration = E.fit_calibration(_model(8), [steady[:500]], 3, 9, 0.0005, "steady", "combined",
                                    co_occurrence=_record(steady, 8))
    assert C.calibration_warnings(calibration, "combined") == []
    assert calibration["expected_fpr"]["combined"] < 0.005


@pytest.mark.skipif(not (SEQUENCES / "openstack_kalaki" / "train.jsonl").exists(),
                    reason="../shared/data/sequences is absent")
def test_small_training_set_states_an_honest_false_positive_rate(tmp_path):
    """openstack_kalaki: 50 training sessions, 2,447 normal dev sessions. The observed FPR of the default rule
    is at most twice the stated one, or the run warns that its calibration cannot promise a rate."""
    data = SEQUENCES / "openstack_kalaki"
    config = write_config(tmp_path / "config.yaml", {
        "model": {"vocab_size": 93}, "data": {"preprocessed_dir": str(data / "train.jsonl")},
        "training": {"output_dir": str(tmp_path / "out"), "epochs": 3, "evaluate_after_training": True}})
    assert run_script("train.py", "--config", config).returncode == 0
    done = run_script("evaluate.py", "--checkpoint", tmp_path / "out" / "checkpoints" / "best_model.pt",
                      "--data-dir", data / "dev_normal.jsonl", "--abnormal-dir", data / "dev_abnormal.jsonl",
                      "--output-dir", tmp_path / "dev")
    assert done.returncode == 0, done.stderr
    results = json.loads(next((tmp_path / "dev").glob("evaluation_results_*.json")).read_text())
    stated = results["calibration"]["expected_fpr"]["combined"]
    observed = results["rules"]["combined"]["fpr"]
    warned = "too few to promise" in (tmp_path / "dev" / "evaluation.log").read_text()
    assert observed <= 2 * stated or warned
    assert warned   # 4 calibration sessions: the log must say so
    assert results["default"]["f1"] >= 0.95 and results["calibration"]["combined_rules"][-1] == "count_vector"


@pytest.mark.parametrize("damage", [{"entries": torch.zeros(4, 2, dtype=torch.long)},
                                    {"entries": torch.ones(2, 3), "weights": torch.ones(1)},
                                    {"entries": torch.tensor([[5, 1, 1]]), "weights": torch.tensor([1])},
                                    "not a record"])
def test_a_damaged_count_vector_record_is_one_line_naming_the_checkpoint(tmp_path, damage):
    model = _model(8)
    path = tmp_path / "damaged.pt"
    torch.save({"model_state_dict": model.state_dict(), "model_args": model.model_args, "config": {},
                "count_vectors": damage}, path)
    with pytest.raises(CheckpointError, match=r"damaged\.pt: damaged checkpoint \(count_vectors"):
        load_checkpoint(path)
    done = run_script("evaluate.py", "--checkpoint", path, "--data-dir", path)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "count_vectors" in done.stderr


def test_weighted_percentile_counts_duplicates():
    values, weights = np.array([0.0, 0.5, 1.0]), np.array([97.0, 2.0, 1.0])
    assert C.weighted_percentile(values, weights, 90) == 0.0
    assert C.weighted_percentile(values, weights, 98) == 0.5
    assert C.weighted_percentile(values, weights, 99) == 0.5
    assert C.weighted_percentile(values, weights, 100) == 1.0


def test_target_fpr_threshold_is_the_exact_quantile_with_enough_sessions():
    values = np.arange(1.0, 10001.0)                          # 10,000 sessions, one score each
    threshold, method = C.target_fpr_threshold(values, np.ones_like(values), 10000.0, 0.001)
    assert (threshold == 9990.0 and (values > threshold).sum() == 10
            and method.startswith("empirical quantile"))
    # weights count like repeated sessions; an infinite score (an event never seen) uses up the target
    weighted, _ = C.target_fpr_threshold(np.array([1.0, 2.0, 3.0]), np.array([9970.0, 20.0, 10.0]), 10000.0,
                                         0.001)
    assert weighted == 2.0
    with_inf, _ = C.target_fpr_threshold(np.array([1.0, 2.0, 3.0, math.inf]),
                                         np.array([9970.0, 20.0, 5.0, 5.0]), 10000.0, 0.001)
    assert with_inf == 2.0   # 5 infinite + 5 above 2.0 = 10 flagged: the target


def test_below_one_in_n_the_threshold_is_the_model_implied_one_never_below_the_calibration_sessions():
    """With 500 sessions a rate of 1/2000 is not observable: the model's own estimate is used, unless it would
    flag more than the target of the calibration sessions themselves (then the largest score allowed)."""
    values = np.arange(1.0, 501.0)
    threshold, method = C.target_fpr_threshold(values, np.ones_like(values), 500.0, 0.0005, implied=612.5)
    assert threshold == 612.5 and method.startswith("model-implied at 0.05%")
    threshold, method = C.target_fpr_threshold(values, np.ones_like(values), 500.0, 0.0005, implied=300.0)
    assert threshold == 500.0 and method.startswith("the calibration sessions' bound")
    threshold, method = C.target_fpr_threshold(values, np.ones_like(values), 500.0, 0.0005)
    assert threshold == 500.0 and method.startswith("largest calibration score allowed")
    # with enough sessions the data decides, whatever the model says
    many = np.arange(1.0, 100001.0)
    assert C.target_fpr_threshold(many, np.ones_like(many), 1e5, 0.0005, implied=1e9)[0] == 99950.0


def test_implied_tail_sums_the_model_probability_mass_below_each_bound():
    model = fixed_model()                       # every position: p_c = e^(6-c) / z, the end (5) least likely
    log_p = [6 - c - math.log(sum(math.exp(i) for i in range(1, 7))) for c in range(6)]
    tail = C.ImpliedTail()
    tail.add(model, [(0, 1), (2,)], np.array([2.0, 1.0]), max_tokens=32)   # 3 x 2 + 2 x 1 = 8 positions
    bin_of = [int(-lp / C.SURPRISAL_BIN) for lp in log_p]
    for c in range(5):
        assert tail.event[bin_of[c]] == pytest.approx(8 * math.exp(log_p[c]))
    assert (tail.end[bin_of[5]] == pytest.approx(8 * math.exp(log_p[5]))
            and tail.end.sum() == tail.end[bin_of[5]])
    assert tail.event.sum() == pytest.approx(8 * (1 - math.exp(log_p[5])))
    # at most 0.1 per session of 3: class 4's mass (8 x 0.0116) fits, with class 3's (8 x 0.0316) it does not
    assert tail.threshold("event", 0.1, 3.0) == pytest.approx((bin_of[3] + 1) * C.SURPRISAL_BIN)
    # all of the end's mass fits: every end is flagged
    assert tail.threshold("end", 0.1, 3.0) == 0.0
    model.seen_events[4] = False                              # an event never seen in training takes no part
    unseen = C.ImpliedTail()
    unseen.add(model, [(0, 1), (2,)], np.array([2.0, 1.0]))
    assert unseen.event[bin_of[4]] == 0.0 and unseen.event[bin_of[3]] == pytest.approx(tail.event[bin_of[3]])


def test_calibration_tail_keeps_the_largest_rows_of_either_column_in_bounded_memory():
    tail = C.CalibrationTail(max_kept=100)
    rng = np.random.default_rng(1)
    event, end = rng.permutation(np.arange(1000.0)), rng.permutation(np.arange(1000.0))
    for rows in np.array_split(np.arange(1000), 37):
        tail.add(event[rows], end[rows], rows % 2 == 0, np.ones(len(rows)))
    assert len(tail.rows) <= 400 and tail.total == 1000.0
    kept_events, kept_ends = set(tail.event.tolist()), set(tail.end.tolist())
    assert set(np.arange(900.0, 1000.0)) <= kept_events and set(np.arange(900.0, 1000.0)) <= kept_ends
    assert C.target_fpr_threshold(tail.event, tail.weights, tail.total, 0.01)[0] == 989.0
    row_of_value = np.argsort(event)            # the row that carried each event value, and so its flag
    assert (tail.novel == (row_of_value[tail.event.astype(int)] % 2 == 0)).all()


def test_thresholds_fitted_at_another_k_are_refused():
    model = fixed_model()
    calibration = E.fit_calibration(model, [[(0,)]], 2, 5, 0.001, "hand", "combined")
    with pytest.raises(C.CalibrationError, match="fitted at top_k=2"):
        E.evaluate(model, calibration, [[(0,)]], [], top_k=3, default_rule="combined")


def test_percentile_sketch_beyond_the_cap_stays_within_its_error():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 50, 3000) / rng.integers(50, 400, 3000), [0.0, 0.25, 0.5, 1.0]])
    weights = rng.integers(1, 20, len(values)).astype(float)
    exact, sketch = C.ScoreQuantiles(), C.ScoreQuantiles(max_exact=100)
    for begin in range(0, len(values), 250):
        exact.add(values[begin:begin + 250], weights[begin:begin + 250])
        sketch.add(values[begin:begin + 250], weights[begin:begin + 250])
    assert exact.method == "exact" and sketch.method == "histogram of 65536 bins, error <= 1.53e-05"
    for q in (1, 50, 90, 95, 99, 100):
        true = C.weighted_percentile(values, weights, q)
        assert exact.percentile(q) == true
        assert 0 <= sketch.percentile(q) - true <= 1 / 65536
        assert sketch.weight_above(sketch.percentile(q)) == weights[values > sketch.percentile(q)].sum()
    # values on a bin's upper edge stay exact; 0 stands for the first bin's upper edge
    tiny = C.ScoreQuantiles(max_exact=1)
    tiny.add(np.array([0.0, 0.5, 1.0]), np.array([97.0, 2.0, 1.0]))
    assert [tiny.percentile(q) for q in (90, 98, 100)] == [1 / 65536, 0.5, 1.0]
    assert tiny.weight_above(0.5) == 1.0


def test_count_vectors_take_ids_far_beyond_the_vocabulary():
    """Detection data may hold IDs up to 2**63 - 1 (scored as unknown): the count vectors count them as they
    count any ID, never overflowing."""
    huge = 2 ** 63 - 1
    record = CountVectors.from_chunks([[[1, 2, 2], [3]]])
    assert record.nearest([[1, 2, 2, huge], [huge, huge - 1, 3]]).tolist() == [1.0, 2.0]
    owners, types, counts = count_entries([[huge, 5, huge], [huge - 1]])
    assert owners.tolist() == [0, 0, 1] and types.tolist() == [5, huge, huge - 1]
    assert counts.tolist() == [1, 2, 1]
