"""preprocess.py: templates, sessions, windows, labels, parser state (validated), provenance, errors, the
output folder (locked, one parse shown whole), training on its output."""
from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_script, write_config

import logparse
import preprocess

LOGHUB = REPO.parent / "shared" / "data" / "loghub"
needs_loghub = pytest.mark.skipif(not (LOGHUB / "HDFS_2k.log").exists(),
                                  reason="../shared/data/loghub is absent")
FORMAT = "<Date> <Time> <Level> <Component>: <Content>"


def line(second: int, content: str, level: str = "INFO") -> str:
    return f"2024-01-01 00:{second // 60:02d}:{second % 60:02d} {level} svc.Store: {content}"


def block_log(blocks: range, second: int = 0) -> list[str]:
    """Each block: open, two writes, close; blocks interleaved; one copy line naming two blocks."""
    lines = []
    for b in blocks:
        lines += [line(second, f"Opened block blk_{b} on 10.0.{b % 250}.1:80{b % 90:02d}"),
                  line(second + 1, f"Wrote {100 + b} bytes to blk_{b} in {b % 7}.5 ms")]
    for b in blocks:
        lines += [line(second + 2, f"Wrote {900 + b} bytes to blk_{b} in {b % 3}.25 ms"),
                  line(second + 3, f"Closed block blk_{b} after 0x{b:04x} checks")]
    return lines


def run(tmp_path: Path, log_lines: list[str], *flags, name="log.txt", output="out") -> dict:
    log = tmp_path / name
    log.write_text("\n".join(log_lines) + "\n")
    out = tmp_path / output
    preprocess.main([str(log), "--output", str(out), "--log-format", FORMAT,
                     "--config", str(tmp_path / "base.yaml"), *map(str, flags)])
    return read_output(out)


def read_output(out: Path) -> dict:
    return {"sessions": [json.loads(x) for x in (out / "sessions.jsonl").read_text().splitlines()],
            "templates": json.loads((out / "templates.json").read_text()),
            "sources": json.loads((out / "sources.json").read_text())}


@pytest.fixture(autouse=True)
def base_config(tmp_path):
    return write_config(tmp_path / "base.yaml")


def test_templates_dense_in_order_of_first_appearance(tmp_path):
    result = run(tmp_path, block_log(range(1, 6)), "--session-key", r"blk_-?\d+")
    assert [(t["id"], t["template"], t["count"]) for t in result["templates"]] == [
        (0, "Opened block <*> on <*>", 5), (1, "Wrote <*> bytes to <*> in <*> ms", 10),
        (2, "Closed block <*> after <*> checks", 5)]
    stats = result["sources"]["stats"]
    assert (stats["lines"], stats["parsed"], stats["unmatched"], stats["templates"]) == (20, 20, 0, 3)
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "vocab_size: 3" in config and str(tmp_path / "out" / "sessions.jsonl") in config


def test_sessions_by_key_with_a_line_naming_two_blocks(tmp_path):
    lines = block_log(range(1, 4))
    lines.insert(4, line(5, "Copy blk_1 to blk_3 started", level="WARN"))
    lines.append("garbage that does not fit the format")
    result = run(tmp_path, lines, "--session-key", r"blk_-?\d+")
    sessions = {s["session_id"]: s for s in result["sessions"]}
    assert list(sessions) == ["blk_1", "blk_2", "blk_3"]  # in order of first appearance
    # IDs in order of first appearance: open 0, write 1, copy 2 (line 5), close 3
    assert sessions["blk_1"]["event_ids"] == [0, 1, 2, 1, 3]
    assert sessions["blk_3"]["event_ids"] == [2, 0, 1, 1, 3]
    assert sessions["blk_2"]["event_ids"] == [0, 1, 1, 3]
    # provenance: line numbers of each event, as runs [file, first line, count]
    assert sessions["blk_1"]["lines"] == [[0, 1, 2], [0, 5, 1], [0, 8, 2]]
    assert sessions["blk_2"]["lines"] == [[0, 3, 2], [0, 10, 2]]
    stats = result["sources"]["stats"]
    assert stats["unmatched"] == 1 and stats["sessions"] == 3 and stats["abnormal"] == 0
    assert result["sources"]["files"] == [str((tmp_path / "log.txt").resolve())]


def test_a_capture_group_in_the_session_key_is_the_session_id(tmp_path):
    lines = [line(0, "sshd[24200]: Accepted password for root"), line(1, "sshd[24201]: Accepted key for bob"),
             line(2, "sshd[24200]: session closed for root"), line(3, "cron[7]: job done")]
    result = run(tmp_path, lines, "--session-key", r"sshd\[(\d+)\]")
    assert [s["session_id"] for s in result["sessions"]] == ["24200", "24201"]
    assert [len(s["event_ids"]) for s in result["sessions"]] == [2, 1]
    # the same state detects raw lines with the same ids; a group that takes no part gives the whole match
    found = preprocess.sessions_from_logs(str(tmp_path / "out" / "parser_state.json"),
                                          [str(tmp_path / "log.txt")])
    assert [s["session_id"] for s in found] == ["24200", "24201"]
    either = run(tmp_path, lines, "--session-key", r"sshd\[(\d+)\]|cron\[\d+\]", output="either")
    assert [s["session_id"] for s in either["sessions"]] == ["24200", "24201", "cron[7]"]


def test_count_windows_and_label_field(tmp_path):
    fmt = "<Label> <Stamp> <Content>"
    lines = [f"{'-' if i != 5 else 'KERNDTLB'} {1000 + i} event number {i} happened" if i % 2 else
             f"- {1000 + i} node R0{i} is up" for i in range(10)]
    log = tmp_path / "bgl.log"
    log.write_text("\n".join(lines) + "\n")
    preprocess.main([str(log), "--output", str(tmp_path / "w"), "--log-format", fmt, "--window", "count:4:2",
                     "--label-field", "Label", "--normal-value", "-",
                     "--config", str(tmp_path / "base.yaml")])
    windows = read_output(tmp_path / "w")["sessions"]
    # [0,4) [2,6) [4,8) [6,10): line 6 (index 5) is the alert
    assert [[r[1] for r in w["lines"]] for w in windows] == [[1], [3], [5], [7]]
    assert [sum(r[2] for r in w["lines"]) for w in windows] == [4, 4, 4, 4]
    assert [w["label"] for w in windows] == [0, 1, 1, 0]
    assert [w["event_ids"] for w in windows][0] == [0, 1, 0, 1]


def test_count_windows_tumbling_with_partial_tail(tmp_path):
    fmt = "<Stamp> <Content>"
    result_dir = tmp_path / "w"
    (tmp_path / "l.log").write_text("".join(f"{i} tick {i}\n" for i in range(7)))
    preprocess.main([str(tmp_path / "l.log"), "--output", str(result_dir), "--log-format", fmt,
                     "--window", "count:3", "--config", str(tmp_path / "base.yaml")])
    windows = read_output(result_dir)["sessions"]
    assert [w["lines"] for w in windows] == [[[0, 1, 3]], [[0, 4, 3]], [[0, 7, 1]]]


def test_time_windows_slide_and_jump_gaps(tmp_path):
    fmt = "<Label> <Stamp> <Content>"
    times = [0, 1, 2, 7, 12, 30, 31]
    lines = [f"{'FATAL' if t == 12 else '-'} {1_700_000_000 + t} job step {t} done" for t in times]
    log = tmp_path / "t.log"
    log.write_text("\n".join(lines) + "\n")
    preprocess.main([str(log), "--output", str(tmp_path / "w"), "--log-format", fmt, "--window", "time:10:5",
                     "--time-field", "Stamp", "--label-field", "Label",
                     "--config", str(tmp_path / "base.yaml")])
    windows = read_output(tmp_path / "w")["sessions"]
    members = [[times[line - 1] for _, first, count in w["lines"] for line in range(first, first + count)]
               for w in windows]
    assert members == [[0, 1, 2, 7], [7, 12], [12], [30, 31]]  # [0,10) [5,15) [10,20) ... [25,35)
    assert [w["label"] for w in windows] == [0, 1, 1, 0]


def test_time_format_parses_bgl_style_times(tmp_path):
    fmt = "<Time> <Content>"
    lines = [f"2005-06-03-15.42.{s:02d}.675872 instruction cache parity error corrected"
             for s in (0, 5, 20, 21)]
    (tmp_path / "b.log").write_text("\n".join(lines) + "\nnot-a-time something\n")
    preprocess.main([str(tmp_path / "b.log"), "--output", str(tmp_path / "w"), "--log-format", fmt,
                     "--window", "time:10", "--time-field", "Time", "--time-format", "%Y-%m-%d-%H.%M.%S.%f",
                     "--config", str(tmp_path / "base.yaml")])
    result = read_output(tmp_path / "w")
    assert [len(w["event_ids"]) for w in result["sessions"]] == [2, 2]
    assert result["sources"]["stats"]["bad_time"] == 1


def test_labels_from_csv(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("BlockId,Label\nblk_1,Normal\nblk_2,Anomaly\n")
    result = run(tmp_path, block_log(range(1, 4)), "--session-key", r"blk_-?\d+", "--labels",
                 tmp_path / "labels.csv")
    assert {s["session_id"]: s["label"] for s in result["sessions"]} == {"blk_1": 0, "blk_2": 1, "blk_3": 0}
    assert result["sources"]["stats"]["unlabelled"] == 1
    assert "1 sessions missing from --labels" in capsys.readouterr().err


@pytest.mark.parametrize("match_only", [False, True])
def test_parser_state_maps_new_data_onto_the_same_ids(tmp_path, capsys, match_only):
    """Known lines keep their IDs; a line no template matches makes a new template with the next ID (kept in
    the new parser state and templates.json, named in a warning), or with --match-only gets ID vocab_size."""
    learned = run(tmp_path, block_log(range(1, 6)), "--session-key", r"blk_-?\d+")
    state = json.loads((tmp_path / "out" / "parser_state.json").read_text())
    assert state["vocab_size"] == 3 and "py/object" not in json.dumps(state)  # plain JSON, not jsonpickle
    new = block_log(range(40, 42), second=100) + [line(200, "Evicted blk_40 from cache")]
    log = tmp_path / "new.log"
    log.write_text("\n".join(new) + "\n")
    capsys.readouterr()
    preprocess.main([str(log), "--output", str(tmp_path / "new"), "--parser-state",
                     str(tmp_path / "out" / "parser_state.json"), "--session-key", r"blk_-?\d+",
                     "--structured", str(tmp_path / "new.csv"), *(["--match-only"] if match_only else [])])
    result = read_output(tmp_path / "new")
    sessions = {s["session_id"]: s["event_ids"] for s in result["sessions"]}
    assert sessions == {"blk_40": [0, 1, 1, 2, 3], "blk_41": [0, 1, 1, 2]}  # 3: the line no template matched
    old = [(t["id"], t["template"]) for t in learned["templates"]]
    got = [(t["id"], t["template"]) for t in result["templates"]]
    new_state = json.loads((tmp_path / "new" / "parser_state.json").read_text())
    assert result["sources"]["stats"]["unknown"] == 1
    assert not (tmp_path / "new" / "config.yaml").exists()  # unknown IDs are for detection, not training
    rows = list(csv.DictReader((tmp_path / "new.csv").open()))
    assert [t["count"] for t in result["templates"]][:3] == [2, 4, 2]  # counted in this data
    warning = capsys.readouterr().err
    if match_only:
        assert got == old and new_state["vocab_size"] == 3 and "new templates" not in warning
        assert (rows[-1]["EventId"], rows[-1]["EventTemplate"]) == ("3", "<unknown>")
    else:
        assert got == old + [(3, "Evicted <*> from cache")] and new_state["vocab_size"] == 4
        assert {t["id"]: t["template"] for t in new_state["templates"]}[3] == "Evicted <*> from cache"
        assert "1 new templates (event IDs 3..3" in warning
        assert (rows[-1]["EventId"], rows[-1]["EventTemplate"]) == ("3", "Evicted <*> from cache")
        # a later parse through the new state keeps the new ID, and learns nothing more
        preprocess.main([str(log), "--output", str(tmp_path / "later"), "--parser-state",
                         str(tmp_path / "new" / "parser_state.json")])
        later = read_output(tmp_path / "later")
        assert {s["session_id"]: s["event_ids"] for s in later["sessions"]} == sessions
        assert len(later["templates"]) == 4 and later["sources"]["stats"]["unknown"] == 0


def test_parser_state_refuses_parser_flags(tmp_path):
    run(tmp_path, block_log(range(1, 3)), "--session-key", r"blk_-?\d+")
    result = run_script("preprocess.py", tmp_path / "log.txt", "--output", tmp_path / "again",
                        "--parser-state", tmp_path / "out" / "parser_state.json", "--session-key", "blk_\\d+",
                        "--similarity", "0.7")
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: --parser-state fixes the parser: drop --similarity"


def test_gzip_input_and_directory(tmp_path):
    lines = block_log(range(1, 4))
    plain = run(tmp_path, lines, "--session-key", r"blk_-?\d+")
    logs = tmp_path / "logs"
    logs.mkdir()
    with gzip.open(logs / "a.log.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    preprocess.main([str(logs), "--output", str(tmp_path / "gz"), "--log-format", FORMAT,
                     "--session-key", r"blk_-?\d+", "--config", str(tmp_path / "base.yaml")])
    packed = read_output(tmp_path / "gz")
    assert packed["sessions"] == plain["sessions"] and packed["templates"] == plain["templates"]
    assert packed["sources"]["files"] == [str((logs / "a.log.gz").resolve())]


def test_structured_csv_has_final_templates_and_a_row_per_line(tmp_path):
    lines = [line(1, "User alice logged in"), "no format here", line(2, "User bob logged in")]
    run(tmp_path, lines, "--session-key", "User \\w+", "--structured", tmp_path / "s.csv",
        "--no-default-masks")
    rows = list(csv.reader((tmp_path / "s.csv").open()))
    # loghub's columns: the fields of the log format between LineId and EventId; the first row's template is
    # the one Drain ended with, not "User alice logged in"
    assert rows == [["LineId", "Date", "Time", "Level", "Component", "Content", "EventId", "EventTemplate"],
                    ["1", "2024-01-01", "00:00:01", "INFO", "svc.Store", "User alice logged in", "0",
                     "User <*> logged in"],
                    ["2", "", "", "", "", "", "", ""],
                    ["3", "2024-01-01", "00:00:02", "INFO", "svc.Store", "User bob logged in", "0",
                     "User <*> logged in"]]


def test_masks_and_no_default_masks(tmp_path):
    lines = [line(1, "disk sda failed at 10.1.2.3:99"), line(2, "disk sdb failed at 10.1.2.4:99")]
    masked = run(tmp_path, lines, "--session-key", "sd[a-z]", "--mask", r"sd[a-z]")["templates"]
    assert [t["template"] for t in masked] == ["disk <*> failed at <*>"]
    raw = run(tmp_path, lines, "--session-key", "sd[a-z]", "--no-default-masks", "--similarity", "1.0",
              output="raw")["templates"]
    assert len(raw) == 2


def test_preprocess_section_of_the_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text() + "preprocess:\n  session_key: 'blk_-?\\d+'\n  log_format: '" + FORMAT
                    + "'\n")
    (tmp_path / "l.log").write_text("\n".join(block_log(range(1, 3))) + "\n")
    preprocess.main([str(tmp_path / "l.log"), "--output", str(tmp_path / "o"), "--config", str(base)])
    assert len(read_output(tmp_path / "o")["sessions"]) == 2
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())  # the one config, as resolved
    assert saved["preprocess"]["session_key"] == r"blk_-?\d+" and saved["preprocess"]["log_format"] == FORMAT
    base.write_text(base.read_text() + "  windw: count:5\n")
    result = run_script("preprocess.py", tmp_path / "l.log", "--output", tmp_path / "o2", "--config", base)
    assert result.returncode == 2 and "unknown config key 'preprocess.windw'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("section, message", [
    ("windw: count:5", "unknown config key 'preprocess.windw'"),
    ("depth: '4'", "'preprocess.depth' must be int, got '4'"),
    ("similarity: high", "'preprocess.similarity' must be float, got 'high'"),
    ("default_masks: 1", "'preprocess.default_masks' must be bool"),
    ("masks: blk_\\d+", "'preprocess.masks' must be list"),
    ("masks: [1]", "'preprocess.masks' must be a list of strings"),
    ("session_idle: -1", "'preprocess.session_idle' must be null or >= 1"),
    ("similarity: 1.5", "'preprocess.similarity' must be in [0, 1]"),
])
def test_a_bad_preprocess_section_is_one_line_naming_the_key(tmp_path, capsys, section, message):
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text() + f"preprocess:\n  {section}\n")
    (tmp_path / "l.log").write_text("\n".join(block_log(range(1, 3))) + "\n")
    with pytest.raises(SystemExit) as exit_code:
        preprocess.main([str(tmp_path / "l.log"), "--output", str(tmp_path / "o"), "--config", str(base),
                         "--log-format", FORMAT, "--session-key", "blk_\\d+"])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("flags, message", [
    (["--log-format", "<Date> <Time> <Level>"], "no <Content>"),
    (["--log-format", "<Date> <Bad Field> <Content>"], "bad field name <Bad Field>"),
    (["--session-key", "blk_("], "--session-key 'blk_(': not a regular expression"),
    (["--window", "count:0"], "--window 'count:0'"),
    (["--window", "time:60"], "needs --time-field"),
    (["--session-key", "x", "--window", "count:5"], "give either --session-key"),
    (["--label-field", "Level"], "--label-field groups lines: give --session-key or --window too"),
    (["--log-format", "<Date> [<Level>] <Content>", "--window", "count:5"],
     "the text between fields is a regular"),
])
def test_bad_settings_give_one_line_and_exit_2(tmp_path, capsys, flags, message):
    (tmp_path / "l.log").write_text(line(1, "hello") + "\n")
    with pytest.raises(SystemExit) as exit_code:  # (in-process: an uncaught error would fail the test)
        preprocess.main([str(tmp_path / "l.log"), "--output", str(tmp_path / "o"),
                         *(flags if "--log-format" in flags else ["--log-format", FORMAT, *flags])])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before --output is made


def test_missing_file_and_no_matching_line(tmp_path):
    result = run_script("preprocess.py", tmp_path / "absent.log", "--output", tmp_path / "o",
                        "--session-key", "x")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'absent.log'}: no such file or directory"
    (tmp_path / "l.log").write_text("free text\n")
    result = run_script("preprocess.py", tmp_path / "l.log", "--output", tmp_path / "o", "--session-key", "x",
                        "--log-format", FORMAT)
    assert result.returncode == 2 and "no line matches --log-format" in result.stderr
    assert not (tmp_path / "o" / "sessions.jsonl").exists()


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    import errno

    import utils
    real = utils.atomic_write

    class FullDisk:  # the handle of an atomic write on a disk that is full
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils, "atomic_write", lambda path, write: real(path, lambda h: write(FullDisk(h))))
    (tmp_path / "log.txt").write_text("\n".join(block_log(range(3))) + "\n")
    with pytest.raises(SystemExit) as exit_code:
        preprocess.main([str(tmp_path / "log.txt"), "--output", str(tmp_path / "out"), "--log-format", FORMAT,
                         "--session-key", r"blk_-?\d+", "--config", str(tmp_path / "base.yaml")])
    assert exit_code.value.code == 1
    assert capsys.readouterr().err.strip() == \
        f"error: {tmp_path / 'out' / 'sessions.jsonl'}: No space left on device"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]  # no generation, no temp file


def test_written_files_follow_the_umask(tmp_path):
    import os
    (tmp_path / "log.txt").write_text("\n".join(block_log(range(3))) + "\n")
    mask = os.umask(0o027)  # inherited by the script
    try:
        result = run_script("preprocess.py", tmp_path / "log.txt", "--output", tmp_path / "out",
                            "--log-format", FORMAT, "--session-key", r"blk_-?\d+",
                            "--config", tmp_path / "base.yaml")
    finally:
        os.umask(mask)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert {oct((out / name).stat().st_mode & 0o777) for name in preprocess.OUTPUT_FILES} == {oct(0o640)}
    assert oct((out / "current").stat().st_mode & 0o777) == oct(0o750)  # the generation folder


def test_generated_config_trains_and_detection_shows_the_raw_line_of_each_miss(tmp_path):
    """preprocess -> train -> evaluate --detect on new raw logs through the parser state: the block with a
    line no template matches is abnormal, and its miss names that line (file:line) and shows it."""
    lines = []
    for start in range(0, 120, 20):
        lines += block_log(range(start, start + 20), second=start)
    run(tmp_path, lines, "--session-key", r"blk_-?\d+")
    out = tmp_path / "out"
    result = run_script("train.py", "--config", out / "config.yaml", "--epochs", "1", "--device", "cpu",
                        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = out / "train" / "checkpoints" / "best_model.pt"
    assert checkpoint.exists()

    new = tmp_path / "today"
    new.mkdir()
    today = block_log(range(500, 510))
    today.insert(7, line(9, "Checksum error on blk_503 from disk sda3"))   # a template never seen
    (new / "app.log").write_text("\n".join(today) + "\n")
    detections = tmp_path / "detections.jsonl"
    # a tiny run: no evaluation after training
    calibrated = ["--calibrate-on", out / "sessions.jsonl", "--output-dir", tmp_path / "eval"]
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect", new, "--parser-state",
                        out / "parser_state.json", "--output", detections, *calibrated)

    assert result.returncode == 0, result.stderr[-2000:]
    verdicts = {d["session_id"]: d for d in map(json.loads, detections.read_text().splitlines())}
    assert len(verdicts) == 10 and verdicts["blk_503"]["verdict"] == "abnormal"
    miss = next(m for m in verdicts["blk_503"]["misses"] if m.get("raw") == today[7])
    assert miss["at"] == f"{(new / 'app.log').resolve()}:8" and miss["probability"] == 0.0

    # the same through preprocess.py's output for those logs: sessions.jsonl with its sources.json
    preprocess.main([str(new), "--output", str(tmp_path / "today_out"), "--parser-state",
                     str(out / "parser_state.json")])
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--detect",
                        tmp_path / "today_out" / "sessions.jsonl", "--output", detections, *calibrated)
    assert result.returncode == 0, result.stderr[-2000:]
    verdicts = {d["session_id"]: d for d in map(json.loads, detections.read_text().splitlines())}
    assert any(m.get("raw") == today[7] for m in verdicts["blk_503"]["misses"])


@pytest.mark.parametrize("compressed", [False, True])
def test_raw_lines_come_from_a_sparse_index_or_a_gzip_scan(tmp_path, compressed):
    import gzip

    text = "".join(f"line {n}\n" for n in range(1, 2501))
    path = tmp_path / ("log.gz" if compressed else "log")
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    raw = preprocess.RawLines([str(path)])
    raw.INDEX_EVERY = 7   # many index entries and block boundaries
    wanted = {(0, n) for n in (1, 7, 8, 14, 15, 1024, 1025, 2500, 2501)} | {(1, 3)}
    found = raw.fetch(wanted)
    assert found == {(0, n): f"line {n}" for n in (1, 7, 8, 14, 15, 1024, 1025, 2500)}   # 2501, file 1: none
    assert preprocess.RawLines.line_of([[0, 10, 2], [1, 3, 1]], 2) == (1, 3)
    assert preprocess.RawLines.line_of([[0, 10, 2]], 2) is None   # the end of the session has no line


@needs_loghub
def test_bgl_2k_count_windows(tmp_path):
    out = tmp_path / "bgl"
    result = run_script("preprocess.py", LOGHUB / "BGL_2k.log", "--output", out, "--window", "count:20:10",
                        "--log-format", "<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> "
                        "<Component> <Level> <Content>", "--label-field", "Label", "--normal-value", "-",
                        "--config", tmp_path / "base.yaml")
    assert result.returncode == 0, result.stderr
    windows = read_output(out)["sessions"]
    labels = [line.split(" ", 1)[0] != "-" for line in (LOGHUB / "BGL_2k.log").read_text().splitlines()]
    assert len(windows) == 199
    for window in windows:
        lines = [first + i for _, first, count in window["lines"] for i in range(count)]
        assert len(lines) == len(window["event_ids"]) and window["label"] == any(labels[n - 1] for n in lines)
    # start to finish: train on the normal windows (the evaluation after training scores the abnormal ones),
    # then detect on the raw log through the parser state, each miss with its raw line
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["training"].update(evaluate_after_training=True, epochs=2)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_script("train.py", "--config", out / "config.yaml", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(next((out / "train").glob("evaluation_results_*.json")).read_text())
    assert results["abnormal_sessions"]["count"] == sum(w["label"] for w in windows) == 53
    detections = tmp_path / "detections.jsonl"
    result = run_script("evaluate.py", "--checkpoint", out / "train" / "checkpoints" / "best_model.pt",
                        "--detect", LOGHUB / "BGL_2k.log", "--parser-state", out / "parser_state.json",
                        "--output", detections)
    assert result.returncode == 0, result.stderr[-2000:]
    raw_lines = (LOGHUB / "BGL_2k.log").read_text().splitlines()
    detected = [json.loads(x) for x in detections.read_text().splitlines()]
    assert len(detected) == 199
    shown = [m for d in detected for m in d["misses"] if "raw" in m]
    assert shown and all(raw_lines[int(m["at"].rsplit(":", 1)[1]) - 1] == m["raw"] for m in shown)


def test_session_idle_closes_sessions_not_named_for_n_lines(tmp_path):
    lines = [line(1, "Opened block blk_1"), line(2, "Opened block blk_2"), line(3, "Closed block blk_2"),
             line(4, "Closed block blk_2"), line(5, "Opened block blk_3")]
    result = run(tmp_path, lines, "--session-key", r"blk_-?\d+", "--session-idle", "3")
    # blk_1 was last named on line 1: complete once line 4 arrives, so written first
    assert [s["session_id"] for s in result["sessions"]] == ["blk_1", "blk_2", "blk_3"]
    assert result["sources"]["stats"]["sessions_closed_idle"] == 1


def test_max_open_sessions_writes_the_least_recently_active_early(tmp_path, capsys):
    lines = [line(1, "Opened block blk_1"), line(2, "Opened block blk_2"), line(3, "Wrote blk_1"),
             line(4, "Opened block blk_3")]
    result = run(tmp_path, lines, "--session-key", r"blk_-?\d+", "--max-open-sessions", "2")
    assert [s["session_id"] for s in result["sessions"]] == ["blk_2", "blk_1", "blk_3"]
    assert "1 sessions written early" in capsys.readouterr().err


def test_sessions_from_logs_uses_the_saved_grouping(tmp_path):
    learned = run(tmp_path, block_log(range(1, 6)), "--session-key", r"blk_-?\d+")
    stats = preprocess.new_stats()
    sessions = list(preprocess.sessions_from_logs(str(tmp_path / "out" / "parser_state.json"),
                                                  [str(tmp_path / "log.txt")], stats))
    assert sessions == learned["sessions"] and stats["unknown"] == 0


@needs_loghub
@pytest.mark.parametrize("system, flags", [
    ("HDFS", ["--log-format", "<Date> <Time> <Pid> <Level> <Component>: <Content>",
              "--session-key", r"blk_-?\d+"]),
    ("BGL", ["--log-format", "<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> "
             "<Level> <Content>", "--window", "count:20"])])
def test_loghub_lines_match_the_saved_state_as_they_were_learned(tmp_path, system, flags):
    log = LOGHUB / f"{system}_2k.log"
    preprocess.main([str(log), "--output", str(tmp_path / "a"), "--structured", str(tmp_path / "a.csv"),
                     "--config", str(tmp_path / "base.yaml"), *flags])
    preprocess.main([str(log), "--output", str(tmp_path / "b"), "--structured", str(tmp_path / "b.csv"),
                     "--parser-state", str(tmp_path / "a" / "parser_state.json")])
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert (tmp_path / "a" / "sessions.jsonl").read_text() == (tmp_path / "b" / "sessions.jsonl").read_text()


# ----------------------------------------------------------------------------- the parser state, validated
def valid_state(tmp_path) -> dict:
    run(tmp_path, block_log(range(1, 6)), "--session-key", r"blk_-?\d+")
    return json.loads((tmp_path / "out" / "parser_state.json").read_text())


def first_leaf(tree: dict) -> dict:
    node = tree
    while node["children"]:
        node = next(iter(node["children"].values()))
    return node


def rekey_length(state: dict) -> None:  # a template's branch of the tree under another token count
    children = state["tree"]["children"]
    key = next(iter(children))
    children[str(int(key) + 1) if str(int(key) + 1) not in children else "99"] = children.pop(key)


def nested(depth: int) -> dict:
    node = {"clusters": [], "children": {}}
    for _ in range(depth):
        node = {"clusters": [], "children": {"x": node}}
    return node


def set_in(path: tuple, value):
    def change(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


DAMAGED_STATES = [  # (name, change: a function of the state dict, or the file's text; what the message says)
    ("a number", "3", "not a parser_state.json written by preprocess.py"),
    ("a list", "[]", "not a parser_state.json written by preprocess.py"),
    ("not JSON", "{\"format\": ", "unreadable"),
    ("too deeply nested", "[" * 100_000, "unreadable"),
    ("another format", set_in(("format",), "drain3"), "not a parser_state.json"),
    ("a newer version", set_in(("version",), 2), "'version' must be 1"),
    ("a key missing", lambda s: s.pop("vocab_size"), "incomplete, no vocab_size"),
    ("an unknown key", set_in(("extra",), 1), "unknown key 'extra'"),
    ("an absurd vocab_size", set_in(("vocab_size",), 10 ** 12),
     "'vocab_size' must be an int in [1, 10,000,000]"),
    ("vocab_size a string", set_in(("vocab_size",), "3"), "'vocab_size' must be an int"),
    ("vocab_size a bool", set_in(("vocab_size",), True), "'vocab_size' must be an int"),
    ("vocab_size above the templates", set_in(("vocab_size",), 4), "vocab_size 4 but 3 templates"),
    ("vocab_size below the templates", set_in(("vocab_size",), 2),
     "'templates[2].id' must be an int in [0, vocab_size 2)"),
    ("a template ID repeated", set_in(("templates", 1, "id"), 0), "'templates[1].id' must be above the ID"),
    ("a template ID negative", set_in(("templates", 0, "id"), -1), "'templates[0].id' must be an int"),
    ("a template not a string", set_in(("templates", 0, "template"), 5),
     "'templates[0].template' must be a string"),
    ("templates an object", set_in(("templates",), {}), "'templates' must be a list"),
    ("a template without its ID", lambda s: s["templates"][0].pop("id"), "'templates[0]' must be an object"),
    ("the tree a list", set_in(("tree",), []), "'tree' must be an object of clusters, children"),
    ("a cluster ID out of range", lambda s: first_leaf(s["tree"])["clusters"].append(99),
     "must be a list of cluster IDs"),
    ("a cluster ID a string", lambda s: first_leaf(s["tree"])["clusters"].append("1"), "cluster IDs"),
    ("a template under another token count", rekey_length, "must be templates of"),
    ("a tree deeper than drain.depth", lambda s: first_leaf(s["tree"])["children"].update(x=nested(3)),
     "deeper than drain.depth 4 allows"),
    ("a tree keyed by words at the root", lambda s: s["tree"]["children"].update(word=nested(0)),
     "'tree.children' must be keyed by token counts"),
    ("drain.sim_th NaN", set_in(("drain", "sim_th"), float("nan")),
     "'drain.sim_th' must be a number in [0, 1]"),
    ("drain.depth a string", set_in(("drain", "depth"), "4"), "'drain.depth' must be an int >= 3"),
    ("drain.max_clusters 0", set_in(("drain", "max_clusters"), 0), "'drain.max_clusters' must be null or"),
    ("drain without max_children", lambda s: s["drain"].pop("max_children"), "'drain' must be an object of"),
    ("masks a string", set_in(("masks",), "blk_\\d+"), "'masks' must be a list of strings"),
    ("a mask not a regex", lambda s: s["masks"].append("blk_("), "not a regular expression"),
    ("a log format without Content", set_in(("log_format",), "<Date> <Time>"), "no <Content>"),
    ("grouping a list", set_in(("grouping",), []), "'grouping' must be an object"),
    ("a grouping key unknown", set_in(("grouping", "windw"), "count:5"), "grouping: unknown key 'windw'"),
    ("a grouping value mistyped", set_in(("grouping", "window"), 5),
     "'preprocess.window' must be null or str"),
    ("a grouping value out of range", set_in(("grouping", "session_idle"), -3),
     "'preprocess.session_idle' must"),
    ("a window that is no window", set_in(("grouping", "window"), "count:0"), "--window 'count:0'"),
    ("a label field not in the format", set_in(("grouping", "label_field"), "Node"),
     "'grouping.label_field' must be null or a field"),
]


def folder_bytes(folder: Path) -> dict:
    """Every entry under `folder` (hidden ones too): file bytes, link targets, folders."""
    return {str(p.relative_to(folder)): ("link", os.readlink(p)) if p.is_symlink() else
            ("file", p.read_bytes()) if p.is_file() else ("dir",) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name, change, message", DAMAGED_STATES, ids=[case[0] for case in DAMAGED_STATES])
def test_a_damaged_parser_state_is_one_line_naming_the_file(tmp_path, capsys, name, change, message):
    state = valid_state(tmp_path)
    bad = tmp_path / "bad_state.json"
    if isinstance(change, str):
        bad.write_text(change)
    else:
        change(state)
        bad.write_text(json.dumps(state))
    before = folder_bytes(tmp_path / "out")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:  # a previous parse in --output: left as it is
        preprocess.main([str(tmp_path / "log.txt"), "--output", str(tmp_path / "out"),
                         "--parser-state", str(bad)])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --parser-state {bad}: ") and \
        message in err, err
    assert folder_bytes(tmp_path / "out") == before
    with pytest.raises(logparse.PreprocessError, match=re.escape(str(bad))):  # evaluate.py's route
        preprocess.sessions_from_logs(str(bad), [str(tmp_path / "log.txt")])


def test_a_damaged_parser_state_exits_2_without_a_traceback_as_a_script(tmp_path):
    state = valid_state(tmp_path)
    state["vocab_size"] = 10 ** 12  # once a MemoryError
    (tmp_path / "bad.json").write_text(json.dumps(state))
    result = run_script("preprocess.py", tmp_path / "log.txt", "--output", tmp_path / "new", "--parser-state",
                        tmp_path / "bad.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --parser-state {tmp_path / 'bad.json'}: 'vocab_size' must be an int in [1, 10,000,000], "
        f"got int 1000000000000"]
    assert not (tmp_path / "new").exists()


def test_states_that_drain_writes_load_at_every_depth_and_with_evictions(tmp_path):
    lines = block_log(range(1, 30)) + [line(9, f"Request {w} served by node{w} in {w} ms with status ok")
                                       for w in ("alpha", "beta", "gamma", "delta")]
    for flags in (["--depth", "3"], ["--depth", "6"], ["--max-templates", "2"]):
        run(tmp_path, lines, "--session-key", r"blk_-?\d+", "--no-default-masks", *flags, output="o")
        state = logparse.load_state(str(tmp_path / "o" / "parser_state.json"))
        assert state == json.loads((tmp_path / "o" / "parser_state.json").read_text())  # as written
    assert len(state["templates"]) == 2 < state["vocab_size"]  # evicted IDs have no template


# ----------------------------------------------------------------------------- one parse in --output, whole
NAMES = (*preprocess.OUTPUT_FILES, "s.csv")
TIMING = ("seconds", "peak_rss_mb", "start_rss_mb", "lines_per_s")


def shown(out: Path) -> dict:
    """What --output shows under the names users know (None: absent), timings left out; a link among them
    goes through `current`, so the shown names hold one parse when their bytes are one parse's."""
    view = {name: (out / name).read_bytes() if (out / name).is_file() else None for name in NAMES}
    if view["sources.json"]:
        sources = json.loads(view["sources.json"])
        sources["stats"] = {k: v for k, v in sources["stats"].items() if k not in TIMING}
        view["sources.json"] = sources
    assert all(os.readlink(out / name) == f"current/{name}" for name in NAMES if (out / name).is_symlink())
    return view


def two_parses(tmp_path: Path):
    """Runs of parse A (sessions) and B (other lines: more templates, sessions or parse only, with a
    --structured CSV in --output) into tmp_path / "o"."""
    (tmp_path / "a.log").write_text("\n".join(block_log(range(1, 4))) + "\n")
    (tmp_path / "b.log").write_text("\n".join(block_log(range(7, 9)) + [line(8, "Evicted blk_7 now")]) + "\n")
    common = ["--output", str(tmp_path / "o"), "--log-format", FORMAT,
              "--config", str(tmp_path / "base.yaml")]

    def parse_a():
        preprocess.main([str(tmp_path / "a.log"), *common, "--session-key", r"blk_-?\d+"])

    def parse_b(parse_only: bool):
        preprocess.main([str(tmp_path / "b.log"), *common, "--structured", str(tmp_path / "o" / "s.csv"),
                         *([] if parse_only else ["--session-key", r"blk_-?\d+"])])
    return parse_a, parse_b


class FailAt:
    """Raise KeyboardInterrupt at the n-th file-system call that changes something (or syncs it)."""
    CALLS = ("replace", "rename", "symlink", "link", "unlink", "rmdir", "mkdir", "fsync", "chmod", "fchmod")

    def __init__(self, monkeypatch, n: int):
        self.n, self.calls = n, 0
        for name in self.CALLS:
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name)))

    def wrap(self, call):
        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
            return call(*args, **kwargs)
        return wrapper


def plain_files(out: Path, names: tuple, generations: bool) -> None:
    """Plain files in place of the links `names`, with (an editor saved config.yaml by rename) or without
    (preprocess.py before generations) the generation they came from."""
    for name in names:
        data = (out / name).read_bytes()
        (out / name).unlink()
        (out / name).write_bytes(data)
    for entry in list(out.iterdir()) if not generations else []:
        if entry.name == "current" or entry.name.startswith(".parse-"):
            entry.unlink() if entry.is_symlink() else shutil.rmtree(entry)


@pytest.mark.parametrize("before, parse_only", [("generations", False), ("generations", True),
                                                ("plain files", False), ("an edited config.yaml", True)])
def test_an_interrupt_at_any_step_leaves_one_whole_parse(tmp_path, monkeypatch, capsys, before, parse_only):
    parse_a, parse_b = two_parses(tmp_path)
    out = tmp_path / "o"
    parse_a()
    old = shown(out)
    parse_b(parse_only)
    new = shown(out)
    assert all(old[name] != new[name] for name in NAMES if name != "config.yaml" or not parse_only)
    assert (new["sessions.jsonl"] is None) == parse_only  # parse only: no earlier sessions.jsonl left
    n = 0
    while True:
        n += 1
        shutil.rmtree(out)
        parse_a()
        if before == "plain files":
            plain_files(out, preprocess.OUTPUT_FILES, generations=False)
        elif before == "an edited config.yaml":
            plain_files(out, ("config.yaml",), generations=True)
        assert shown(out) == old
        with monkeypatch.context() as patch:
            fail = FailAt(patch, n)
            with pytest.raises(SystemExit) as exit_code:
                parse_b(parse_only)
                raise SystemExit("finished")
        if exit_code.value.code == "finished":
            break
        assert exit_code.value.code == 130, capsys.readouterr().err
        assert shown(out) in (old, new), n  # never a mix
        parse_b(parse_only)  # the next run takes over what the interrupted one left
        assert shown(out) == new
        assert len([p for p in out.iterdir() if p.name.startswith(".parse-")]) == 1, n
    assert n > 20 and fail.calls == n - 1  # every step of the run was interrupted once


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_run_killed_mid_parse_leaves_the_previous_parse(tmp_path, how):
    parse_a, parse_b = two_parses(tmp_path)
    out = tmp_path / "o"
    parse_a()
    old = shown(out)
    with (tmp_path / "big.log").open("w") as handle:
        for start in range(0, 60_000, 500):
            handle.write("\n".join(block_log(range(start, start + 500), second=start % 3000)) + "\n")
    command = [sys.executable, str(REPO / "preprocess.py"), str(tmp_path / "big.log"), "--output", str(out),
               "--log-format", FORMAT, "--session-key", r"blk_-?\d+", "--config", str(tmp_path / "base.yaml")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        shown_before = os.readlink(out / "current")
        while not [p for p in out.iterdir() if p.name.startswith(".parse-") and p.name != shown_before]:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        time.sleep(0.2)  # parsing, its files half written
    finally:
        process.send_signal(how)
        _, stderr = process.communicate(timeout=60)
    if how == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL  # killed, not finished
    else:   # one line saying so, the shell's code for the signal
        assert process.returncode == 128 + how and b"Traceback" not in stderr
        assert stderr.decode().strip().splitlines()[-1] == (
            f"stopped: {how.name}: the parse did not finish: {out} shows the previous parse as it was (if "
            "there was one)")
    assert shown(out) == old
    parse_b(False)  # the next run removes the killed run's generation
    assert len([p for p in out.iterdir() if p.name.startswith(".parse-")]) == 1


# preprocess.py as a process of its own that stops once mid-parse (a marker file says so) until a signal
# comes; "twice": a second Ctrl-C lands while the first one's clean-up removes the generation
STOPPED_MID_PARSE = """
import os, shutil, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import preprocess
marker, how = Path(sys.argv[2]), sys.argv[3]
read_lines = preprocess.read_lines

def waiting(files):
    for number, item in enumerate(read_lines(files)):
        if number == 5000:
            marker.write_text("mid-parse")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.01)
        yield item

def rmtree(path, *args, real=shutil.rmtree, **kwargs):
    if how == "twice":
        os.kill(os.getpid(), signal.SIGINT)
    return real(path, *args, **kwargs)

preprocess.read_lines, shutil.rmtree = waiting, rmtree
preprocess.main(sys.argv[4:])
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "twice"])
def test_a_stop_mid_parse_removes_the_new_generation_and_releases_the_lock(tmp_path, how):
    parse_a, _ = two_parses(tmp_path)
    out = tmp_path / "o"
    parse_a()
    old, shown_before = shown(out), os.readlink(out / "current")
    with (tmp_path / "big.log").open("w") as handle:   # 20,000 lines: the stop comes at line 5,000
        for start in range(0, 5000, 500):
            handle.write("\n".join(block_log(range(start, start + 500), second=start % 3000)) + "\n")
    marker = tmp_path / "mid-parse"
    command = [sys.executable, "-c", STOPPED_MID_PARSE, str(REPO), str(marker), how,
               str(tmp_path / "big.log"), "--output", str(out), "--log-format", FORMAT,
               "--session-key", r"blk_-?\d+", "--config", str(tmp_path / "base.yaml")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        assert [p.name for p in out.iterdir() if p.name.startswith(".parse-") and p.name != shown_before]
    finally:
        process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    name = "SIGTERM" if how == "SIGTERM" else "SIGINT"
    assert (process.returncode, stderr.decode().strip().splitlines()) == (128 + signal.Signals[name], [
        f"stopped: {name}: the parse did not finish: {out} shows the previous parse as it was (if there was "
        "one)"])
    assert shown(out) == old
    left = sorted(p.name for p in out.iterdir() if not p.is_symlink())
    assert left == [".lock", shown_before], left   # no generation of the stopped run, no temp file
    assert (out / ".lock").read_text() == ""       # released


def test_a_second_run_on_the_same_output_is_refused(tmp_path, capsys):
    import logging

    import utils
    parse_a, parse_b = two_parses(tmp_path)
    out = tmp_path / "o"
    parse_a()
    before = folder_bytes(out)
    capsys.readouterr()
    lock = utils.OutputLock(out, logging.getLogger("test"))  # another run, holding --output
    try:
        with pytest.raises(SystemExit) as exit_code:
            parse_b(False)
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out} is in use by another run (pid {os.getpid()} on host" in err and "another --output" in err
    assert folder_bytes(out) == before
    parse_b(False)  # once that run is over
    assert shown(out)["sessions.jsonl"] is not None


def test_config_paths_go_through_the_fixed_names(tmp_path):
    parse_a, _ = two_parses(tmp_path)
    parse_a()
    config = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert config["data"]["preprocessed_dir"] == str(tmp_path / "o" / "sessions.jsonl")  # not the generation
    assert config["training"]["output_dir"] == str(tmp_path / "o" / "train")
    assert (tmp_path / "o" / "sessions.jsonl").is_symlink()
    assert preprocess.RawLines.for_sessions(tmp_path / "o" / "sessions.jsonl").files == [
        (tmp_path / "a.log").resolve()]


def test_structured_names_kept_by_preprocess_are_refused(tmp_path, capsys):
    (tmp_path / "log.txt").write_text("\n".join(block_log(range(2))) + "\n")
    with pytest.raises(SystemExit) as exit_code:
        preprocess.main([str(tmp_path / "log.txt"), "--output", str(tmp_path / "o"), "--log-format", FORMAT,
                         "--structured", str(tmp_path / "o" / "sessions.jsonl"),
                         "--config", str(tmp_path / "base.yaml")])
    assert exit_code.value.code == 2 and "a name preprocess.py keeps for itself" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile input, round 3
def script_error(*args, timeout: int = 120) -> str:
    """preprocess.py as a subprocess (so that a hang fails the test instead of stalling the suite): its one
    line of error, after checking that it is one line, exit code 2, no traceback."""
    try:
        result = run_script("preprocess.py", *args, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"preprocess.py still running after {timeout} s")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def one_error_line(capsys, argv: list) -> str:
    """preprocess.main(argv) in-process: exit code 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as exit_code:
        preprocess.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# (a+)+$, (a|aa)+$ and (x+x+)+y try about 2**40 ways to fit such a line: minutes to days without a budget
@pytest.mark.parametrize("flags, flag, pattern, content", [
    (["--log-format", FORMAT, "--session-key", "(a+)+$"], "--session-key", "(a+)+$", "a" * 40 + "!"),
    (["--log-format", FORMAT, "--mask", "(a|aa)+$", "--window", "count:5"], "--mask", "(a|aa)+$",
     "a" * 44 + "!"),
    (["--log-format", "<Date> <Time> <Level> <Component>: (x+x+)+y <Content>", "--window", "count:5"],
     "--log-format", "(x+x+)+y", "x" * 40),
    (["--log-format", FORMAT, "--session-key", "(?:" + "z" * 50_000 + ")?(a+)+$"], "--session-key", "zzz...",
     "a" * 40 + "!"),   # a long pattern is shown bounded
])
def test_a_user_regex_that_backtracks_without_end_stops_on_its_line(tmp_path, flags, flag, pattern, content):
    log = tmp_path / "log.txt"
    log.write_text(line(1, "xxy fits every pattern blk_1") + "\n" + line(2, content) + "\n")
    started = time.monotonic()
    error = script_error(log, "--output", tmp_path / "o", *flags, "--config", tmp_path / "base.yaml")
    assert time.monotonic() - started < 60
    assert error.startswith(f"error: {flag} ") and pattern in error and f"{log}:2" in error, error
    assert "backtracks exponentially" in error and len(error) < 600
    assert not (tmp_path / "o" / "sessions.jsonl").exists()


def test_the_watchdog_stops_only_a_call_past_its_budget_and_leaves_alarms_as_they_were(tmp_path, monkeypatch):
    monkeypatch.setattr(logparse, "REGEX_BUDGET_S", 0.3)
    regex = logparse.UserRegex(re.compile(r"(a+)+$"), "--session-key")
    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(logparse.PatternTimeout, match=re.escape("--session-key '(a+)+$'")), \
            logparse.WATCHDOG:
        regex.findall("a" * 27 + "b")  # about 15 s unstopped
    assert time.monotonic() - started < 3
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    # a parse that takes its time between lines (here its reader, between sessions) is not stopped
    learned = run(tmp_path, block_log(range(1, 4)), "--session-key", r"blk_-?\d+")
    sessions = []
    for session in preprocess.sessions_from_logs(str(tmp_path / "out" / "parser_state.json"),
                                                 [str(tmp_path / "log.txt")]):
        time.sleep(0.4)
        sessions.append(session)
    assert sessions == learned["sessions"]
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_pattern_slow_on_every_line_but_under_the_budget_of_one_stops_the_run(monkeypatch):
    """Each call under the one-line budget, many of them: the slow calls' sum within a minute stops it."""
    monkeypatch.setattr(logparse, "REGEX_BUDGET_S", 30.0)   # never reached by one call here
    monkeypatch.setattr(logparse, "SLOW_BUDGET_S", 1.5)
    pattern = re.compile(r"(a+)+$")
    n = 16
    while True:   # a line this machine takes about half a second on (doubling with each "a")
        started = time.thread_time()
        pattern.match("a" * n + "!")
        if time.thread_time() - started > 0.45 or n > 40:
            break
        n += 1
    regex = logparse.UserRegex(pattern, "--mask")
    lines = 0
    with pytest.raises(logparse.PatternTimeout) as stopped, logparse.WATCHDOG:
        for _ in range(40):
            regex.match("a" * n + "!")
            lines += 1
    assert 2 <= lines < 12 and stopped.value.slow_s >= 1.5
    error = str(logparse.timeout_error(stopped.value, "app.log:7"))
    assert error.startswith("--mask '(a+)+$': ") and "in calls of over 0.2 s each on one line" in error
    assert "(the last on app.log:7), so the run stops" in error and "backtracks exponentially" in error


@pytest.mark.parametrize("spec", ["count:0", "count:-3", "count:2.5", "count:inf", "count:1e400", "count:5:0",
                                  "count:", "count:1:2:3", "time:0", "time:-1", "time:nan", "time:inf",
                                  "time:1:inf", "time:1:nan", "count:20001:2", "time:1:1e-5", "bogus:3"])
def test_degenerate_windows_are_refused_naming_them(spec):
    with pytest.raises(logparse.PreprocessError, match=f"--window {re.escape(repr(spec))}"):
        logparse.Windows(spec)


def test_a_window_step_too_fine_for_the_times_is_refused_instead_of_looping(tmp_path):
    log = tmp_path / "t.log"
    log.write_text("".join(f"{1_700_000_000 + i / 10:.1f} job step done\n" for i in range(30)))
    error = script_error(log, "--output", tmp_path / "o", "--log-format", "<Stamp> <Content>", "--window",
                         "time:1e-7", "--time-field", "Stamp", "--config", tmp_path / "base.yaml", timeout=60)
    assert "--window 'time:1e-7'" in error and "too coarse for windows of 1e-07 s" in error, error
    assert re.search(r"at least 0\.000\d+ s \(at .*t\.log:1: 1700000000\.0 job step done\)$", error)


def expected_windows(positions: list, size, step) -> list[list[int]]:
    """What each window holds, counted directly: window k is [k*step, k*step + size) from the first line;
    those a later line completes are written when they hold a line, then one last partial window takes the
    lines no complete window reached, unless every one of them is already in a written window."""
    rel = [p - positions[0] for p in positions]
    windows, k, covered = [], 0, None
    while k * step + size <= rel[-1]:
        inside = [i for i, p in enumerate(rel) if k * step <= p < k * step + size]
        if inside:
            windows.append(inside)
            covered = k * step + size
        k += 1
    held = [i for i, p in enumerate(rel) if p >= k * step]
    if held and (covered is None or rel[held[-1]] >= covered):
        windows.append(held)
    return windows


def windows_of(spec: str, positions: list) -> list[list[int]]:
    grouper = logparse.Windows(spec)
    groups = [group for i, p in enumerate(positions) for group in grouper.add(p, 0, i, False)]
    return [group[2] for group in groups + list(grouper.close())]


def test_windows_hold_what_a_direct_count_finds_and_jump_any_gap_at_once():
    import random
    rng = random.Random(7)
    for _ in range(300):
        size, step = rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 3, 5, 8])
        count = list(range(rng.randrange(1, 40)))
        assert windows_of(f"count:{size}:{step}", count) == expected_windows(count, size, step)
        size, step = rng.choice([0.5, 1, 2.5, 3, 10]), rng.choice([0.25, 0.5, 1, 2.5, 3, 10])
        times = [1_700_000_000.0]
        for _ in range(rng.randrange(40)):
            times.append(times[-1] + rng.choice([0, 0, 0.25, 0.5, 1, 2, 7, 40]))
        assert windows_of(f"time:{size}:{step}", times) == expected_windows(times, size, step)
    started = time.monotonic()  # a gap of 30 years in steps of 1 ms: jumped, not walked
    assert windows_of("time:1:0.001", [1e6, 1e6 + 1e9]) == [[0], [1]]
    assert time.monotonic() - started < 1


def test_live_detection_places_a_line_in_the_windows_a_whole_parse_puts_it_in():
    """place() (live detection feeds it) joins exactly the windows k with k*step <= t < k*step + size, as
    add() holds them, also where a float step puts a time on an edge (43 * 0.2 == 8.6, 8.6 / 0.2 < 43)."""
    import random
    rng = random.Random(3)
    for _ in range(300):
        size, step = rng.choice([0.1, 0.3, 0.7, 1, 2.5]), rng.choice([0.1, 0.2, 0.3, 0.7, 1])
        windows, times = logparse.Windows(f"time:{size}:{step}"), [0.0]
        times += [round(0.1 * sum(rng.choice([0, 1, 2, 3, 7]) for _ in range(i)), 10) for i in range(1, 40)]
        for t in sorted(times):
            joined, _ = windows.place(t)
            assert list(joined) == [k for k in range(int(t / step) + 3) if k * step <= t < k * step + size]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("header", [b"", b"BlockId,Label"])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_labels_csv_with_or_without_a_bom_or_header_and_any_line_ending(tmp_path, bom, header, ending):
    rows = [b"blk_1,Anomaly", b"blk_2,Normal", b"blk_1,anomaly", b"", b"blk_3,0"]  # one label twice: fine
    path = tmp_path / "labels.csv"
    path.write_bytes(bom + b"".join(row + ending for row in ([header] if header else []) + rows))
    assert preprocess.read_labels(str(path)) == {"blk_1": 1, "blk_2": 0, "blk_3": 0}


@pytest.mark.parametrize("data, message", [
    (b"blk_1,Normal\nblk_2,Anom\xe9ly\n",
     "line 2 is not UTF-8 (byte 11: b'\\xe9ly\\n'); save the CSV as UTF-8"),
    (b"\xef\xbb\xbfBlockId,Label\nblk_1,Normal\r\nblk_2,Anomaly\nblk_1,Anomaly\n",
     "session 'blk_1' has two labels, Normal on line 2 and Anomaly on line 4; keep one"),
    (b"blk_1,Normal\nblk_2," + b"x" * 200_000 + b"\n", "line 2: not CSV: field larger than field limit"),
    (b"blk_1,Normal\nblk_2," + b"y" * 5000 + b"\n", "line 2: label 'yyyy"),
    (b"blk_1,Normal\nblk_2\n", "line 2: 'blk_2' has no label (expected id,label)"),
    (b"BlockId,Label\n\n", "holds no labels (expected lines of id,label)"),
    (b"", "holds no labels"),
    (b"job_1,Normal\njob_2,Anomaly\n",
     "none of its 2 ids is one of the 2 sessions' (its first: 'job_1'; session ids come from --session-key): "
     "nothing written"),
], ids=["not UTF-8", "two labels", "not CSV", "a long label", "no label", "a header alone", "empty",
        "ids of no session"])
def test_a_bad_labels_csv_is_one_line_naming_the_file_and_the_line(tmp_path, capsys, data, message):
    (tmp_path / "log.txt").write_text("\n".join(block_log(range(1, 3))) + "\n")
    (tmp_path / "labels.csv").write_bytes(data)
    error = one_error_line(capsys, [tmp_path / "log.txt", "--output", tmp_path / "o", "--log-format", FORMAT,
                                    "--session-key", r"blk_-?\d+", "--labels", tmp_path / "labels.csv",
                                    "--config", tmp_path / "base.yaml"])
    assert error.startswith(f"error: --labels {tmp_path / 'labels.csv'}: ") and message in error, error
    assert len(error) < 600


@pytest.mark.parametrize("flags, message", [
    (["--session-key", r"req-\d+"], r"--session-key 'req-\\d+' matches no line, so there is no session"),
    (["--window", "time:60", "--time-field", "Time", "--time-format", "%H-%M-%S"],
     "--time-field Time holds no time readable with --time-format '%H-%M-%S', so there is no window (the "
     "first: '00:00:00', time data '00:00:00' does not match format '%H-%M-%S', on "),
    (["--window", "time:60", "--time-field", "Level"],
     "--time-field Level holds no time readable as epoch seconds (no --time-format given)"),
    (["--session-key", r"blk_-?\d+", "--time-field", "Time", "--time-format", "%H-%M-%S"],
     "--time-field Time holds no time readable with --time-format '%H-%M-%S', so there is no session"),
])
def test_a_grouping_that_matches_no_line_is_one_line_with_a_sample(tmp_path, capsys, flags, message):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(block_log(range(1, 3))) + "\n")
    error = one_error_line(capsys, [log, "--output", tmp_path / "o", "--log-format", FORMAT, *flags,
                                    "--config", tmp_path / "base.yaml"])
    assert message in error and f"{log}:1: 2024-01-01 00:00:00 INFO svc.Store: Opened block blk_1" in error
    assert not (tmp_path / "o" / "sessions.jsonl").exists()


def test_detection_with_a_grouping_that_matches_no_new_line_says_so(tmp_path):
    run(tmp_path, block_log(range(1, 3)), "--session-key", r"blk_-?\d+")
    with pytest.raises(logparse.PreprocessError, match=r"--session-key 'req-\\\\d\+' matches no line"):
        list(preprocess.sessions_from_logs(str(tmp_path / "out" / "parser_state.json"),
                                           [str(tmp_path / "log.txt")], session_key=r"req-\d+"))


def test_one_line_splitter_splits_as_universal_newlines_across_any_block_boundary():
    import io
    import random
    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choice(["a", "bc", "\r", "\n", "\r\n", "é"]) for _ in range(rng.randrange(30)))
        # "\n", "\r\n" and a lone "\r" end a line, as in Python's universal newlines
        expected = [line.rstrip("\r\n") for line in io.StringIO(text, newline="")]
        for block in (1, 2, 3, 7, 64):
            assert list(logparse.split_lines(io.BytesIO(text.encode()), block)) == expected


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", "mixed"])
def test_the_raw_line_shown_for_each_event_is_its_input_line_whatever_the_line_endings(tmp_path, ending,
                                                                                        compressed):
    lines = block_log(range(1, 60))
    lines[5:5] = ["", "garbage that does not fit the format", line(3, "Wrote a\tb\x0bc\x1cd to blk_2")]
    endings = ["\n", "\r\n", "\r"] * len(lines) if ending == "mixed" else [ending] * len(lines)
    data = "".join(text + end for text, end in zip(lines, endings)).encode()
    log = tmp_path / ("log.gz" if compressed else "log.txt")
    log.write_bytes(gzip.compress(data) if compressed else data)
    preprocess.main([str(log), "--output", str(tmp_path / "out"), "--log-format", FORMAT, "--session-key",
                     r"blk_-?\d+", "--config", str(tmp_path / "base.yaml")])
    sessions = read_output(tmp_path / "out")["sessions"]
    raw = preprocess.RawLines.for_sessions(tmp_path / "out" / "sessions.jsonl")
    raw.INDEX_EVERY = 7  # many index entries: the seeks land after every kind of line ending
    located = [(s["lines"], [{"position": i} for i in range(len(s["event_ids"]))]) for s in sessions]
    raw.annotate(located)   # as evaluate.py --detect does for each miss
    shown = {}
    for session, (_, misses) in zip(sessions, located):
        for miss in misses:
            path, number = miss["at"].rsplit(":", 1)
            assert path == str(log.resolve()) and miss["raw"] == lines[int(number) - 1]
            assert session["session_id"] in miss["raw"]
            shown[int(number)] = miss["raw"]
    assert len(shown) == len(lines) - 2   # every line but the empty one and the garbage


def test_a_fifo_is_refused_as_input_and_never_opened_as_a_source(tmp_path):
    import threading
    fifo = tmp_path / "pipe.log"
    os.mkfifo(fifo)
    with pytest.raises(logparse.PreprocessError, match=r"pipe.log is a FIFO \(named pipe\), not a regular "
                                                         r"file: .*write the log to a file first"):
        logparse.input_files([str(fifo)])
    with pytest.raises(logparse.PreprocessError, match="is a character device, not a regular file"):
        logparse.input_files(["/dev/null"])
    (tmp_path / "a.log").write_text("a line\n")   # a folder of logs with the pipe among them
    with pytest.raises(logparse.PreprocessError, match=re.escape(f"{fifo} is a FIFO (named pipe)")):
        logparse.input_files([str(tmp_path)])

    def writer():  # opening a FIFO to read waits for a writer: one comes after 3 s, if anyone waits
        time.sleep(3)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    threading.Thread(target=writer, daemon=True).start()
    started = time.monotonic()
    assert preprocess.RawLines([str(fifo)]).fetch({(0, 1)}) == {}   # a sources.json naming a FIFO
    assert time.monotonic() - started < 2


HUGE = "x" * 100_000


@pytest.mark.parametrize("flags", [
    ["--session-key", "(" + HUGE],
    ["--mask", HUGE + "(", "--window", "count:5"],
    ["--mask", "(" * 10_000 + "a" + ")" * 10_000, "--window", "count:5"],
    ["--window", "count:" + HUGE],
    ["--window", "count:1:1" + HUGE],
    ["--log-format", "<Content> [" + HUGE, "--window", "count:5"],
    ["--log-format", "(" * 10_000 + "<Content>" + ")" * 10_000, "--window", "count:5"],
    ["--log-format", f"<{HUGE}-> <Content>", "--window", "count:5"],
    ["--log-format", f"<Date> <Time> <Content> {HUGE}", "--window", "count:5"],   # no line matches
    ["--label-field", HUGE, "--window", "count:5"],
    ["--session-key", "never" + HUGE],   # matches no line
])
def test_every_message_that_shows_user_data_is_bounded(tmp_path, capsys, flags):
    (tmp_path / "log.txt").write_text(line(1, "y" * 100_000 + "!") + "\n" + line(2, "y" * 40 + "!") + "\n")
    argv = [tmp_path / "log.txt", "--output", tmp_path / "o", "--config", tmp_path / "base.yaml", *flags]
    error = one_error_line(capsys, argv if "--log-format" in flags else [*argv, "--log-format", FORMAT])
    assert len(error) < 1000, error[:2000]


def test_time_windows_start_over_where_the_log_jumps_back_in_time(tmp_path):
    """Logs concatenated (Zookeeper_2k goes from 2015-08-25 back to 2015-07-29): a line more than a window
    earlier than the one before starts the windows over, so none spans the jump; a small step back (a
    reordered line) stays in the current window, as before."""
    day = 86_400
    times = [30 * day, 30 * day + 100, 30 * day + 200, 0, 50, 700, 690]
    assert windows_of("time:600", times) == [[0, 1, 2], [3, 4], [5, 6]]
    grouper = logparse.Windows("time:600")
    for i, t in enumerate(times):
        list(grouper.add(t, 0, i, False))
    assert grouper.restarts == 1 and grouper.out_of_order == 1
    # live detection places lines the same way: the jump closes the open window
    live = logparse.Windows("time:600")
    placed = [live.place(t) for t in times]
    assert [list(joined) for joined, _ in placed] == [[0], [0], [0], [0], [0], [1], [1]]
    assert placed[3][1] == [0] and placed[5][1] == [0]
    # and the parse says so
    log = tmp_path / "z.log"
    log.write_text("".join(f"{1_700_000_000 + t} job step done\n" for t in times))
    result = subprocess.run([sys.executable, str(REPO / "preprocess.py"), str(log), "--output",
                             str(tmp_path / "w"), "--log-format", "<Stamp> <Content>", "--window", "time:600",
                             "--time-field", "Stamp"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: 1 jumps back in time of more than a window" in result.stderr
    assert len(read_output(tmp_path / "w")["sessions"]) == 3


@pytest.mark.parametrize("window,overlap", [("count:20:10", 1), ("count:20:4", 4), ("count:20", 0)])
def test_overlapping_windows_keep_validation_apart_from_training(tmp_path, window, overlap):
    """config.yaml's data.overlap for overlapping windows, and a split that then gives no line to both
    training and validation, the same through the token cache and through the streaming reader."""
    from collections import Counter

    import evaluate
    from config import load_config, reader_options
    from dataset import TRAIN, iter_sessions, split_classes
    lines = [line(i % 3000, f"Wrote {i} bytes to blk_{i % 9} in {i % 7}.5 ms") if i % 3 else
             line(i % 3000, f"Closed block blk_{i % 5} after {i % 4} checks") for i in range(4000)]
    run(tmp_path, lines, "--window", window)
    config = load_config(str(tmp_path / "out" / "config.yaml"),
                         {"lazy_loading.cache_dir": str(tmp_path / "cache")})
    assert config.data.overlap == overlap
    records = list(iter_sessions(config.data.preprocessed_dir))
    stored = [json.loads(x) for x in (tmp_path / "out" / "sessions.jsonl").read_text().splitlines()]
    sides = split_classes(records[0].file, [r.index for r in records], config.training.seed,
                          config.data.validation_split, overlap)
    covered = {side: set() for side in range(4)}
    for side, session in zip(sides.tolist(), stored):
        for _, first, count in session["lines"]:
            covered[side].update(range(first, first + count))
    held_out = set().union(*(lines for side, lines in covered.items() if side in (1, 2)))
    assert held_out and not covered[TRAIN] & held_out
    if overlap:
        assert not covered[1] & covered[2]   # nor do the calibration and evaluation halves share lines
    # the cache and the streaming reader take the same sides
    options = reader_options(config)
    taken = {}
    for cache in (True, False):
        config.lazy_loading.cache = cache
        halves = evaluate.validation_sessions(config, options)[:2]
        taken[cache] = [Counter(tuple(s) for chunk in source for s in chunk)
                        for source in (evaluate.training_sessions(config, options), *halves)]
    assert taken[True] == taken[False]


# ----------------------------------------------------------------------------- times and values (issue #25)
@pytest.mark.parametrize("content,values", [
    ('10.11.10.1 "GET /v2/54fadb41/servers/detail HTTP/1.1" status: 200 len: 1893 time: 0.2477062',
     [200, 1893, 0.2477062]),
    ("Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010", []),
    ("NameSystem.addStoredBlock: blockMap updated: 10.251.31.85:50010 is added to blk_-70 size 67108864",
     [67108864]),
    ("Took 19.05 seconds to spawn the instance.", [19.05]),
    ("at 2017-05-16 00:00:00.008 value -5, 1e3 req-77 x5 0x1f", [-5, 1000]),
    ("a 1 b 2 c 3 d 4 e 5", [1, 2, 3, 4]),     # at most logparse.MAX_VALUES
])
def test_the_values_of_a_line_are_its_numbers_standing_alone(content, values):
    assert logparse.line_values(content) == values


@pytest.mark.skipif(not LOGHUB.exists(), reason="needs ../shared/data/loghub")
def test_sessions_keep_each_events_time_and_values_on_loghub_samples(tmp_path):
    """OpenStack_2k in count windows with --time-field: one time (to the millisecond) and one list of values
    per event, as the structured CSV's Time and Content say; HDFS_2k by block: the sizes; --no-values:
    none."""
    out = tmp_path / "os"
    preprocess.main([str(LOGHUB / "OpenStack_2k.log"), "--output", str(out), "--log-format",
                     r"<Logrecord> <Date> <Time> <Pid> <Level> <Component> \[<ADDR>\] <Content>",
                     "--window", "count:50", "--time-field", "Time", "--time-format", "%H:%M:%S.%f"])
    rows = list(csv.DictReader((LOGHUB / "OpenStack_2k.log_structured.csv").open()))
    sessions = read_output(out)["sessions"]
    assert sum(len(s["event_ids"]) for s in sessions) == len(rows) == 2000
    checked = 0
    for session in sessions:
        numbers = [number for _, first, count in session["lines"] for number in range(first, first + count)]
        assert len(session["times"]) == len(session["values"]) == len(session["event_ids"]) == len(numbers)
        for number, when, values in zip(numbers, session["times"], session["values"]):
            row = rows[number - 1]
            hours, minutes, seconds = row["Time"].split(":")
            assert when % 86400 == pytest.approx(int(hours) * 3600 + int(minutes) * 60 + float(seconds),
                                                 abs=1e-6)
            if " status: " in row["Content"]:   # nova-api: status, length, duration
                tail = row["Content"].split(" status: ")[1].split()
                assert values == [float(tail[0]), float(tail[2]), float(tail[4])]
                checked += 1
    assert checked > 1000   # most of the sample is nova-api requests
    blocks = tmp_path / "hdfs"
    preprocess.main([str(LOGHUB / "HDFS_2k.log"), "--output", str(blocks), "--log-format",
                     "<Date> <Time> <Pid> <Level> <Component>: <Content>", "--session-key", r"blk_-?\d+",
                     "--time-field", "Date,Time", "--time-format", "%y%m%d %H%M%S"])
    sessions = read_output(blocks)["sessions"]
    sizes = [v for s in sessions for v in s["values"] if v]
    assert sizes and all(len(v) == 1 for v in sizes) and {67108864.0} <= {v[0] for v in sizes}
    first = next(csv.DictReader((LOGHUB / "HDFS_2k.log_structured.csv").open()))   # (line 1: its block first)
    when = datetime.strptime(first["Date"] + first["Time"], "%y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    assert sessions[0]["times"][0] == when.timestamp()
    preprocess.main([str(LOGHUB / "HDFS_2k.log"), "--output", str(tmp_path / "untimed"), "--log-format",
                     "<Date> <Time> <Pid> <Level> <Component>: <Content>", "--session-key", r"blk_-?\d+"])
    assert "times" not in read_output(tmp_path / "untimed")["sessions"][0]   # no --time-field: no times
    preprocess.main([str(LOGHUB / "HDFS_2k.log"), "--output", str(tmp_path / "plain"), "--log-format",
                     "<Date> <Time> <Pid> <Level> <Component>: <Content>", "--session-key", r"blk_-?\d+",
                     "--no-values"])
    assert "values" not in read_output(tmp_path / "plain")["sessions"][0]
