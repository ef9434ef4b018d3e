"""Log formats as loghub writes them (regex text between fields), matched in bounded time; parse-only runs;
accuracy on the nine loghub samples against drain3 run directly with the same settings."""
from __future__ import annotations

import csv
import json
import re
import sys
import time

import pytest
from conftest import REPO, run_script, write_config

import logparse
import preprocess

LOGHUB = REPO.parent / "shared" / "data" / "loghub"
needs_loghub = pytest.mark.skipif(not (LOGHUB / "HDFS_2k.log").exists(),
                                  reason="../shared/data/loghub is absent")
sys.path.append(str(REPO / "benchmarks"))   # after the scripts: benchmarks/scoring.py never shadows scoring
LINUX = r"<Month> <Date> <Time> <Level> <Component>(\[<PID>\])?: <Content>"
MAC = r"<Month>  <Date> <Time> <User> <Component>\[<PID>\]( \(<Address>\))?: <Content>"


def fields(log_format: str, line: str) -> dict | None:
    match = logparse.format_regex(log_format).match(line.strip())
    return None if match is None else {k: v or "" for k, v in match.groupdict().items()}


def old_format_regex(log_format: str) -> re.Pattern:
    """The format regex before loghub's convention: literal text escaped."""
    parts = re.split(r"(<[^<>]+>)", log_format)
    return re.compile("^" + "".join(f"(?P<{p[1:-1]}>.*?)" if i % 2 else
                                    re.sub(r"(\\ )+", r"\\s+", re.escape(p))
                                    for i, p in enumerate(parts)) + "$")


@pytest.mark.parametrize("log_format, line, expected", [
    (r"<Date> <Time> <Level> \[<Process>\] <Component>: <Content>",
     "2015-10-18 18:01:47,978 INFO [main] org.apache.hadoop.mapreduce.v2.app.MRAppMaster: "
     "Created MRAppMaster",
     {"Date": "2015-10-18", "Time": "18:01:47,978", "Level": "INFO", "Process": "main",
      "Component": "org.apache.hadoop.mapreduce.v2.app.MRAppMaster", "Content": "Created MRAppMaster"}),
    (r"<Time>\|<Component>\|<Pid>\|<Content>",
     "20171223-22:15:29:606|Step_LSC|30002312|onStandStepChanged 3579",
     {"Time": "20171223-22:15:29:606", "Component": "Step_LSC", "Pid": "30002312",
      "Content": "onStandStepChanged 3579"}),
    (LINUX, "Jun 14 15:16:01 combo sshd(pam_unix)[19939]: check pass; user unknown",
     {"Month": "Jun", "Date": "14", "Time": "15:16:01", "Level": "combo", "Component": "sshd(pam_unix)",
      "PID": "19939", "Content": "check pass; user unknown"}),
    (LINUX, "Jun 14 15:16:02 combo kernel: Linux version 2.6.5", {  # the optional group absent: PID ""
        "Month": "Jun", "Date": "14", "Time": "15:16:02", "Level": "combo", "Component": "kernel", "PID": "",
        "Content": "Linux version 2.6.5"}),
    (MAC, "Jul  1 09:01:05 calvisitor-10-105-160-95 com.apple.CDScheduler[43]: Thermal pressure state: 1",
     {"Month": "Jul", "Date": "1", "Time": "09:01:05", "User": "calvisitor-10-105-160-95",
      "Component": "com.apple.CDScheduler", "PID": "43", "Address": "",
      "Content": "Thermal pressure state: 1"}),
    (MAC, "Jul  1 09:02:26 host kernel[0] (1.2.3): message: here",
     {"Month": "Jul", "Date": "1", "Time": "09:02:26", "User": "host", "Component": "kernel", "PID": "0",
      "Address": "1.2.3", "Content": "message: here"}),
    # a run of spaces matches any run of whitespace: tabs, several spaces; the line is stripped first
    ("<Date> <Time>, <Level>                  <Component>    <Content>",
     "  2016-09-28\t04:30:30,  Info\tCBS  Loaded Servicing Stack  ",
     {"Date": "2016-09-28", "Time": "04:30:30", "Level": "Info", "Component": "CBS",
      "Content": "Loaded Servicing Stack"}),
    (r"\[<Time>\] <Program> - <Content>", "[10.30 16:49:06] chrome.exe - proxy.cse.cuhk.edu.hk:5070 open",
     {"Time": "10.30 16:49:06", "Program": "chrome.exe", "Content": "proxy.cse.cuhk.edu.hk:5070 open"}),
])
def test_loghub_format_strings_as_written(log_format, line, expected):
    assert fields(log_format, line) == expected


PLAIN_LINES = ["2024-01-01 10:00:00 INFO svc: started", "2024-01-01  10:00:01\tWARN  svc.a: disk: 91% full",
               "garbage", "2024-01-01 10:00:02 INFO no colon here", "a b c d: e", "x y: z"]


@pytest.mark.parametrize("log_format", ["<Date> <Time> <Level> <Component>: <Content>",
                                        "<Date> <Time> <Content>",
                                        "<Date> <Time> <Level> <Component>:<Content>", "<Content>"])
def test_a_format_without_regex_characters_matches_as_before(log_format):
    old = old_format_regex(log_format)
    for line in PLAIN_LINES:
        before = old.match(line.strip())
        assert fields(log_format, line) == (None if before is None else before.groupdict()), line


@pytest.mark.parametrize("log_format, message", [
    ("<Date> (<Level> <Content>", "missing ), unterminated subpattern"),
    ("<Date> [<Level>] <Content>", "<Level> is inside a character class"),
])
def test_a_format_that_is_no_regex_is_refused_naming_it(log_format, message):
    with pytest.raises(logparse.PreprocessError, match=re.escape(message)) as error:
        logparse.format_regex(log_format)
    assert repr(log_format) in str(error.value) and "\\[" in str(error.value)


def test_lines_that_do_not_fit_cost_one_pass_whatever_the_format():
    # loghub's own regex (every field lazy) takes minutes on one such line: each field retried at each space
    formats = ["<A> <B> <C> <D> <E> <F> <G> <H>: <Content>",
               r"<A> <B> <C> <D>(\[<P>\])? <E> <F>: <Content> <Z>",
               r"<A> <B> <C> <D> <Component>\(\[<PID>\]\)\?: <Content>", MAC]
    lines = [" ".join(["word"] * n) + " [1] (x)" for n in range(5, 400, 13)] + ["x " * 3000]
    started = time.process_time()
    for log_format in formats:
        regex = logparse.format_regex(log_format)
        assert all(regex.match(line) is None for line in lines)
    assert time.process_time() - started < 10  # milliseconds here


def linux_log(path, count: int, lines=None):
    generated = "".join(f"Jun 14 15:16:{i % 60:02d} combo sshd(pam_unix)[{19000 + i}]: check pass; user "
                        f"u{i % 7} unknown\n" for i in range(count))
    path.write_text(generated if lines is None else "\n".join(lines) + "\n")
    return path


def test_a_format_that_matches_nothing_fails_fast_naming_the_first_lines(tmp_path):
    log = linux_log(tmp_path / "l.log", 5000)
    escaped = r"<Month> <Date> <Time> <Level> <Component>\(\[<PID>\]\)\?: <Content>"  # (\[<PID>\])? escaped
    started = time.perf_counter()
    result = run_script("preprocess.py", log, "--output", tmp_path / "o", "--log-format", escaped,
                        "--session-key", r"\[\d+\]", "--config", write_config(tmp_path / "base.yaml"))
    assert time.perf_counter() - started < 30
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no line of the first 1000 matches --log-format" in result.stderr
    assert all(f"{log}:{n}: Jun 14 15:16:0{n - 1} combo" in result.stderr for n in (1, 2, 3))
    assert f"{log}:4:" not in result.stderr and not (tmp_path / "o" / "sessions.jsonl").exists()
    # the format as loghub writes it parses every line
    result = run_script("preprocess.py", log, "--output", tmp_path / "o", "--log-format", LINUX,
                        "--session-key", r"\[\d+\]", "--config", tmp_path / "base.yaml")
    assert result.returncode == 0 and "5000 lines: 5000 parsed" in result.stdout, result.stderr


def test_parse_only_writes_templates_state_and_the_structured_csv(tmp_path):
    log = linux_log(tmp_path / "l.log", 0, [
        "Jun 14 15:16:01 combo sshd(pam_unix)[19939]: check pass; user unknown",
        "Jun 14 15:16:02 combo kernel: Linux booted", "not a linux line",
        "Jun 14 15:16:03 combo sshd(pam_unix)[19940]: check pass; user unknown"])
    (tmp_path / "cwd").mkdir()
    result = run_script("preprocess.py", log, "--output", tmp_path / "o", "--log-format", LINUX,
                        "--structured", tmp_path / "s.csv", cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert "parsed only (no --session-key or --window): no sessions.jsonl or config.yaml" in result.stdout
    shown = sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_file() and not p.name.startswith("."))
    assert shown == ["parser_state.json", "sources.json", "templates.json"]
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert list(rows[0]) == ["LineId", "Month", "Date", "Time", "Level", "Component", "PID", "Content",
                             "EventId", "EventTemplate"]
    assert [(r["LineId"], r["PID"], r["EventId"], r["EventTemplate"]) for r in rows] == [
        ("1", "19939", "0", "check pass; user unknown"), ("2", "", "1", "Linux booted"), ("3", "", "", ""),
        ("4", "19940", "0", "check pass; user unknown")]
    stats = json.loads((tmp_path / "o" / "sources.json").read_text())["stats"]
    assert (stats["parsed"], stats["unmatched"], stats["parse_only"], stats.get("sessions", 0)) == \
        (3, 1, True, 0)
    # without --structured, and through the saved state (matching only): the same IDs
    result = run_script("preprocess.py", log, "--output", tmp_path / "p", "--parser-state",
                        tmp_path / "o" / "parser_state.json", "--structured", tmp_path / "t.csv",
                        cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.csv").read_text() == (tmp_path / "s.csv").read_text()
    assert json.loads((tmp_path / "p" / "templates.json").read_text())[0]["template"] == \
        "check pass; user unknown"
    # detection needs sessions: a parse-only state has no grouping, so it says what to give
    with pytest.raises(logparse.PreprocessError, match="give either --session-key"):
        list(preprocess.sessions_from_logs(str(tmp_path / "o" / "parser_state.json"), [str(log)]))
    assert list(preprocess.sessions_from_logs(str(tmp_path / "o" / "parser_state.json"), [str(log)],
                                              window="count:2"))[0]["event_ids"] == [0, 1]


def test_a_field_of_an_optional_group_reads_as_empty_when_absent(tmp_path):
    lines = [f"Jun 14 15:16:0{i} combo {'kernel' if i % 2 else 'sshd[7]'}: event {i}" for i in range(6)]
    log = linux_log(tmp_path / "l.log", 0, lines)
    preprocess.main([str(log), "--output", str(tmp_path / "o"), "--log-format", LINUX, "--window", "count:2",
                     "--label-field", "PID", "--normal-value", "",
                     "--config", str(write_config(tmp_path / "b.yaml"))])
    windows = [json.loads(x) for x in (tmp_path / "o" / "sessions.jsonl").read_text().splitlines()]
    assert [w["label"] for w in windows] == [1, 1, 1]  # each window holds one line with a PID
    preprocess.main([str(log), "--output", str(tmp_path / "t"), "--log-format", LINUX, "--window", "time:10",
                     "--time-field", "PID", "--config", str(tmp_path / "b.yaml")])
    # no time: left out
    assert json.loads((tmp_path / "t" / "sources.json").read_text())["stats"]["bad_time"] == 3


SYSTEMS = ["HDFS", "BGL", "HPC", "Windows", "Linux", "Android", "Proxifier", "OpenStack", "Mac"]


@needs_loghub
def test_fields_equal_logparsers_and_the_ground_truth_on_the_nine_samples():
    import parsing
    for system in SYSTEMS:
        log_format = parsing.BENCHMARK[system]["log_format"]
        ours, theirs = logparse.format_regex(log_format), parsing.loghub_regex(log_format)
        lines = (LOGHUB / f"{system}_2k.log").read_text(encoding="utf-8", errors="replace").splitlines()
        with open(LOGHUB / f"{system}_2k.log_structured.csv", newline="", encoding="utf-8") as handle:
            truth = list(csv.DictReader(handle))
        for line, row in zip(lines, truth, strict=True):
            match = ours.match(line.strip())
            assert match is not None, f"{system}: {line}"
            values = {k: v or "" for k, v in match.groupdict().items()}
            assert values == {k: v or "" for k, v in theirs.search(line.strip()).groupdict().items()}, line
            assert values == {k: row[k] for k in values}, line


@needs_loghub
def test_accuracy_with_the_benchmark_settings_is_at_least_drain3s_on_the_nine_samples():
    import parsing
    rows = {row["system"]: row for row in parsing.accuracy_table(SYSTEMS)}
    assert all(rows[s]["ours"] >= rows[s]["drain3"] for s in SYSTEMS), rows
    assert all(rows[s]["drain3"] >= round(parsing.BENCHMARK[s]["published"], 2) - 0.01 for s in SYSTEMS
               if s != "Android"), rows  # drain3 reproduces Drain's published figures but on Android
    assert rows["HDFS"]["defaults"] == 1.0 and rows["BGL"]["defaults"] >= 0.9625
