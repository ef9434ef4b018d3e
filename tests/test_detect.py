"""detect.py: live scoring equals batch scoring, early alerts, following files, restarts without loss."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, hand_calibration, run_script, write_config

import detect as D
import logparse
import preprocess
from config import Config
from live_sessions import Item, LiveDetector
from live_sources import FollowedFile, LineParser
from live_state import state_problem
from model import DeepLog
from rules import CoOccurrence, CountVectors, pairs_of_sets


# ----------------------------------------------------------------------------- in process: the scorer
def random_model(vocab_size=12, max_seq_length=9, window_context=3, seed=0):
    """A random 2-layer model scoring in small windows, so that sessions cross several window boundaries."""
    torch.manual_seed(seed)
    model = DeepLog(vocab_size, embedding_dim=8, hidden_size=16, num_layers=2, dropout=0.0).eval()
    with torch.no_grad():
        model.head.weight.mul_(4)   # sharper predictions: ranks spread, some events far below the bound
    return model.set_windows(max_seq_length, window_context)


def random_sessions(count=60, vocab_size=12, seed=1, longest=30):
    rng = random.Random(seed)
    # a few common openings (shared prefixes, as real logs have), then random events; some IDs unknown
    openings = [[rng.randrange(vocab_size) for _ in range(4)] for _ in range(3)]
    sessions = []
    for _ in range(count):
        tail = [rng.randrange(vocab_size + (2 if rng.random() < 0.1 else 0))
                for _ in range(rng.randrange(0, longest))]
        sessions.append(rng.choice(openings)[:rng.randrange(1, 5)] + tail)
    return sessions


def calibration_for(model, sessions, **keys):
    """A calibration whose probability bound lies inside the sessions' scores (some flagged, most not)."""
    scores = model.session_scores(sessions, [2])
    finite = lambda column: column[np.isfinite(column)]  # noqa: E731
    event_bound = float(np.quantile(finite(scores["min_event_log_prob"].numpy()), 0.3))
    end_bound = float(np.quantile(finite(scores["end_log_prob"].numpy()), 0.2))
    return hand_calibration(**{"log_probability_bound": event_bound, "log_end_probability_bound": end_bound,
                               "unseen_events_flag": False, "top_k": 2, "top_g": 5,
                               "combined_rules": ["probability", "event_set", "event_pair"], **keys})


def co_occurrence_of(sessions, vocab_size=12):
    sets = [sorted(set(e for e in s if e < vocab_size)) for s in sessions]
    return CoOccurrence(vocab_size, sets, pairs_of_sets(sets, vocab_size),
                        CountVectors.from_chunks([sessions]))


def interleaved_items(sessions, rng):
    """One event line at a time, sessions interleaved at random (each keeps its own order)."""
    cursors = [[f"s{i}", list(s), 0] for i, s in enumerate(sessions)]
    items = []
    while cursors:
        pick = rng.randrange(len(cursors))
        name, events, at = cursors[pick]
        line = len(items) + 1
        items.append(Item("event", (name,), [events[at]], f"log:{line}", f"line {line}"))
        cursors[pick][2] += 1
        if cursors[pick][2] == len(events):
            cursors.pop(pick)
    return items


def live_lines(model, calibration, co_occurrence, items, steps, prefix_nodes=1000, rule="combined"):
    detector = LiveDetector(model, calibration, rule, co_occurrence, None, None, None, 3, prefix_nodes)
    lines, at = [], 0
    for size in steps:
        lines += detector.feed(items[at:at + size], now=0.0)
        at += size
    lines += detector.feed(items[at:], now=0.0) + detector.close_all()
    return lines


def batch_lines(model, calibration, co_occurrence, sessions, tmp_path, rule="combined"):
    path = tmp_path / "sessions.jsonl"
    path.write_text("".join(json.dumps({"session_id": f"s{i}", "event_ids": s}) + "\n"
                            for i, s in enumerate(sessions)))
    output = tmp_path / "batch.jsonl"
    with open(output, "w") as handle:
        D.score_files(model, calibration, path, {}, rule, handle, co_occurrence=co_occurrence)
    return [json.loads(line) for line in output.read_text().splitlines()]


def assert_same_verdict(live: dict, batch: dict) -> None:
    for key, value in batch.items():
        if key == "min_probability":
            assert math.isclose(live[key], value, rel_tol=1e-5, abs_tol=1e-300), (key, live, batch)
        elif key == "misses":
            assert [(m["position"], m["actual"], m["expected"]) for m in live[key]] == \
                [(m["position"], m["actual"], m["expected"]) for m in value]
            for a, b in zip(live[key], value):
                assert math.isclose(a["probability"], b["probability"], rel_tol=1e-5, abs_tol=1e-300)
        else:
            assert live[key] == value, (key, live, batch)


def test_incremental_scoring_equals_batch_scoring(tmp_path):
    """Interleaved one line at a time, in steps of any size, windows crossed, prefixes shared or not: the
    verdict lines are the batch scorer's (float32 rounding apart)."""
    model, sessions = random_model(), random_sessions()
    co_occurrence = co_occurrence_of(sessions[:30])
    calibration = calibration_for(model, sessions)
    batch = {line["session_id"]: line for line in batch_lines(model, calibration, co_occurrence, sessions,
                                                              tmp_path)}
    assert 5 < sum(line["verdict"] == "abnormal" for line in batch.values()) < len(sessions) - 5
    assert any(len(s) + 1 > 2 * model.max_seq_length for s in sessions)   # several windows
    items = interleaved_items(sessions, random.Random(2))
    for steps, prefix_nodes in (([1] * 50 + [7] * 20, 1000), ([len(items)], 0), ([3, 100, 1, 1, 40], 5)):
        verdicts = [json.loads(line) for line in live_lines(model, calibration, co_occurrence, items, steps,
                                                              prefix_nodes) if '"alert"' not in line]
        assert sorted(v["session_id"] for v in verdicts) == sorted(batch)
        for verdict in verdicts:
            assert_same_verdict(verdict, batch[verdict["session_id"]])


def test_live_output_does_not_depend_on_steps_or_shared_prefixes():
    """Byte for byte: what a restart relies on (it splits the lines into steps differently)."""
    model, sessions = random_model(), random_sessions(seed=4)
    co_occurrence, calibration = co_occurrence_of(sessions[:30]), calibration_for(model, sessions)
    items = interleaved_items(sessions, random.Random(5))
    first = live_lines(model, calibration, co_occurrence, items, [len(items)], 1000)
    assert any('"alert": "early"' in line for line in first)
    for steps, prefix_nodes in (([1] * 200, 1000), ([13] * 30, 0), ([2, 500], 3)):
        assert live_lines(model, calibration, co_occurrence, items, steps, prefix_nodes) == first


@pytest.mark.parametrize("rule", ["probability", "combined", "top_g"])
def test_an_early_alert_is_the_batch_verdicts_first_miss_and_the_verdict_follows(tmp_path, rule):
    model, sessions = random_model(), random_sessions(seed=7)
    co_occurrence, calibration = co_occurrence_of(sessions[:30]), calibration_for(model, sessions)
    lines = [json.loads(line) for line in live_lines(model, calibration, co_occurrence,
                                                       interleaved_items(sessions, random.Random(8)),
                                                       [5] * 100, rule=rule)]
    alerts = {a["session_id"]: a for a in lines if a.get("alert") == "early"}
    verdicts = {v["session_id"]: v for v in lines if "verdict" in v}
    assert alerts and all(verdicts[name]["verdict"] == "abnormal" for name in alerts)
    bound = calibration["log_probability_bound"]
    for index, session in enumerate(sessions):
        name = f"s{index}"
        # the batch record of each event: its rank and probability (diagnose with every event a miss)
        everything = model.diagnose(session, top_k=model.num_classes, log_prob_bound=0.0)
        events = [m for m in everything if m["position"] < len(session)]
        ranks = model.diagnose(session, top_k=calibration["top_g"])
        fired = []
        if rule in ("probability", "combined"):
            fired += [m["position"] for m in events if m["probability"] < math.exp(bound) and
                      m["probability"] > 0]   # unseen_events_flag false: a never-seen event does not count
        if rule == "top_g":
            fired += [m["position"] for m in ranks if m["position"] < len(session)]
        if rule == "combined":   # the first type that makes the set novel, or a pair never seen together
            types = set()
            candidates = [set(s) for s in co_occurrence.sets]
            for position, event in enumerate(session):
                if event not in types:
                    pair_new = event < 12 and any(
                        min(t, event) * 12 + max(t, event) not in set(co_occurrence.pairs.tolist())
                        for t in types if t < 12)
                    types.add(event)
                    if pair_new or not any(types <= c for c in candidates):
                        fired.append(position)
        if fired:
            assert alerts[name]["position"] == min(fired), (name, alerts[name], fired)
            assert alerts[name]["event"] == session[min(fired)]
            assert alerts[name]["at"].startswith("log:") and alerts[name]["raw"].startswith("line ")
        else:
            assert name not in alerts


def test_a_probability_alert_names_the_event_its_line_and_the_expected_events():
    model, sessions = random_model(), random_sessions(seed=9)
    co_occurrence, calibration = co_occurrence_of(sessions[:30]), calibration_for(model, sessions)
    lines = [json.loads(line) for line in live_lines(model, calibration, co_occurrence,
                                                       interleaved_items(sessions, random.Random(3)),
                                                       [9] * 80, rule="probability")]
    alert = next(a for a in lines if a.get("alert") == "early")
    session = sessions[int(alert["session_id"][1:])]
    miss = model.diagnose(session, top_k=2, log_prob_bound=calibration["log_probability_bound"])
    first = next(m for m in miss if m["probability"] < math.exp(calibration["log_probability_bound"]))
    assert (alert["position"], alert["event"], alert["expected"]) == \
        (first["position"], first["actual"], first["expected"])
    assert math.isclose(alert["probability"], first["probability"], rel_tol=1e-5)


def template_table(vocab_size=12, missing=(5,)) -> list[dict]:
    """A templates.json as preprocess.py writes it, without the IDs in `missing`."""
    return [{"id": i, "template": f"event number {i} <*>", "count": 1} for i in range(vocab_size)
            if i not in missing]


def assert_named(miss: dict, key="actual") -> None:
    """A miss (or alert) carries the template of its event and of each expected event, IDs unchanged."""
    def name(event):
        if event == "<end>":
            return "<end of session>"
        if event == 5:
            return "<unknown: no template with this ID>"
        if event == 12:
            return "<unknown: the line matched no template of the parser>"
        if event >= 12:
            return "<unknown: no template with this ID>"
        return f"event number {event} <*>"
    assert miss[f"{key}_template"] == name(miss[key]), miss
    assert miss["expected_templates"] == [name(e) for e in miss["expected"]], miss
    assert all(isinstance(e, int) or e == "<end>" for e in miss["expected"])


def test_misses_and_alerts_carry_the_template_text_of_their_events(tmp_path):
    """Batch (templates.json beside sessions.jsonl, as preprocess.py writes it) and live (the parser's
    names): each miss names its actual and expected events in words; unknown IDs say so."""
    model, sessions = random_model(), random_sessions(seed=7)
    sessions[3][2:2] = [5, 12, 13]   # no template, the parser's unknown ID, beyond both
    co_occurrence, calibration = co_occurrence_of(sessions[:30]), calibration_for(model, sessions)
    (tmp_path / "templates.json").write_text(json.dumps(template_table()))
    batch = batch_lines(model, calibration, co_occurrence, sessions, tmp_path)
    misses = [m for v in batch for m in v["misses"]]
    assert len(misses) > 20 and {5, 12} <= {m["actual"] for m in misses}
    for miss in misses:
        assert_named(miss)
    names = preprocess.EventNames(dict(enumerate(f"event number {i} <*>" for i in range(12))), 12, 12)
    del names.templates[5]
    detector = LiveDetector(model, calibration, "combined", co_occurrence, None, None, None, 3, 1000, names)
    items = interleaved_items(sessions, random.Random(8))
    lines = [json.loads(line) for line in detector.feed(items, now=0.0) + detector.close_all()]
    named = lambda verdicts: {v["session_id"]: [(m["position"], m["actual"], m["actual_template"],  # noqa: E731
                                                m["expected_templates"]) for m in v["misses"]]
                              for v in verdicts if "verdict" in v}
    assert named(lines) == named(batch)
    alerts = [a for a in lines if a.get("alert") == "early"]
    assert alerts and all("event_template" in a for a in alerts)
    for alert in alerts:
        if "expected" in alert:
            assert_named(alert, "event")
    # an event the model never saw in training keeps its text, named unknown to the model
    unseen = preprocess.EventNames({7: "Checksum error on <*>"}, 12, 12, [i != 7 for i in range(12)])
    assert unseen.name(7) == "<unknown to the model, never seen in training> Checksum error on <*>"
    # no templates.json beside the data: the misses stay as they were
    (tmp_path / "templates.json").unlink()
    plain = batch_lines(model, calibration, co_occurrence, sessions, tmp_path)
    assert all(set(m) == {"position", "actual", "probability", "expected"}
               for verdict in plain for m in verdict["misses"])


def test_the_state_of_open_sessions_round_trips_exactly():
    """Saved in the middle and restored into a new detector: the rest of the output is the same."""
    model, sessions = random_model(), random_sessions(seed=11)
    co_occurrence, calibration = co_occurrence_of(sessions[:30]), calibration_for(model, sessions)
    items = interleaved_items(sessions, random.Random(12))
    whole = live_lines(model, calibration, co_occurrence, items, [len(items)])
    detector = LiveDetector(model, calibration, "combined", co_occurrence, None, None, None, 3, 1000)
    half = len(items) // 2
    before = detector.feed(items[:half], now=0.0)
    saved = detector.state_dict()
    assert set(saved["model"]) == {"h", "c", "columns"}   # the state file's format (live_state.STATE_VERSION)
    again = LiveDetector(model, calibration, "combined", co_occurrence, None, None, None, 3, 1000)
    again.load_state_dict(saved)
    assert before + again.feed(items[half:], now=0.0) + again.close_all() == whole


def test_sessions_close_when_idle_or_full():
    model, sessions = random_model(), random_sessions(count=4, seed=13, longest=6)
    co_occurrence, calibration = co_occurrence_of(sessions), calibration_for(model, sessions)
    detector = LiveDetector(model, calibration, "combined", co_occurrence, 3, None, 4, 3)
    item = lambda key, line: Item("event", (key,), [1], f"f:{line}", "x")  # noqa: E731
    # a and b named; then three lines without a: it closes at the third (idle 3)
    out = detector.feed([item("a", 1), item("b", 2), item("b", 3), item("b", 4)], now=0.0)
    assert [json.loads(line)["session_id"] for line in out if '"verdict"' in line] == ["a"]
    # b reaches 4 events: closed at once; its next event opens a new one
    out = detector.feed([item("b", 5), item("b", 6)], now=0.0)
    assert [json.loads(line)["session_id"] for line in out if '"verdict"' in line] == ["b"]
    assert list(detector.open) == ["b"] and detector.open["b"].events == [1]
    idle = LiveDetector(model, calibration, "combined", co_occurrence, None, 10.0, None, 3)
    idle.feed([item("c", 1)], now=100.0)
    assert idle.close_idle(105.0) == [] and len(idle.close_idle(111.0)) == 1


def test_live_windows_join_and_close_as_preprocess_counts_them(tmp_path):
    windows = logparse.Windows("count:4:2")   # the windows of preprocess.py, fed line by line
    places = [windows.place(None) for _ in range(7)]
    assert [(list(joined), closed) for joined, closed in places[:5:2]] == [([0], []), ([0, 1], []),
                                                                          ([1, 2], [0])]
    timed = logparse.Windows("time:10")
    assert timed.place(100.0) == (range(0, 1), [])
    assert timed.place(125.0) == (range(2, 3), [0])   # a gap: window 1 never opened
    # live detection names them by k: lines through a parser state saved with windows
    lines = [("t.log", 1, "100 job started"), ("t.log", 2, "125 disk sda3 is full")]
    log = tmp_path / "t.log"
    log.write_text("".join(text + "\n" for _, _, text in lines))
    config = write_config(tmp_path / "b.yaml")
    preprocess.main([str(log), "--output", str(tmp_path / "o"), "--log-format", "<Stamp> <Content>",
                     "--window", "time:10", "--time-field", "Stamp", "--config", str(config)])
    parser = LineParser(Config(), str(tmp_path / "o" / "parser_state.json"), None)
    assert parser.items(lines) == ([Item("event", ("time-window-1",), [0], "t.log:1", lines[0][2]),
                                    Item("close", ("time-window-1",), [], "t.log:2", None),
                                    Item("event", ("time-window-3",), [1], "t.log:2", lines[1][2])], 2, None)


# ----------------------------------------------------------------------------- following files
class Quiet:
    def info(self, *_):
        pass

    warning = info


def take(source, limit=100):
    lines = source.peek(limit)
    source.advance(len(lines))
    return [text for _, text in lines]


def test_a_followed_file_is_read_as_it_grows_rotates_and_is_truncated(tmp_path):
    path = tmp_path / "app.log"
    path.write_bytes(b"one\ntwo\r\nthr")
    source = FollowedFile(str(path), Quiet())
    source.open()
    assert take(source) == ["one", "two"]   # the third line waits for its end
    with open(path, "ab") as handle:
        handle.write(b"ee\rfour\r")
    assert take(source) == ["three"]        # "four\r" may yet become "four\r\n"
    with open(path, "ab") as handle:
        handle.write(b"\nfive\n")
    assert take(source) + take(source) == ["four", "five"]
    assert source.place()["line"] == 5 and source.place()["offset"] == path.stat().st_size
    # rotation: the old file's last lines first (a last one without its end included), then the new file
    with open(path, "ab") as handle:
        handle.write(b"six\nsev")
    os.rename(path, tmp_path / "app.log.1")
    path.write_bytes(b"new one\n")
    assert take(source) + take(source) + take(source) == ["six", "sev", "new one"]
    assert source.place()["line"] == 1
    # truncation (copytruncate): read again from the start
    path.write_bytes(b"")
    assert take(source) == []
    path.write_bytes(b"after\n")
    assert take(source) + take(source) == ["after"]


def test_a_followed_file_that_does_not_exist_yet_is_waited_for(tmp_path):
    path = tmp_path / "later.log"
    source = FollowedFile(str(path), Quiet())
    source.open()
    assert take(source) == []
    path.write_text("first\n")
    assert take(source) == ["first"]


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_sessions):
    """A small model trained and calibrated by train.py on the sample's normal sessions."""
    root = tmp_path_factory.mktemp("live")
    normal, _ = sample_sessions
    data = root / "data"
    data.mkdir()
    (data / "s.jsonl").write_text("".join(json.dumps({"event_ids": s, "session_id": f"n{i}"}) + "\n"
                                          for i, s in enumerate(normal)))
    config = write_config(root / "c.yaml", {"training": {"evaluate_after_training": True, "epochs": 3,
                                                         "learning_rate": 0.01},
                                            "data": {"validation_split": 0.3}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", root / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "out" / "checkpoints" / "best_model.pt"


def event_lines(sessions, seed) -> list[str]:
    items = interleaved_items(sessions, random.Random(seed))
    return [json.dumps({"session_id": item.keys[0], "event_id": item.events[0]}) + "\n" for item in items]


def start(checkpoint, log, output, *flags):
    return subprocess.Popen([sys.executable, str(REPO / "detect.py"), "--checkpoint", str(checkpoint),
                             str(log),
                             "--follow", "--output", str(output), "--idle-lines", "40", "--state-interval",
                             "0.2", *flags], cwd=REPO, stderr=subprocess.PIPE, text=True)


def caught_up(output, log, timeout=120) -> None:
    """Until the place saved by the run started last (a state written after now) is the end of the log."""
    started = time.time()
    deadline = started + timeout
    size = log.stat().st_size
    while time.time() < deadline:
        try:
            state = f"{output}.state"
            if os.stat(state).st_mtime > started and \
                    torch.load(state, weights_only=True)["sources"][0]["offset"] >= size:
                return
        except (OSError, RuntimeError, EOFError):
            pass
        time.sleep(0.1)
    raise AssertionError("detect.py did not catch up")


def stopped(process) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "the same command continues" in stderr
    return stderr


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_restart_after_a_kill_loses_and_repeats_nothing(checkpoint, sample_sessions, tmp_path, how):
    normal, abnormal = sample_sessions
    lines = event_lines(normal[:60] + abnormal[:20], seed=3)
    half = len(lines) // 2
    # one uninterrupted run over the whole log
    whole_log, whole_out = tmp_path / "whole.log", tmp_path / "whole.jsonl"
    whole_log.write_text("".join(lines))
    process = start(checkpoint, whole_log, whole_out)
    caught_up(whole_out, whole_log)
    stopped(process)
    expected = whole_out.read_text()
    assert expected.count('"verdict"') > 20 and '"alert": "early"' in expected
    # the same log, written in two parts, the detector stopped in the middle of the second
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text("".join(lines[:half]))
    process = start(checkpoint, log, out)
    caught_up(out, log)
    with open(log, "a") as handle:
        handle.write("".join(lines[half:]))
    time.sleep(0.3)
    if how == "SIGKILL":
        process.kill()
        process.wait(timeout=60)
    else:
        stopped(process)
    process = start(checkpoint, log, out)
    caught_up(out, log)
    stderr = stopped(process)
    assert "Continuing from" in stderr
    assert out.read_text().replace(str(log), "LOG") == expected.replace(str(whole_log), "LOG")


def test_a_bad_line_stops_with_one_message_and_the_place_before_it(checkpoint, tmp_path):
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text('{"session_id": "a", "event_id": 3}\n{"session_id": "a", "event_id": "x"}\n')
    process = start(checkpoint, log, out)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: {log}: line 2: event_id must be an integer")
    state = torch.load(f"{out}.state", weights_only=True)
    assert state["sources"][0]["line"] == 1 and state["detector"]["keys"] == ["a"]


def test_a_state_of_another_command_is_refused(checkpoint, tmp_path):
    """Another checkpoint or other windows (max_session_events) than the saved state's: refused, naming it
    (idle settings may change: the next test)."""
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text('{"session_id": "a", "event_id": 3}\n')
    process = start(checkpoint, log, out)
    caught_up(out, log)
    stopped(process)
    other = tmp_path / "other.pt"
    other.write_bytes(Path(checkpoint).read_bytes())
    for flags, named in ((["--max-session-events", "7"], "with max_session_events None, not 7"),
                         (["--checkpoint", other], f"with checkpoint '{Path(checkpoint).resolve()}'")):
        result = run_script("detect.py", "--checkpoint", checkpoint, log, "--follow", "--output", out,
                            "--idle-lines", "40", *flags)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"written by a run {named}" in result.stderr, result.stderr


def test_idle_settings_may_change_on_a_restart_and_the_open_sessions_are_kept(checkpoint, sample_sessions,
                                                                               tmp_path):
    """A restart with other --idle-lines / --idle-seconds goes on from the saved state (issue #24 item 4):
    one line says the setting changed, the open sessions saved are kept, and the new setting closes them
    from then on: those already idle by it at once, the others later, each with its verdict."""
    normal, _ = sample_sessions
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text("".join(event_lines(normal[:30], seed=5)))
    process = start(checkpoint, log, out)   # --idle-lines 40
    caught_up(out, log)
    stopped(process)
    first = torch.load(f"{out}.state", weights_only=True)
    seq, last_seq = first["detector"]["seq"], first["detector"]["last_seq"].tolist()
    kept = dict(zip(first["detector"]["keys"], last_seq))
    idle_now = {key for key, last in kept.items() if last <= seq - 5}
    assert len(kept) > len(idle_now) > 0
    written = out.read_text()
    process = start(checkpoint, log, out, "--idle-lines", "5", "--idle-seconds", "3600")
    caught_up(out, log)
    stderr = stopped(process)
    assert "written by a run with" not in stderr and "Continuing from" in stderr
    assert "The idle setting changed from 40 idle lines to 5 idle lines, 3600 idle seconds: the " \
           f"{len(kept)} open sessions saved are kept and close by the new setting from now on " \
           f"({len(idle_now)} of them already idle by it closed now)" in stderr, stderr
    new = [json.loads(line) for line in out.read_text()[len(written):].splitlines()]
    assert out.read_text().startswith(written)
    assert {v["session_id"] for v in new if "verdict" in v} == idle_now
    second = torch.load(f"{out}.state", weights_only=True)
    assert set(second["detector"]["keys"]) == set(kept) - idle_now
    assert (second["identity"]["idle_lines"], second["identity"]["idle_seconds"]) == (5, 3600)
    # the rest close by the new setting as lines come: the 5th line after their last
    with open(log, "a") as handle:
        handle.write("".join(f'{{"session_id": "later{i}", "event_id": 5}}\n' for i in range(5)))
    process = start(checkpoint, log, out, "--idle-lines", "5", "--idle-seconds", "3600")
    caught_up(out, log)
    stderr = stopped(process)
    assert "The idle setting changed" not in stderr   # (the same setting again: nothing said)
    closed = {json.loads(line)["session_id"] for line in out.read_text().splitlines() if '"verdict"' in line}
    assert set(kept) <= closed


def sessions_with_lines(path, runs_of_sessions) -> None:
    """A sessions.jsonl as preprocess.py writes it: each session with its "lines" runs."""
    path.write_text("".join(json.dumps({"session_id": f"s{i}", "event_ids": [1] * sum(r[2] for r in runs),
                                        "label": 0, "lines": runs}) + "\n"
                            for i, runs in enumerate(runs_of_sessions)))


def test_the_live_idle_default_is_derived_from_the_training_datas_gaps(tmp_path):
    """detect.idle_lines null: the parser state's session_idle, else the training data's p99.9 gap between a
    session's consecutive lines times the margin (at least the floor), else 100,000 (issue #24 item 4)."""
    from types import SimpleNamespace

    data = tmp_path / "sessions.jsonl"
    # gaps: 1 (inside a run) x 2, 3, 250, and none across files ([1, ...] after [0, ...])
    sessions_with_lines(data, [[[0, 1, 2], [0, 5, 1]], [[0, 2, 2], [0, 253, 1], [1, 1, 1]], [[0, 9, 1]]])
    assert D.session_gaps(data) == {1: 2, 3: 1, 250: 1}
    assert D.gap_quantile(Counter({1: 998, 7: 1, 300: 1}), 0.999) == 7
    config = Config()
    config.data.preprocessed_dir = str(tmp_path)
    keyed = SimpleNamespace(windows=None, cfg=SimpleNamespace(session_idle=None))
    value, why = D.live_idle_lines(config, keyed, None)
    assert value == 250 * D.IDLE_GAP_MARGIN and "derived from the training data" in why
    assert str(tmp_path) in why
    # the live clock counts only the lines that name a session: the gaps scaled by their share in the parse
    (tmp_path / "sources.json").write_text(json.dumps({"files": ["a.log", "b.log"], "stats": {
        "lines": 1000, "parsed": 900, "bad_time": 0, "lines_without_key": 400}}))
    value, why = D.live_idle_lines(config, keyed, None)
    assert value == 250 * 0.5 * D.IDLE_GAP_MARGIN and "x 0.50 (the share of lines naming a session)" in why
    sessions_with_lines(data, [[[0, 1, 3]], [[0, 4, 1], [0, 10, 2]]])   # small gaps: the floor
    assert D.live_idle_lines(config, keyed, None)[0] == D.MIN_IDLE_LINES
    # no line positions in the training data, nor beside the parser state: today's default
    data.write_text(json.dumps({"session_id": "a", "event_ids": [1, 2]}) + "\n")
    state = tmp_path / "parse" / "parser_state.json"
    state.parent.mkdir()
    assert D.live_idle_lines(config, keyed, str(state))[0] == D.DEFAULT_IDLE_LINES
    # ... where the parse of the parser state has them (its sessions.jsonl), from there
    sessions_with_lines(state.parent / "sessions.jsonl", [[[0, 1, 1], [0, 301, 1]]])
    assert D.live_idle_lines(config, keyed, str(state))[0] == 600
    # the parser state's session_idle and an explicit detect.idle_lines come first; windows have none
    assert D.live_idle_lines(config, SimpleNamespace(windows=None, cfg=SimpleNamespace(session_idle=77)),
                             None)[0] == 77
    assert D.live_idle_lines(config, SimpleNamespace(windows=object(), cfg=None), None)[0] is None
    config.detect.idle_lines = 9
    assert D.live_idle_lines(config, keyed, None) == (9, "detect.idle_lines")


def test_a_small_live_log_gets_verdicts_by_the_derived_idle_default(checkpoint, sample_sessions, tmp_path):
    """A model trained on preprocess.py's sessions (line positions): a live run without --idle-lines closes
    the sessions of a small log that have gone quiet (with 100,000 it said nothing but early alerts)."""
    normal, _ = sample_sessions
    stored = torch.load(checkpoint, weights_only=True)
    data = tmp_path / "train" / "sessions.jsonl"
    data.parent.mkdir()
    sessions_with_lines(data, [[[0, 1 + 3 * i, 2], [0, 30 + 3 * i, 1]] for i in range(50)])   # gaps 1 and 28
    stored["config"]["data"]["preprocessed_dir"] = str(data)
    trained = tmp_path / "model.pt"
    torch.save(stored, trained)
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    sessions = normal[:60]
    log.write_text("".join(json.dumps({"session_id": f"s{i}", "event_id": e}) + "\n"   # one after another
                           for i, s in enumerate(sessions) for e in s))
    lines = sum(map(len, sessions))
    process = subprocess.Popen([sys.executable, str(REPO / "detect.py"), "--checkpoint", str(trained),
                                str(log), "--follow", "--output", str(out), "--state-interval", "0.2"],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    caught_up(out, log)
    stderr = stopped(process)
    assert f"sessions close after {D.MIN_IDLE_LINES} idle lines" in stderr, stderr
    assert "derived from the training data: 99.9% of the 100 gaps between a session's consecutive lines in " \
           f"{data} are at most 28 lines" in stderr, stderr
    ends, at = [], 0
    for s in sessions:
        at += len(s)
        ends.append(at)
    quiet = {f"s{i}" for i, end in enumerate(ends) if end <= lines - D.MIN_IDLE_LINES}
    verdicts = {json.loads(line)["session_id"] for line in out.read_text().splitlines()
                if '"verdict"' in line}
    assert quiet and verdicts == quiet


DAMAGES = {   # what is done to a saved state -> what the refusal names
    "not a state": (lambda state: [1, 2], "not a detect.py state"),
    "old version": (lambda state: {**state, "version": 1}, "state version 1, this detect.py reads 2"),
    "events cut": (lambda state: state["detector"].update(events=state["detector"]["events"][:-1]),
                   "the open sessions' events are damaged"),
    "negative event": (lambda state: state["detector"]["events"].__setitem__(0, -5),
                       "the open sessions' events are damaged"),
    "lengths of floats": (lambda state: state["detector"].update(
        lengths=state["detector"]["lengths"].double()), "the open sessions' 'lengths' is damaged"),
    "a key twice": (lambda state: state["detector"]["keys"].__setitem__(1, state["detector"]["keys"][0]),
                    "the open sessions' keys are damaged"),
    "misses of another session": (lambda state: state["detector"].update(misses={"sessions": [99],
                                                                                 "misses": [[]]}),
                                  "the open sessions' misses are damaged"),
    "state of fewer sessions": (lambda state: state["detector"]["model"].update(
        h=state["detector"]["model"]["h"][:, :1]), "the open sessions' model state is damaged"),
    "columns of another calibration": (lambda state: state["detector"]["model"]["columns"].update(
        misses_at_99=torch.zeros(3)), "the open sessions' model state is damaged"),
    "a place of text": (lambda state: state["sources"][0].update(offset="12"), "'sources' is damaged"),
}


@pytest.mark.parametrize("stop", ["SIGINT", "a damaged state"])
def test_a_stop_or_an_error_while_starting_releases_the_lock(checkpoint, tmp_path, monkeypatch, capsys, stop):
    """A Ctrl-C while a live run loads its state (or an error there) leaves no lock held behind: the next
    run starts without taking over a dead holder's lock."""
    import live_state
    import utils
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text("".join(f'{{"session_id": "s{i % 3}", "event_id": {5 + i % 4}}}\n' for i in range(12)))

    def load(*_):
        raise utils.Stopped("SIGINT") if stop == "SIGINT" else utils.ConfigError("the state is damaged")
    monkeypatch.setattr(live_state.LiveState, "load", load)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as code:
            D.main(["--checkpoint", str(checkpoint), str(log), "--follow", "--output", str(out)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code.value.code == (130 if stop == "SIGINT" else 2)
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        ("stopped by SIGINT" if stop == "SIGINT" else "error: the state is damaged")
    assert (tmp_path / ".app.jsonl.state.lock").read_text() == ""   # released, not held by a dead run


def test_a_stop_signal_taken_by_another_thread_waits_for_the_chunk_to_be_written(tmp_path, monkeypatch):
    """A thread that does not block the signal (torch's, OpenBLAS's) takes it; the handler must still wait
    until the chunk is written whole (it is held by its handler, not by the signal mask)."""
    import threading

    import utils
    done = threading.Event()
    helper = threading.Thread(target=done.wait)   # started before the write: the signal is not masked in it
    helper.start()
    real_write, calls = os.write, []

    def write(descriptor, data):   # 10 bytes a call; the signal comes at the first
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)   # (the other thread takes it meanwhile)
        return real_write(descriptor, bytes(data[:10]))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    counted = []
    try:
        utils.StopSignal(raise_now=True)
        monkeypatch.setattr(os, "write", write)
        with open(tmp_path / "out.jsonl", "w") as out, pytest.raises(utils.Stopped):
            D.write_chunk(out, '{"session_id": "a", "verdict": "normal"}\n' * 3,
                          then=lambda: counted.append(1))
    finally:
        monkeypatch.undo()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        done.set()
        helper.join()
    assert (tmp_path / "out.jsonl").read_text() == '{"session_id": "a", "verdict": "normal"}\n' * 3
    assert counted == [1] and len(calls) > 1


def test_a_damaged_state_is_one_line_naming_it_and_nothing_is_written(checkpoint, tmp_path):
    """Each damage of the state file: one error line naming the file and what is wrong, exit 2, the
    output and the state left as they were."""
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text("".join(f'{{"session_id": "s{i % 3}", "event_id": {5 + i % 4}}}\n' for i in range(12)))
    process = start(checkpoint, log, out)
    caught_up(out, log)
    stopped(process)
    state_path = Path(f"{out}.state")
    good = torch.load(state_path, weights_only=True)
    assert good["detector"]["keys"] == ["s0", "s1", "s2"]
    assert good["detector"]["lengths"].tolist() == [4, 4, 4]
    identity = good["identity"]
    for name, (damage, problem) in DAMAGES.items():
        state = copy.deepcopy(good)
        state = damage(state) or state
        assert state_problem(state, identity, good["detector"]["model"]["columns"]) == problem, name
    lost = copy.deepcopy(good)   # a state tensor missing: named by the model's own state names
    del lost["detector"]["model"][DeepLog.state_names[-1]]
    assert state_problem(lost, identity, good["detector"]["model"]["columns"], DeepLog.state_names) == \
        "the open sessions' model state is damaged"
    state = copy.deepcopy(good)
    DAMAGES["events cut"][0](state)
    torch.save(state, state_path)
    before = (out.read_bytes(), state_path.read_bytes())
    result = run_script("detect.py", "--checkpoint", checkpoint, log, "--follow", "--output", out,
                        "--idle-lines", "40")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {state_path}: the open sessions' events are damaged; remove {state_path} (and the output it "
        "belongs to) to start over")
    assert (out.read_bytes(), state_path.read_bytes()) == before


def test_a_second_detector_on_the_same_output_is_refused(checkpoint, tmp_path):
    log, out = tmp_path / "app.log", tmp_path / "app.jsonl"
    log.write_text('{"session_id": "a", "event_id": 3}\n')
    first = start(checkpoint, log, out)
    caught_up(out, log)
    second = run_script("detect.py", "--checkpoint", checkpoint, log, "--follow", "--output", out,
                        "--idle-lines", "40")
    stopped(first)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "is in use by another run (pid" in second.stderr.strip().splitlines()[-1]


def test_standard_input_is_read_to_its_end(checkpoint, sample_sessions, tmp_path):
    normal, _ = sample_sessions
    text = "".join(" ".join(map(str, s)) + "\n" for s in normal[:30])
    result = subprocess.run([sys.executable, str(REPO / "detect.py"), "--checkpoint", str(checkpoint), "-",
                             "--follow"], cwd=REPO, input=text, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in result.stdout.splitlines() if '"verdict"' in line]
    assert [v["session_id"] for v in verdicts] == [f"-:{i}" for i in range(1, 31)]


def test_live_raw_logs_through_the_parser_state_give_the_batch_verdicts(tmp_path):
    """Raw lines parsed in the worker process (and here), grouped by the saved session key: the verdicts of
    detect.py on the finished file, and each miss names its raw line."""
    from test_preprocess import block_log, line, run

    lines = []
    for start in range(0, 120, 20):
        lines += block_log(range(start, start + 20), second=start)
    write_config(tmp_path / "base.yaml")   # the tiny model
    run(tmp_path, lines, "--session-key", r"blk_-?\d+")
    out = tmp_path / "out"
    result = run_script("train.py", "--config", out / "config.yaml", "--epochs", "1", "--device", "cpu",
                        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = out / "train" / "checkpoints" / "best_model.pt"
    (tmp_path / "quiet").mkdir()   # normal sessions to fit thresholds on (a tiny run does not calibrate)
    (tmp_path / "quiet" / "s.jsonl").write_text((out / "sessions.jsonl").read_text())
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--calibrate-on", tmp_path / "quiet",
                        "--output-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-2000:]
    calibration = next((tmp_path / "eval").glob("calibration_*.json"))
    today = block_log(range(500, 530))
    today.insert(7, line(9, "Checksum error on blk_503 from disk sda3"))   # a template never seen
    log = tmp_path / "app.log"
    log.write_text("\n".join(today) + "\n")
    common = ["--checkpoint", str(checkpoint), "--parser-state", str(out / "parser_state.json"),
              "--calibration", str(calibration)]
    batch_out = tmp_path / "batch.jsonl"
    result = run_script("detect.py", *common, log, "--output", batch_out)
    assert result.returncode == 0, result.stderr[-2000:]
    batch = {d["session_id"]: d for d in map(json.loads, batch_out.read_text().splitlines())}
    live = subprocess.run([sys.executable, str(REPO / "detect.py"), *common, "-", "--follow"], cwd=REPO,
                          input=log.read_text(), capture_output=True, text=True, timeout=300)
    assert live.returncode == 0, live.stderr[-2000:]
    verdicts = {d["session_id"]: d for d in map(json.loads, live.stdout.splitlines()) if "verdict" in d}
    assert sorted(verdicts) == sorted(batch) and len(batch) == 30
    for name, verdict in verdicts.items():
        assert (verdict["verdict"], verdict["score"]) == (batch[name]["verdict"], batch[name]["score"])
        assert [m["position"] for m in verdict["misses"]] == [m["position"] for m in batch[name]["misses"]]
    assert verdicts["blk_503"]["verdict"] == "abnormal"
    assert any(m.get("raw") == today[7] and m["at"] == "-:8" for m in verdicts["blk_503"]["misses"])
    # each miss names its events in words, batch and live alike, the IDs unchanged (issue #24)
    templates = {t["id"]: t["template"] for t in json.loads((out / "templates.json").read_text())}
    unknown = len(templates)   # the ID of a line no template matches
    for verdict in [*verdicts.values(), *batch.values()]:
        for miss in verdict["misses"]:
            assert miss["actual_template"] == {"<end>": "<end of session>",
                                               unknown: "<unknown: the line matched no template of the "
                                                        "parser>"}.get(miss["actual"],
                                                                       templates.get(miss["actual"])), miss
            assert miss["expected_templates"] == ["<end of session>" if e == "<end>" else templates[e]
                                                  for e in miss["expected"]], miss
    checksum = next(m for m in batch["blk_503"]["misses"] if m.get("raw") == today[7])
    assert checksum["actual"] == unknown and "unknown" in checksum["actual_template"]
    assert [m["actual_template"] for m in verdicts["blk_503"]["misses"]] == \
        [m["actual_template"] for m in batch["blk_503"]["misses"]]
    alerts = [a for a in map(json.loads, live.stdout.splitlines()) if a.get("alert") == "early"]
    assert alerts and all(a["event_template"] for a in alerts)
    # the same logs through preprocess.py --parser-state: detect.py finds templates.json beside the sessions
    result = run_script("preprocess.py", log, "--parser-state", out / "parser_state.json",
                        "--output", tmp_path / "today", "--config", tmp_path / "base.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("detect.py", *common[:2], *common[4:], tmp_path / "today" / "sessions.jsonl",
                        "--output", tmp_path / "today.jsonl")
    assert result.returncode == 0, result.stderr[-2000:]
    today_verdicts = {d["session_id"]: d for d in map(json.loads, (tmp_path / "today.jsonl").read_text()
                                                      .splitlines())}
    # there the checksum line made a template of its own (a new ID), which the model never saw
    assert [m["actual_template"] for m in today_verdicts["blk_503"]["misses"]] == \
        [m["actual_template"] if m.get("raw") != today[7] else
         "<unknown to the model, never seen in training> Checksum error on <*> from disk sda3"
         for m in batch["blk_503"]["misses"]]
    print(json.dumps(checksum))


def test_the_word_by_word_masker_gives_drain3s_masks():
    """fast_masker equals drain3's masker.mask (a user mask, the built-in alternation, the run of <*>) on
    every line of the loghub samples and on random text with spaces, tabs, <*> and non-ASCII digits."""
    import glob

    miner = logparse.make_miner({"sim_th": 0.45, "depth": 4, "max_children": 100, "max_clusters": None},
                                  [r"user\d+x", *logparse.BUILT_IN_MASKS])
    fast = logparse.fast_masker(miner.masker)
    # the loghub samples where ../shared has them, random text always
    samples = glob.glob(str(REPO.parent / "shared" / "data" / "loghub" / "*_2k.log"))
    texts = [line.rstrip("\n") for path in samples for line in open(path, errors="replace")]
    rng = random.Random(0)
    alphabet = "ab_ 0123456789.:/-+xX<*>\t\u0663eF"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(20_000)]
    texts += ["blk_-42 10.0.0.1:50010 /a/b 0x1F  deadbeef12 user7x <*> <*>", " lead and trail ", "",
              "7 007 12345678 123456789012 12345678\u0663 \u0663\u0663 1\u00b2 -5 +5 5.5 5x x5"]
    mismatched = [text for text in texts if fast(text) != miner.masker.mask(text)]
    assert not mismatched, mismatched[:3]
    assert fast("blk_-42 size 67108864") == "<*> size <*>"


def test_live_speed_leaves_the_waiting_out():
    """800 lines scored in 2 s of work over 100 s of a quiet log: 400 lines/s, not 8."""
    from detect import LiveRun
    run = LiveRun.__new__(LiveRun)
    run.taken, run.first_at, run.last_at, run.busy = 800, 10.0, 110.0, 2.0
    assert run.speed() == ("; 800 lines in 2.0 s of reading, parsing and scoring (100.0 s from the first "
                           "read to the last scored, waiting for input included): 400 lines/s")
