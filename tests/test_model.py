"""Model shapes, the token layout, and why padding needs no packing."""
import torch

from model import DeepLog
from tokens import IGNORE_INDEX


def test_forward_shapes_and_token_layout():
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=12, num_layers=2, dropout=0.1)
    assert (model.end_id, model.pad_id, model.start_id, model.unk_id) == (10, 11, 12, 13)
    logits = model(torch.randint(0, 10, (3, 5)))
    assert logits.shape == (3, 5, 11)   # every event plus end-of-session


def test_right_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=12, num_layers=2).eval()
    alone = model(torch.tensor([[12, 1, 2, 3]]))
    padded = model(torch.tensor([[12, 1, 2, 3, 11, 11], [12, 4, 5, 6, 7, 8]]))
    assert torch.allclose(alone[0], padded[0, :4], atol=1e-6)


def test_encode_adds_start_and_end_and_maps_unknown_ids():
    model = DeepLog(vocab_size=10, embedding_dim=4, hidden_size=4, num_layers=1)
    inputs, targets = model.encode([[3, 4], [5, 42, 6]])
    assert inputs.tolist() == [[12, 3, 4, 11], [12, 5, 13, 6]]
    assert targets.tolist() == [[3, 4, 10, IGNORE_INDEX], [5, 13, 6, 10]]   # 42 is unknown, never "end"
    # a padded 2-D tensor (padding -1) and a 1-D sequence give the same encoding
    assert model.encode(torch.tensor([[3, 4, -1], [5, 42, 6]]))[0].tolist() == inputs.tolist()
    assert model.encode([3, 4])[1].tolist() == [[3, 4, 10]]


# ----------------------------------------------------------------------------- scoring in windows
import math  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import fixed_model  # noqa: E402

from dataset import make_windows  # noqa: E402
from tokens import window_runs, window_spans  # noqa: E402


def _whole_session_columns(model, sessions, ks):
    """The columns as scoring computed them before windows: one pass over each whole session."""
    inputs, targets = model.encode(sessions)
    ranks, log_probs = model.prediction_ranks(inputs, targets)
    valid = ranks >= 0
    lengths = torch.tensor([len(s) for s in sessions])
    is_end = torch.arange(ranks.size(1)) == lengths.unsqueeze(1)
    return {"predictions": valid.sum(1), "max_rank": ranks.max(1).values,
            "min_log_prob": torch.where(valid, log_probs, float("inf")).min(1).values,
            "min_event_log_prob": torch.where(valid & ~is_end, log_probs, float("inf")).min(1).values,
            "end_log_prob": log_probs.gather(1, lengths.unsqueeze(1)).squeeze(1),
            **{f"misses_at_{k}": ((ranks >= k) & valid).sum(1) for k in ks}}


def _trained_window_columns(model, session, ks):
    """The columns of one session from the windows training cuts it into (dataset.make_windows)."""
    ranks, log_probs = [], []
    for inputs, targets in make_windows(list(session), model.vocab_size, model.max_seq_length,
                                        model.window_context):
        r, lp = model.prediction_ranks(torch.tensor([inputs]), torch.tensor([targets]))
        keep = r[0] >= 0
        ranks.append(r[0][keep])
        log_probs.append(lp[0][keep])
    ranks, log_probs = torch.cat(ranks), torch.cat(log_probs)
    return {"predictions": len(ranks), "max_rank": int(ranks.max()), "min_log_prob": float(log_probs.min()),
            "min_event_log_prob": float(log_probs[:-1].min()) if len(log_probs) > 1 else float("inf"),
            "end_log_prob": float(log_probs[-1]), **{f"misses_at_{k}": int((ranks >= k).sum()) for k in ks}}


def test_window_spans_predict_every_position_once_with_context():
    for predictions, length, context in [(5, 8, 2), (8, 8, 2), (9, 8, 2), (100, 8, 3), (1000, 256, 32),
                                         (57, 10, 0)]:
        spans = window_spans(predictions, length, context)
        scored = [p for begin, end, first in spans for p in range(first, end)]
        assert scored == list(range(predictions))                 # every prediction once, in order
        assert all(end - begin <= length for begin, end, _ in spans)
        assert all(first - begin == (context if begin else 0) for begin, _, first in spans)


def test_window_runs_step_a_growing_session_through_the_windows_of_window_spans():
    """However a session grows, its runs are cut exactly where a window past the first starts scoring."""
    rng = np.random.default_rng(3)
    for predictions, length, context in [(5, 8, 2), (40, 8, 2), (100, 8, 7), (57, 10, 0), (30, 2, 1),
                                         (9, 9, 0)]:
        fresh = {first for _, _, first in window_spans(predictions, length, context) if first > 0}
        for _ in range(5):
            cuts = sorted({0, predictions, *rng.integers(1, predictions, 4).tolist()})
            runs = [run for a, b in zip(cuts, cuts[1:]) for run in window_runs(a, b, length, context)]
            assert [p for begin, end, _ in runs for p in range(begin, end)] == list(range(predictions))
            assert {begin for begin, _, is_fresh in runs if is_fresh} == fresh
            assert not any(begin < first < end for begin, end, _ in runs for first in fresh)   # in one window
    assert window_runs(250, 260, 256, 32) == [(250, 256, False), (256, 260, True)]


def test_stepping_the_state_gives_the_whole_pass():
    """initial_state, advance and last_output: one input at a time, the logits of one pass."""
    torch.manual_seed(4)
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=12, num_layers=2).eval()
    inputs = torch.tensor([[12, 1, 2, 3], [12, 4, 5, 6]])
    state = model.initial_state(2)
    assert [tuple(s.shape) for s in state] == [(2, 2, 12)] * len(model.state_names)
    stepped = []
    for column in range(inputs.size(1)):
        outputs, state = model.advance(inputs[:, column:column + 1], state)
        assert torch.equal(outputs[:, -1], model.last_output(state))
        stepped.append(model.head(model.last_output(state)))
    assert torch.allclose(torch.stack(stepped, 1), model(inputs), atol=1e-6)


def test_short_sessions_score_as_one_whole_pass():
    """Sessions of at most max_seq_length predictions: the same numbers as the whole-session pass."""
    torch.manual_seed(1)
    model = DeepLog(vocab_size=12, embedding_dim=8, hidden_size=16, num_layers=2).eval().set_windows(32, 4)
    rng = np.random.default_rng(0)
    sessions = [rng.integers(0, 14, rng.integers(0, 32)).tolist() for _ in range(60)]   # 12, 13: unknown IDs
    windowed = model.session_scores(sessions, [1, 3], max_tokens=200)   # several batches of varied width
    whole = _whole_session_columns(model, sessions, [1, 3])
    for name, column in whole.items():
        assert torch.allclose(windowed[name], column.double(), atol=1e-5), name
    assert torch.isinf(windowed["min_log_prob"][[12 in s or 13 in s for s in sessions]]).all()


@pytest.mark.parametrize("length,context", [(16, 4), (16, 0), (9, 8)])
def test_long_sessions_score_in_the_windows_of_training(length, context):
    torch.manual_seed(2)
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=16,
                    num_layers=1).eval().set_windows(length, context)
    rng = np.random.default_rng(1)
    sessions = [rng.integers(0, 10, n).tolist() for n in (3, 15, 16, 40, 101)]
    windowed = model.session_scores(sessions, [2], max_tokens=48)
    for row, session in enumerate(sessions):
        expected = _trained_window_columns(model, session, [2])
        for name, value in expected.items():
            assert float(windowed[name][row]) == pytest.approx(value, abs=1e-5), (name, len(session))


def test_scoring_batches_are_bounded_by_positions_not_sessions():
    model = DeepLog(vocab_size=10, embedding_dim=4, hidden_size=8, num_layers=1).eval().set_windows(64, 8)
    sessions = [[1] * 100_000, [2, 3], [4] * 300]
    budget = model.scoring_tokens(4096)
    rows = 0
    for batch in model.windows(sessions, max_tokens=4096):
        assert batch.logits.shape[0] * batch.logits.shape[1] <= budget
        rows += batch.logits.shape[0]
    assert rows == sum(len(window_spans(len(s) + 1, 64, 8)) for s in sessions)
    # a big vocabulary gets fewer positions per batch: its logits stay within the budget
    big = DeepLog(vocab_size=100_000, embedding_dim=4, hidden_size=8, num_layers=1).set_windows(64, 8)
    assert big.scoring_tokens(2 ** 16) * big.num_classes <= 2 ** 24 and big.scoring_tokens(2 ** 16) >= 64


def test_diagnose_names_positions_of_long_sessions_in_session_order():
    torch.manual_seed(3)
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=16, num_layers=1).eval().set_windows(12, 3)
    session = np.random.default_rng(2).integers(0, 10, 50).tolist() + [11]   # an unknown ID near the end
    misses = model.diagnose([session], top_k=3)[0]
    expected = _trained_window_columns(model, session, [3])
    assert len(misses) == expected["misses_at_3"]
    positions = [m["position"] for m in misses]
    assert positions == sorted(positions) and 50 in positions
    assert all(m["actual"] == (session[m["position"]] if m["position"] < len(session) else "<end>")
               for m in misses)
    assert model.diagnose([session], top_k=3, max_misses=2)[0] == misses[:2]


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


@pytest.mark.parametrize("given, error, message", [
    ([], ValueError, "a session of input_ids is empty"),
    ([[1, 2], []], ValueError, "a session of input_ids is empty"),
    (torch.tensor([[-1, -1]]), ValueError, "a session of input_ids is empty"),   # padding only
    ([1.5, 2], TypeError, "event IDs must be integers, got 1.5"),
    ([True], TypeError, "event IDs must be integers, got True"),
    ("abc", TypeError, "input_ids must be event IDs (integers), got 'abc'"),
    ([[1, "2"]], TypeError, "event IDs must be integers, got '2'"),
])
def test_the_api_refuses_what_is_not_a_session_of_event_ids(given, error, message):
    """score, diagnose and verdict read their input alike: an empty session or an ID that is not an integer
    is an error, never a score of nothing or a rounded ID."""
    model = fixed_model()
    for call in (model.calculate_anomaly_score, model.diagnose):
        with pytest.raises(error, match=re.escape(message)):
            call(given, top_k=2)
    assert model.calculate_anomaly_score(np.array([0, 3]), top_k=2).tolist() == pytest.approx([2 / 3])


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
        {"position": 1, "actual": 3,
         "probability": pytest.approx(math.exp(3) / sum(math.exp(i) for i in range(1, 7))),
         "expected": [0, 1]},
        {"position": 2, "actual": "<end>", "probability": pytest.approx(math.exp(1) / sum(math.exp(i) for i in
                                                                                          range(1, 7))),
         "expected": [0, 1]}]]
    assert len(model.diagnose([[0, 3]], top_k=2, max_misses=1)[0]) == 1
    # one session (1-D: a list, a tuple, a tensor) gives its own misses, not a batch of one
    for one in ([0, 3], (0, 3), torch.tensor([0, 3])):
        assert model.diagnose(one, top_k=2) == report[0]
