"""train.py --update: learning from feedback on a small run (a kind of normal session held out of training,
half of it fed back), the new checkpoint's lineage, the parent left byte-identical, bad feedback files."""
import hashlib
import json
import math
import random
from pathlib import Path

import generate_sample
import pytest
import torch
from conftest import run_script, write_config

import feedback
from checkpoint import (
    CheckpointError,
    co_occurrence_of,
    count_vectors_from_state,
    count_vectors_state,
    load_checkpoint,
    model_from_checkpoint,
)
from config import Config

KIND = 8   # re-replication (events 8, 9, 10): the kind of normal session held out of training


@pytest.fixture(scope="module")
def sessions():
    rng = random.Random(7)
    normal = [generate_sample.normal_session(rng) for _ in range(700)]
    abnormal = [generate_sample.abnormal_session(rng)[0] for _ in range(80)]
    kind = [s for s in normal if KIND in s]
    return {"train": [s for s in normal if KIND not in s], "fed": kind[0::2][:20],
            "held_out": kind[1::2][:20], "abnormal_train": abnormal[:20],
            # faults in sessions of other kinds: one made from the held-out kind is flagged by the parent
            # for the kind's novelty alone, which the feedback rightly teaches away
            "abnormal": [s for s in abnormal[20:] if not {8, 9, 10} & set(s)]}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, sessions):
    """A small model trained (and calibrated) on normal sessions without the kind."""
    root = tmp_path_factory.mktemp("feedback")
    data = root / "data"
    data.mkdir()
    lines = [{"event_ids": s, "label": 0} for s in sessions["train"]]
    lines += [{"event_ids": s, "label": 1} for s in sessions["abnormal_train"]]
    (data / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = write_config(root / "config.yaml", {"training": {"epochs": 4, "evaluate_after_training": True,
                                                              "learning_rate": 0.005, "save_every_steps": 0},
                                                 "data": {"validation_split": 0.2}})
    out = root / "run"
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    return root, config, out / "checkpoints" / "best_model.pt"


def detect_file(path, sessions):
    """Feedback as detect.py writes it: abnormal verdicts with their event_ids, and early alerts."""
    lines = []
    for number, session in enumerate(sessions):
        lines.append({"session_id": f"s{number}", "alert": "early", "score": 0.4, "misses": []})
        lines.append({"session_id": f"s{number}", "score": 0.1, "verdict": "abnormal", "rule": "combined",
                      "min_probability": 0.0, "novel_event_set": True, "novel_event_pairs": [[1, 8]],
                      "misses": [], "event_ids": session})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def updated(parent, sessions):
    """One update with the default output folder (beside the parent's run)."""
    root, config, checkpoint = parent
    parent_bytes = checkpoint.read_bytes()
    before = {name: feedback.flagged_sessions(checkpoint, sessions[name])[0]
              for name in ("fed", "held_out", "abnormal")}
    feedback_file = detect_file(root / "feedback.jsonl", sessions["fed"])
    result = run_script("train.py", "--config", config, "--update", checkpoint, "--feedback", feedback_file)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    folders = sorted(checkpoint.parent.parent.glob("update-*"))
    assert len(folders) == 1
    return {"parent_bytes": parent_bytes, "before": before, "result": result, "folder": folders[0],
            "checkpoint": folders[0] / "checkpoints" / "best_model.pt", "feedback_file": feedback_file}


def test_update_removes_the_false_positives_without_hurting_recall(updated, sessions):
    before = updated["before"]
    after = {name: feedback.flagged_sessions(updated["checkpoint"], sessions[name])[0]
             for name in ("fed", "held_out", "abnormal")}
    assert before["fed"].all() and before["held_out"].all()     # the kind is new to the parent
    assert not after["fed"].any()                               # fed back: normal now
    assert after["held_out"].sum() <= 1                         # and the kind's others, not fed back
    # the abnormal sessions: as many flagged (at most one let through, of 48)
    assert len(sessions["abnormal"]) == 48 and before["abnormal"].sum() >= 20
    assert after["abnormal"].sum() >= before["abnormal"].sum() - 1
    log = (updated["folder"] / "training.log").read_text()
    assert "skipped: 20 early-alert lines" in log and "20 sessions to learn as normal" in log
    assert "event types new to the model: [8, 9, 10]" in log
    # the update checked itself: one round sufficed here
    assert "Self-check: none of the 20 fed-back sessions is flagged by the updated model" in log
    assert "another round" not in log and "(1 round(s))" in log


def test_the_self_check_names_what_is_still_flagged(updated, sessions):
    checkpoint = load_checkpoint(updated["checkpoint"])
    model = model_from_checkpoint(checkpoint)
    calibration, rule = checkpoint["calibration"], checkpoint["config"]["evaluation"]["decision_rule"]
    records = co_occurrence_of(checkpoint)
    assert feedback.still_flagged(model, calibration, records, sessions["fed"], rule) == []
    flagged = feedback.still_flagged(model, calibration, records, sessions["abnormal"], rule)
    expected = feedback.flagged_sessions(updated["checkpoint"], sessions["abnormal"])[0]
    assert flagged == [i for i, flag in enumerate(expected) if flag] and flagged
    found = feedback.Feedback(Path("fb.jsonl"), "0", sessions["abnormal"][:3], ["a", "b", "c"])
    line = feedback.self_check_line([0, 2], found, Config().update)
    assert line.startswith("Self-check: 2 of 3 fed-back sessions are still flagged after the update (a, c)")
    assert "update.feedback_repeats" in line


def test_the_update_counts_its_own_epochs_and_names_the_parents_completed_ones(updated):
    log = (updated["folder"] / "training.log").read_text()
    assert "after 4 epochs)" in log and "epoch 5" not in log   # the 4-epoch parent, not "epoch 5"
    assert "Update epoch 1/2 " in log and "Update epoch 2/2 " in log and "Update epoch 3" not in log


def test_a_parent_is_described_by_the_epochs_it_completed():
    def describe(**checkpoint):
        return feedback.Parent(Path("p.pt"), {"run_id": "r", "step": 9, **checkpoint}, "0").describe()
    assert describe(epoch=11, data_position={"batches_done": 0}) == "p.pt (run r, step 9, after 10 epochs)"
    assert describe(epoch=2, data_position={"batches_done": 0}) == "p.pt (run r, step 9, after 1 epoch)"
    assert describe(epoch=4, data_position={"batches_done": 7}) == \
        "p.pt (run r, step 9, after 3 epochs and 7 batches of the next)"
    assert describe(epoch=3, feedback={"sessions": 2}) == "p.pt (run r, step 9, after 2 update epochs)"


def test_the_new_checkpoint_records_parent_and_feedback(updated, parent):
    _, _, parent_path = parent
    assert parent_path.read_bytes() == updated["parent_bytes"]    # the parent: byte-identical
    stored = torch.load(updated["checkpoint"], map_location="cpu", weights_only=True)
    parent_checkpoint = torch.load(parent_path, map_location="cpu", weights_only=True)
    assert stored["parent"] == {"path": str(parent_path.resolve()),
                                "sha256": hashlib.sha256(updated["parent_bytes"]).hexdigest(),
                                "run_id": parent_checkpoint["run_id"], "step": parent_checkpoint["step"],
                                "epoch": parent_checkpoint["epoch"]}
    learned = stored["feedback"]
    assert learned["path"] == str(updated["feedback_file"].resolve()) and learned["sessions"] == 20
    assert learned["sha256"] == hashlib.sha256(updated["feedback_file"].read_bytes()).hexdigest()
    assert learned["skipped"] == {"early_alerts": 20, "normal_verdicts": 0, "labelled_abnormal": 0}
    assert stored["run_id"] != parent_checkpoint["run_id"]
    assert "after the update" in stored["calibration"]["source"]
    # the records are the parent's: so is what the sweep of its training data found, and the rates it adds
    swept = parent_checkpoint["calibration"]["training_sweep"]
    assert swept is not None and stored["calibration"]["training_sweep"] == swept
    assert stored["model_state_dict"]["seen_events"][[8, 9, 10]].all()
    assert any(KIND in s for s in stored["event_sets"])
    # the validated loader takes it, as detection and a resume would
    assert load_checkpoint(updated["checkpoint"], for_resume=True)["feedback"]["sessions"] == 20
    assert (updated["folder"] / "calibration.json").exists()
    assert list(updated["folder"].glob("evaluation_report_*.txt"))


def test_a_damaged_lineage_record_is_refused(updated, tmp_path):
    stored = torch.load(updated["checkpoint"], map_location="cpu", weights_only=True)
    stored["parent"]["sha256"] = "not a digest"
    torch.save(stored, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="parent must hold path, sha256"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "missing.jsonl: feedback file not found"),
    ("empty.jsonl", "\n\n", "empty.jsonl: empty feedback file"),
    ("malformed.jsonl", '{"event_ids": [1, 2]}\n{"event_ids": [1,\n',
     "malformed.jsonl: line 2: malformed JSON"),
    ("outside.txt", "1 2 3\n1 2 3\n1 2 99\n",
     "outside.txt: line 3: event ID 99 is new to the model (its vocabulary is 0..28) and no parser state "
     "names it: pass --parser-state"),
    ("negative.txt", "1 2 3\n1 -2 3\n", "negative.txt: line 2: event ID -2 is negative"),
    ("alerts.jsonl", '{"session_id": "a", "alert": "early"}\n',
     "alerts.jsonl: no feedback sessions to learn from; skipped: 1 early-alert lines"),
    ("no_ids.jsonl", '{"session_id": "a", "verdict": "abnormal"}\n', "no_ids.jsonl: line 1: missing field"),
])
def test_bad_feedback_exits_with_one_line_and_writes_nothing(parent, tmp_path, name, content, message):
    _, config, checkpoint = parent
    before = checkpoint.read_bytes()
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "update"
    result = run_script("train.py", "--config", config, "--update", checkpoint, "--feedback", path,
                        "--output-dir", out)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and checkpoint.read_bytes() == before


# ----------------------------------------------------------------------------- event types new to the model
def parser_state_of(folder: Path, templates: int) -> Path:
    """A parser state of preprocess.py with `templates` templates (IDs 0..templates-1)."""
    import itertools

    import preprocess
    words = ["".join(p) for p in itertools.product("ghjkmnpqrstvwxyz", repeat=2)][:templates]
    folder.mkdir(parents=True)
    (folder / "a.log").write_text("".join(f"{word} task finished\n" for word in words))
    preprocess.main([str(folder / "a.log"), "--output", str(folder / "parsed")])
    return folder / "parsed" / "parser_state.json"


def test_a_grown_model_scores_the_old_ids_as_before_and_reads_a_new_one_as_unknown():
    torch.manual_seed(0)
    model = feedback.DeepLog(6, embedding_dim=8, hidden_size=8, num_layers=1, dropout=0.0).eval()
    model.seen_events[3] = False
    larger = feedback.grown(model, 9).eval()
    assert larger.vocab_size == 9 and larger.model_args["vocab_size"] == 9
    inputs = torch.tensor([[model.start_id, 1, 2, 5, model.unk_id]])
    moved = torch.tensor([[larger.start_id, 1, 2, 5, 6]])          # 6: a new ID, read as unknown was
    with torch.no_grad():
        before, after = model(inputs), larger(moved)
    assert torch.allclose(after[..., :6], before[..., :6], atol=1e-6)       # the same, up to matmul order
    assert torch.allclose(after[..., 9], before[..., 6], atol=1e-6)         # the end, moved up
    lowest = model.head.bias.min().item() - math.log(3)    # the 3 new ones together: the least likely's mass
    assert torch.allclose(after[..., 6:9], before.new_full((1, 5, 3), lowest))
    assert larger.seen_events.tolist() == [True, True, True, False, True, True, False, False, False, True]


def test_an_update_learns_event_types_new_to_the_model(parent, sessions, tmp_path):
    """Feedback holding IDs beyond the vocabulary, named by the parser state that parsed it: the vocabulary
    grows to the state's, the fed-back sessions are normal afterwards, an ID of the state that no feedback
    holds stays unknown, and the update's folder holds the state for later parses."""
    root, config, checkpoint = parent
    state = parser_state_of(tmp_path / "state", 32)
    fed = [s + [29] for s in sessions["train"][:10]]
    path = tmp_path / "fp.txt"
    path.write_text("".join(" ".join(map(str, s)) + "\n" for s in fed))
    missing = parser_state_of(tmp_path / "small", 29)
    refused = run_script("train.py", "--config", config, "--update", checkpoint, "--feedback", path,
                         "--parser-state", missing, "--output-dir", tmp_path / "refused")
    assert refused.returncode == 2 and "event ID 29 is new to the model" in refused.stderr
    assert f"no template of {missing} has it" in refused.stderr and not (tmp_path / "refused").exists()
    before = feedback.flagged_sessions(checkpoint, fed)[0]
    out = tmp_path / "update"
    result = run_script("train.py", "--config", config, "--update", checkpoint, "--feedback", path,
                        "--parser-state", state, "--output-dir", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    log = (out / "training.log").read_text()
    assert "Vocabulary grows from 29 to 30 event types" in log and "29 'hx task finished'" in log
    assert "Self-check: none of the 10 fed-back sessions is flagged" in log
    updated = out / "checkpoints" / "best_model.pt"
    stored = load_checkpoint(updated)
    assert stored["model_args"]["vocab_size"] == 30 and stored["config"]["model"]["vocab_size"] == 30
    assert stored["feedback"]["vocabulary"] == {"parent": 29, "updated": 30, "parser_state": str(state),
                                                "new_events": [[29, "hx task finished"]]}
    assert json.loads((out / "parser_state.json").read_text()) == json.loads(state.read_text())
    assert before.all() and not feedback.flagged_sessions(updated, fed)[0].any()
    # 30 is a template of the state that no feedback held: still unknown to the model, still flagged
    assert feedback.flagged_sessions(updated, [s[:-1] + [30] for s in fed[:3]])[0].all()


def test_update_flags_go_together(parent, tmp_path):
    _, _, checkpoint = parent
    result = run_script("train.py", "--update", checkpoint)
    assert result.returncode == 2 and "--update CHECKPOINT and --feedback FILE go together" in result.stderr
    result = run_script("train.py", "--update", checkpoint, "--feedback", "f", "--resume", checkpoint)
    assert result.returncode == 2 and "no --resume" in result.stderr


def test_feedback_formats_and_what_is_skipped(tmp_path):
    detections = tmp_path / "detections.jsonl"
    detections.write_text("\n".join(json.dumps(line) for line in [
        {"session_id": "a", "alert": "early", "score": 0.5},
        {"session_id": "b", "verdict": "normal", "score": 0.0},
        {"session_id": "c", "verdict": "abnormal", "event_ids": [1, 2, 3]},
        {"session_id": "d", "alert": "early"}]) + "\n")
    found = feedback.read_feedback(detections, 29)
    assert found.sessions == [[1, 2, 3]] and found.session_ids == ["c"]
    assert found.skipped == {"early_alerts": 2, "normal_verdicts": 1}
    text = tmp_path / "fp.txt"
    text.write_text("1 2 3\n\n4 5\n")
    assert feedback.read_feedback(text, 29).sessions == [[1, 2, 3], [4, 5]]
    labelled = tmp_path / "sessions.jsonl"
    labelled.write_text('{"event_ids": [1, 2], "label": 0}\n{"event_ids": [3], "label": 1}\n')
    found = feedback.read_feedback(labelled, 29)
    assert found.sessions == [[1, 2]] and found.skipped["labelled_abnormal"] == 1
    array = tmp_path / "sessions.json"
    array.write_text(json.dumps([{"event_ids": [4, 4]}]))
    assert feedback.read_feedback(array, 29).sessions == [[4, 4]]


def test_records_are_joined_with_the_feedback():
    import logging

    import numpy as np

    from rules import CountVectors, pairs_of_sets
    counts = CountVectors.from_chunks([[[1, 2, 2], [1, 2, 2], [3]]])
    checkpoint = {"model_args": {"vocab_size": 5}, "event_sets": [[1, 2], [3]],
                  "event_pairs": torch.tensor([[1, 2]]), "count_vectors": count_vectors_state(counts)}
    joined = feedback.join_records(checkpoint, [[1, 2, 2], [1, 4]], None, logging.getLogger("test"))
    assert checkpoint["event_sets"] == [[1, 2], [1, 4], [3]]
    assert checkpoint["event_pairs"].tolist() == [[1, 2], [1, 4]]
    assert joined.sets == {frozenset({1, 2}), frozenset({3}), frozenset({1, 4})}
    assert np.array_equal(joined.pairs, pairs_of_sets([[1, 2], [1, 4]], 5))
    merged = count_vectors_from_state(checkpoint["count_vectors"])
    # each fed-back session counted twice (update.feedback_repeats without a config): [1, 2, 2] 2 + 2 times,
    # [3] once, [1, 4] twice; so the odd [1, 4] is not a lone vector whose distance sets the threshold
    assert merged.sessions == 7 and len(merged.weights) == 3
    assert sorted(merged.weights.tolist()) == [1, 2, 4]
    assert merged.leave_one_out()[merged.weights == 2].tolist() == [0.0]
    # a record the parent did not keep stays unkept
    unkept = {"model_args": {"vocab_size": 5}, "event_sets": None, "event_pairs": None, "count_vectors": None}
    feedback.join_records(unkept, [[1, 2]], None, logging.getLogger("test"))
    assert unkept["event_sets"] is None and unkept["event_pairs"] is None and unkept["count_vectors"] is None


def test_the_replay_sample_is_uniform_and_seeded():
    chunks = [[(i,) for i in range(start, start + 100)] for start in range(0, 1000, 100)]
    first = feedback.reservoir(chunks, 50, seed=3)
    assert len(first) == 50 and first == feedback.reservoir(chunks, 50, seed=3)
    assert np_mean([s[0] for s in first]) == pytest.approx(500, abs=120)
    assert feedback.reservoir(chunks, 0, seed=3) == [] and len(feedback.reservoir(chunks, 5000, 3)) == 1000


def np_mean(values):
    return sum(values) / len(values)

