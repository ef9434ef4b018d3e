"""Shared fixtures: tiny data sets written on the fly, and a runner for the scripts as subprocesses."""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
HDFS_DIR = REPO.parent / "shared" / "data" / "hdfs"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))

needs_hdfs = pytest.mark.skipif(not (HDFS_DIR / "hdfs_train").exists(),
                                reason="../shared/data/hdfs is absent")

# A model small enough that an end-to-end run takes seconds on 2 cores.
TINY = {"model": {"vocab_size": 29, "embedding_dim": 16, "hidden_size": 32, "num_layers": 1, "dropout": 0.0},
        "training": {"batch_size": 16, "epochs": 2, "log_every_steps": 5, "save_every_steps": 7,
                     "warmup_steps": 3, "evaluate_after_training": False},
        "early_stopping": {"enabled": False}}


def run_script(script: str, *args, cwd=REPO, timeout=300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` as a process of its own, its output captured. Forked from tests/zygote.py,
    which has the heavy imports done (two seconds a run saved); DEEPLOG_TEST_SUBPROCESS=1 starts each run
    from scratch instead."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, str(REPO / script), *map(str, args)]
    if os.environ.get("DEEPLOG_TEST_SUBPROCESS") == "1":
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="deeplog-run-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        with _LOCK:   # the umask is read by setting it (put back at once), and the zygote starts once
            umask = os.umask(0)
            os.umask(umask)
            socket_path = _zygote()
        request = {"script": command[1], "args": command[2:], "cwd": str(cwd), "env": env, "umask": umask,
                   "stdout": str(out), "stderr": str(err)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(socket_path)
            connection.sendall(json.dumps(request).encode() + b"\n")
            replies = connection.makefile("rb")
            pid = int(replies.readline())
            connection.settimeout(timeout)
            try:
                code = int(replies.readline())
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(command, timeout) from None
        return subprocess.CompletedProcess(command, code, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


_ZYGOTE: dict = {}
_LOCK = threading.Lock()   # run_script is called from threads too (tests/test_raw_hdfs.py runs two at once)


def _zygote() -> str:
    """The socket of this pytest process's zygote, started on first use."""
    if "socket" not in _ZYGOTE or _ZYGOTE["process"].poll() is not None:
        path = os.path.join(tempfile.mkdtemp(prefix="deeplog-zygote-"), "socket")
        process = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), path],
                                   stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if process.stdout.readline() != b"ready\n":
            raise RuntimeError("tests/zygote.py did not start")
        atexit.register(process.kill)
        _ZYGOTE.update(socket=path, process=process)
    return _ZYGOTE["socket"]


def write_config(path: Path, overrides: dict | None = None, base: dict | None = None) -> Path:
    config = json.loads(json.dumps(TINY if base is None else base))
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    # each test's token caches stay in its own temp folder, never in the user's ~/.cache
    config.setdefault("lazy_loading", {}).setdefault("cache_dir", str(path.parent / "cache"))
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def sample_sessions():
    """A few hundred normal and abnormal sessions from the sample generator (seeded)."""
    import random

    import generate_sample
    rng = random.Random(123)
    normal = [generate_sample.normal_session(rng) for _ in range(240)]
    abnormal = [generate_sample.abnormal_session(rng)[0] for _ in range(60)]
    return normal, abnormal


@pytest.fixture
def tiny_data(tmp_path, sample_sessions):
    """A data directory with the normal sessions split over a JSON array, a JSONL file and a text file."""
    normal, _ = sample_sessions
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps([{"event_ids": s} for s in normal[:80]]))
    (data / "b.jsonl").write_text("".join(json.dumps({"event_ids": s, "label": 0}) + "\n"
                                          for s in normal[80:160]))
    (data / "c.txt").write_text("".join(" ".join(map(str, s)) + "\n" for s in normal[160:]))
    return data


def fixed_model(vocab_size=5):
    """A model whose prediction ignores the input: class c has rank c (class 0 best, end-of-session last)."""
    import torch

    from model import DeepLog

    model = DeepLog(vocab_size, embedding_dim=4, hidden_size=4, num_layers=1, dropout=0.0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(model.num_classes, 0, -1, dtype=torch.float))
    return model.eval()


def known(*sets, vocab_size=5):
    """The record training would keep of these sets of event types: the sets and their pairs."""
    from rules import CoOccurrence, pairs_of_sets

    return CoOccurrence(vocab_size, sets, pairs_of_sets(sets, vocab_size))


def hand_calibration(**keys) -> dict:
    """A calibration of the current form made by hand: these keys over a minimal one (no end-of-session
    bound, combined = probability), upgraded and validated as a stored one would be."""
    import calibration

    base = {"top_k": 2, "top_g": 5, "sessions": 10, "score_thresholds": {"p90": 0.1, "p95": 0.2, "p99": 0.3},
            "least_likely_normal_log_prob": -5.0, "log_probability_bound": -5.0, "event_set_rule": False,
            "flagged_on_calibration": {}, "combined_rules": ["probability"]}
    return calibration.checked({**base, **keys}, "hand-made calibration")
