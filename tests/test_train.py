"""End-to-end: python train.py as a subprocess on tiny data, exact resume, bad input, torchrun."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_script, write_config


def run_torchrun(config, data, out, timeout=300) -> subprocess.CompletedProcess:
    """train.py under torchrun: two CPU processes (gloo) on a free port."""
    # PYTHONUNBUFFERED: a rank that dies still shows its lines
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(REPO / "train.py"), "--config", str(config),
                           "--data-dir", str(data), "--output-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, sample_sessions):
    """One uninterrupted 2-epoch run on 240 sessions (14 steps/epoch, step checkpoints every 7)."""
    root = tmp_path_factory.mktemp("straight")
    data = root / "data"
    data.mkdir()
    normal, abnormal = sample_sessions
    lines = ([{"event_ids": s, "label": 0} for s in normal]
             + [{"event_ids": s, "label": 1} for s in abnormal[:5]])
    (data / "sessions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = write_config(root / "config.yaml", {"training": {"keep_last_checkpoints": 10}})
    out = root / "out"
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return root, config, data, out, result


def test_outputs_logs_and_checkpoints(straight_run):
    root, config, data, out, result = straight_run
    log = (out / "training.log").read_text()
    step_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| INFO \| \[Step (\d+)\] Loss: \d+\.\d{4} "
                           r"\(avg: \d+\.\d{4}\) \| LR: \d\.\d\de-\d\d \| ([\d,]+) tok/s \| data wait (\d+)% "
                           r"\| "
                           r"Time: [\d.]+[smh] \(ETA: .+\)$", re.M)
    lines = step_line.findall(log)
    # the ETA is rough until three log intervals after the first step line (steps 5 and 10 here: then 20)
    etas = re.findall(r"\[Step (\d+)\].*\(ETA: (.+)\)$", log, re.M)
    assert all(eta.endswith(", settling") == (int(step) < 20) for step, eta in etas)
    assert [int(step) for step, _, _ in lines] == list(range(5, 30, 5))  # every log_every_steps
    assert all(int(rate.replace(",", "")) > 0 and 0 <= int(wait) <= 100 for _, rate, wait in lines)
    assert "skipped: 5 abnormal, 0 bad records" in log
    # what an epoch costs here, stated after the first steps, before the first step line
    expected = re.search(r"Expected time: [\d.]+[smh] per epoch, [\d.]+[smh] for the rest of the run \(steps "
                         r"2-10 timed on this hardware, \d+ ms a step; the step lines' ETA follows the "
                         r"pace\)", log)
    assert expected and log.index("[Step 5]") < expected.start() < log.index("[Step 10]")
    if not torch.cuda.is_available():
        assert "GPU stats: no CUDA GPU" in log and "GPU:" not in log
    assert len(re.findall(r"\| Epoch \d/2 \| train loss", log)) == 2
    assert "Traceback" not in result.stderr

    history = json.loads((out / "training_history.json").read_text())
    assert history["epoch"] == [1, 2]
    for key in ("train_loss", "val_loss", "learning_rate", "epoch_time"):
        assert len(history[key]) == 2 and all(isinstance(v, float) for v in history[key])
    assert history["val_loss"][1] < history["val_loss"][0]   # it learns

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == 32 and saved["data"]["preprocessed_dir"] == str(data)

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best_model.pt", "epoch_1.pt", "epoch_2.pt", "step_14.pt", "step_21.pt", "step_28.pt",
                     "step_7.pt"]
    checkpoint = torch.load(out / "checkpoints" / "step_21.pt", weights_only=True)
    assert checkpoint["step"] == 21 and checkpoint["data_position"]["epoch"] == 2
    assert checkpoint["data_position"]["batches_done"] == 7
    assert checkpoint["config"]["model"]["hidden_size"] == 32
    assert {"optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "rng_state",
            "early_stopping", "history"} <= set(checkpoint)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_resume_is_bit_identical_with_reader_processes(tmp_path, tiny_data):
    """Parallel parsing (lazy_loading.num_workers) keeps the sample order deterministic, so resume stays
    exact."""
    config = write_config(tmp_path / "c.yaml", {"lazy_loading": {"num_workers": 2, "cache": False}})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", straight)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", resumed,
                        "--resume", straight / "checkpoints" / "step_21.pt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_params(params(straight / "checkpoints" / "epoch_2.pt"),
                       params(resumed / "checkpoints" / "epoch_2.pt"))


@pytest.mark.parametrize("checkpoint", ["step_7.pt", "step_21.pt", "epoch_1.pt"])
def test_resume_is_bit_identical(straight_run, tmp_path, checkpoint):
    """N steps straight == N/2 steps, stop, resume for the rest (mid-epoch and at an epoch boundary)."""
    root, config, data, out, _ = straight_run
    resumed = tmp_path / "resumed"
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", resumed,
                        "--resume", out / "checkpoints" / checkpoint)
    assert result.returncode == 0, result.stderr
    assert_same_params(params(out / "checkpoints" / "epoch_2.pt"),
                       params(resumed / "checkpoints" / "epoch_2.pt"))
    straight_history = json.loads((out / "training_history.json").read_text())
    resumed_history = json.loads((resumed / "training_history.json").read_text())
    for key in ("train_loss", "val_loss", "learning_rate"):
        assert resumed_history[key] == straight_history[key]


def test_keep_last_n_and_early_stopping(tmp_path, tiny_data):
    config = write_config(tmp_path / "c.yaml", {
        "training": {"epochs": 8, "keep_last_checkpoints": 2, "save_every_steps": 3, "learning_rate": 1e-9},
        "early_stopping": {"enabled": True, "patience": 2, "min_delta": 0.01}})
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data,
                        "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    # learning rate ~0: the loss never improves by min_delta after epoch 1, so patience 2 stops after epoch 3
    history = json.loads((tmp_path / "o" / "training_history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    assert "Early stopping" in result.stdout
    checkpoints = sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir())
    assert [n for n in checkpoints if n.startswith("epoch")] == ["epoch_2.pt", "epoch_3.pt"]
    assert len([n for n in checkpoints if n.startswith("step")]) == 2


@pytest.mark.parametrize("content,message", [
    ('{"event_ids": [1, 2]}\n{"event_ids": [1, 2\n', "sessions.jsonl: line 2: malformed JSON"),
    ('{"event_ids": [1, 200]}\n', "sessions.jsonl: line 1: event ID 200 >= vocab_size 29"),
    ('{"event_ids": [1, "x"]}\n', "line 1: event ID 'x' is not an integer"),
    ('{"label": 0}\n', "line 1: missing field 'event_ids'"),
    ('{"event_ids": [1], "label": 1}\n', "no normal training sessions"),
])
def test_bad_data_is_one_clear_error_and_no_checkpoint(tmp_path, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sessions.jsonl").write_text(content)
    config = write_config(tmp_path / "c.yaml")
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", tmp_path / "o")
    assert result.returncode == 2
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("args,message", [
    (["--data-dir", "/nonexistent/dir"], "/nonexistent/dir: no such file or directory"),
    (["--config", "/nonexistent.yaml"], "cannot read config file /nonexistent.yaml"),
    (["--epochs", "0"], "'training.epochs' must be > 0"),
    (["--resume", "/nonexistent.pt"], "/nonexistent.pt: checkpoint not found"),
])
def test_bad_arguments_are_one_clear_error(tmp_path, tiny_data, args, message):
    config = write_config(tmp_path / "c.yaml")
    base = ["--config", config, "--data-dir", tiny_data, "--output-dir", tmp_path / "o"]
    result = run_script("train.py", *base, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_resume_with_another_model_size_is_a_clear_error(straight_run, tmp_path):
    root, config, data, out, _ = straight_run
    bigger = write_config(tmp_path / "c.yaml", {"model": {"hidden_size": 64}})
    result = run_script("train.py", "--config", bigger, "--data-dir", data, "--output-dir", tmp_path / "o",
                        "--resume", out / "checkpoints" / "step_7.pt")
    message = "the model differs from the config's hidden_size 32 vs 64"
    assert result.returncode == 2 and message in result.stderr   # errors go to stderr...
    assert message in (tmp_path / "o" / "training.log").read_text()   # ...and into the run's log
    assert "Traceback" not in result.stdout + result.stderr


def test_corrupt_resume_checkpoint_is_rejected_and_left_alone(tmp_path, tiny_data):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    config = write_config(tmp_path / "c.yaml")
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data,
                        "--output-dir", tmp_path / "o", "--resume", bad)
    assert result.returncode == 2 and "is not a checkpoint written by train.py (not a zip archive)" in \
        result.stdout + result.stderr
    assert bad.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("layout", ["three files: each rank parses its own", "one file: ranks split samples"])
def test_torchrun_ddp_on_cpu(tmp_path, tiny_data, layout, sample_sessions):
    """Two processes with the gloo backend: equal steps per rank, metrics reduced, master-only files."""
    data = tiny_data
    if layout.startswith("one file"):
        data = tmp_path / "one.txt"
        data.write_text("".join(" ".join(map(str, s)) + "\n" for s in sample_sessions[0]))
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1}})
    out = tmp_path / "o"
    result = run_torchrun(config, data, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes: 2" in result.stdout
    # the counts of both ranks are merged: the same totals as a single process sees
    single = run_script("train.py", "--config", config, "--data-dir", data,
                        "--output-dir", tmp_path / "single")
    summary = re.compile(r"\d+ normal sessions -> \d+ windows, \d+ predicted events")
    assert summary.search(result.stdout).group() == summary.search(single.stdout).group()
    history = json.loads((out / "training_history.json").read_text())
    assert len(history["train_loss"]) == 1
    checkpoint = torch.load(out / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert len(checkpoint["rng_state"]) == 2   # each rank's dropout stream, for an exact resume
    assert (out / "training.log").read_text().count("Epoch 1/1") == 1


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(straight_run, tmp_path):
    """kill (nohup runs, preemption): stop at the next step, save, exit 143; the resume ends bit-identical."""
    import os
    import signal
    root, config, data, out, _ = straight_run
    stopped = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config), "--data-dir",
                                str(data), "--output-dir", str(stopped)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    for line in process.stdout:
        output.append(line)
        if "[Step 5]" in line:
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, "".join(output)
    message = next(line for line in output if "Stopped by SIGTERM" in line)
    checkpoint = Path(message.split("--resume ")[1].strip())
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 5 <= step < 28
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", stopped,
                        "--resume", checkpoint)
    assert result.returncode == 0, result.stderr
    assert_same_params(params(out / "checkpoints" / "epoch_2.pt"),
                       params(stopped / "checkpoints" / "epoch_2.pt"))
    # the loss is summed in float64, so where the stop flushed it does not change the history's digits
    assert json.loads((stopped / "training_history.json").read_text())["train_loss"] == \
        json.loads((out / "training_history.json").read_text())["train_loss"]


def test_torchrun_without_counting_pass_keeps_ranks_in_lockstep(tmp_path, tiny_data):
    """samples_per_epoch overestimates the smaller file shard: the ranks still stop together (no hang)."""
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1},
                                                "data": {"samples_per_epoch": 240}})
    result = run_torchrun(config, tiny_data, tmp_path / "o", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "o" / "training_history.json").read_text())["epoch"] == [1]


def test_readme_plotting_snippet_runs_unchanged_on_a_real_history(straight_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    root, config, data, out, _ = straight_run
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(import json\nimport matplotlib.*?)```", readme, re.S).group(1)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "training_history.json").write_text((out / "training_history.json").read_text())
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_under_other_batch_order_settings_warns(straight_run, tmp_path):
    root, config, data, out, _ = straight_run
    other = write_config(tmp_path / "c.yaml", {"training": {"batch_size": 8},
                                               "lazy_loading": {"buffer_size": 64}})
    result = run_script("train.py", "--config", other, "--data-dir", data, "--output-dir", tmp_path / "o",
                        "--resume", out / "checkpoints" / "step_7.pt")
    assert result.returncode == 0, result.stdout + result.stderr
    warning = next(line for line in result.stdout.splitlines() if "Resuming with other settings" in line)
    assert "batch_size 16 -> 8" in warning and "lazy_loading.buffer_size 10000 -> 64" in warning


def test_an_unwritable_output_dir_is_one_line_and_a_nonzero_exit(tmp_path, tiny_data):
    (tmp_path / "file").write_text("not a folder")
    config = write_config(tmp_path / "c.yaml")
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir",
                        tmp_path / "file" / "out")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'file' / 'out'}: Not a directory"]


def test_a_second_run_on_one_output_dir_is_refused_and_a_dead_holder_taken_over(tmp_path, tiny_data):
    import fcntl
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1}})
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as holder:   # a live run holds the lock
        holder.write("pid 4242 on host elsewhere\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", out)
    assert result.returncode == 2 and "is in use by another run (pid 4242 on host elsewhere)" in result.stderr
    assert not (out / "checkpoints").exists()
    # holder gone
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert "Taking over" in result.stdout and "pid 4242 on host elsewhere" in result.stdout
    assert (out / ".lock").read_text() == ""   # released at the end


def test_stale_temp_files_go_written_files_follow_the_umask_and_a_failed_run_keeps_the_old_config(tmp_path,
                                                                                                  tiny_data):
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1}})
    out = tmp_path / "o"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / ".step_7.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert oct((out / "checkpoints" / "best_model.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    saved = (out / "config.yaml").read_text()
    result = run_script("train.py", "--config", config, "--data-dir", tmp_path / "missing",
                        "--output-dir", out)
    assert result.returncode == 2 and (out / "config.yaml").read_text() == saved


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_too_little_data_to_calibrate_skips_the_evaluation_with_a_warning(tmp_path):
    from dataset import is_validation
    def first_held_out(name):
        return next(i for i in range(1, 1000) if is_validation(name, i, 42, 0.1))
    data = tmp_path / next(f"d{k}.txt" for k in range(100) if first_held_out(f"d{k}.txt") > 5)
    first_held_out = first_held_out(data.name)
    # lines 1 .. first_held_out - 1: no session falls in the validation split
    data.write_text("".join(f"1 2 {i % 5 + 3}\n" for i in range(1, first_held_out)))
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1, "evaluate_after_training": True}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "Evaluation after training skipped:" in result.stdout and "no normal sessions" in result.stdout


def test_a_signal_after_the_last_step_stops_the_evaluation_with_a_nonzero_exit(caplog):
    import logging
    import os
    import signal

    import train
    import utils
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = utils.StopSignal()
        stop.raise_now = True
        with pytest.raises(utils.Stopped):   # during the evaluation: it stops at once
            os.kill(os.getpid(), signal.SIGTERM)
        logger = logging.getLogger("test-deeplog")
        # arrived before it began: it never starts
        with caplog.at_level(logging.INFO, logger="test-deeplog"):
            code = train.evaluate_after_training(Path("runs/x/best_model.pt"), None, stop, logger)
        assert code == 143 and "Stopped by SIGTERM before the evaluation after training ended" in caplog.text
        assert "python evaluate.py --checkpoint runs/x/best_model.pt" in caplog.text
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_following_the_stop_message_continues_that_run_on_its_data(tmp_path, tiny_data):
    """--resume alone (as the stop message says) takes output_dir and the data settings from the checkpoint,
    instead of config.yaml's, which would write into another run's folder."""
    one_epoch = write_config(tmp_path / "one.yaml", {"training": {"epochs": 1},
                                                     "data": {"validation_split": 0.2}})
    run = tmp_path / "runs" / "x"
    result = run_script("train.py", "--config", one_epoch, "--data-dir", tiny_data, "--output-dir", run)
    assert result.returncode == 0, result.stderr
    two_epochs = write_config(tmp_path / "two.yaml",
                              {"training": {"epochs": 2, "output_dir": str(tmp_path / "other")}})
    result = run_script("train.py", "--config", two_epochs, "--resume", run / "checkpoints" / "epoch_1.pt")
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints" / "epoch_2.pt").exists() and not (tmp_path / "other").exists()
    line = next(x for x in result.stdout.splitlines() if "Resuming with the checkpoint's settings" in x)
    assert f"data.preprocessed_dir 'data/sample/train' -> '{tiny_data}'" in line
    assert "data.validation_split 0.1 -> 0.2" in line
    assert json.loads((run / "training_history.json").read_text())["epoch"] == [1, 2]


FULL_DISK = '''
import errno, runpy, sys, torch
real_save, saves = torch.save, []
class FullDisk:  # a checkpoint file on a disk that is full: every write fails, as it does on a real one
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.handle, name)
def save(state, handle, *args, **kwargs):
    saves.append(1)
    return real_save(state, handle if len(saves) == 1 else FullDisk(handle), *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_earlier_checkpoints(tmp_path, tiny_data):
    """torch.save turns a failed write into a RuntimeError about zip positions; the run still ends with one
    line naming the checkpoint and the cause, exit 1, the error in training.log and no temp file left."""
    config = write_config(tmp_path / "c.yaml")
    out = tmp_path / "o"
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK)
    result = subprocess.run([sys.executable, str(wrapper), str(REPO / "train.py"), "--config", str(config),
                             "--data-dir", str(tiny_data), "--output-dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    failed = re.fullmatch(rf"error: {re.escape(str(out / 'checkpoints'))}"
                          r"/(\w+\.pt): No space left on device", line)
    assert failed and failed.group(1) != "step_7.pt", line   # the second checkpoint written
    assert (out / "training.log").read_text().rstrip().endswith(line)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_7.pt"]   # the first one, intact
    assert torch.load(out / "checkpoints" / "step_7.pt", weights_only=True)["step"] == 7


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, tiny_data):
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1, "warmup_steps": 1000}})
    result = run_script("train.py", "--config", config, "--data-dir", tiny_data,
                        "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    steps = int(re.search(r"(\d+) steps/epoch x 1 epochs", result.stdout).group(1))
    assert f"training.warmup_steps 1000 >= the run's {steps} steps" in result.stdout


def test_one_very_long_session_trains_and_skips_the_evaluation_with_a_warning(tmp_path):
    from dataset import is_validation
    data = tmp_path / next(f"d{k}.txt" for k in range(100) if not is_validation(f"d{k}.txt", 1, 42, 0.1))
    data.write_text(" ".join(str(i % 7 + 3) for i in range(1500)) + "\n")
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1, "evaluate_after_training": True}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "Evaluation after training skipped:" in result.stdout and "no normal sessions" in result.stdout
    assert (tmp_path / "o" / "checkpoints" / "best_model.pt").exists()


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_new_run_into_another_runs_folder_is_refused_and_overwrite_moves_it_aside(tmp_path, tiny_data):
    """A run owns its output folder: a second run there is refused, naming the first and the ways out, and
    leaves every file alone; --overwrite moves the first run's files aside, so the folder holds one run."""
    config = write_config(tmp_path / "config.yaml", {"training": {"epochs": 1}})
    out = tmp_path / "out"
    first = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", out)
    assert first.returncode == 0, first.stderr
    first_run = json.loads((out / "run.json").read_text())
    assert sorted(first_run["checkpoints"]) == sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    before = _files(out)
    refused = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", out)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert f"holds a finished training run, run {first_run['run_id']}" in refused.stderr
    assert "--overwrite" in refused.stderr and "--output-dir" in refused.stderr
    assert _files(out) == before                                       # nothing written, nothing removed
    replaced = run_script("train.py", "--config", config, "--data-dir", tiny_data, "--output-dir", out,
                          "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    aside = out / "previous_runs" / first_run["run_id"]
    assert _files(aside) == before                                     # the first run, whole, beside
    second_run = json.loads((out / "run.json").read_text())
    assert second_run["run_id"] != first_run["run_id"]
    own = {p.name for p in (out / "checkpoints").glob("*.pt")}
    assert own == set(second_run["checkpoints"]) and "best_model.pt" in own
    checkpoint = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    assert checkpoint["run_id"] == second_run["run_id"]


def test_pruning_removes_only_the_checkpoints_of_the_run_that_wrote_them(tmp_path):
    import utils
    (tmp_path / "checkpoints").mkdir()
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_8.pt", "epoch_9.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
    record = utils.RunRecord(tmp_path, "this-run", "now", ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"])
    record.prune("epoch", 2)        # epoch_8 and epoch_9 are not this run's: never the newest two of it
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == [
        "epoch_2.pt", "epoch_3.pt", "epoch_8.pt", "epoch_9.pt"]
    assert json.loads((tmp_path / "run.json").read_text())["checkpoints"] == ["epoch_2.pt", "epoch_3.pt"]


def test_resume_continues_the_same_run_in_its_folder(straight_run, tmp_path):
    _, config, data, out, _ = straight_run
    folder = tmp_path / "out"
    import shutil
    shutil.copytree(out, folder)
    run_id = json.loads((folder / "run.json").read_text())["run_id"]
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", folder,
                        "--resume", folder / "checkpoints" / "step_7.pt")
    assert result.returncode == 0, result.stderr
    record = json.loads((folder / "run.json").read_text())
    assert record["run_id"] == run_id
    assert torch.load(folder / "checkpoints" / "best_model.pt", weights_only=True)["run_id"] == run_id


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"   # a zombie has ended
    except FileNotFoundError:
        return False


def _start_a_long_first_pass(tmp_path, sample_sessions):
    """train.py on four data files big enough that the cache build runs in worker processes for seconds;
    returns the process once its workers are parsing, their pids and the cache folder."""
    import time
    normal, _ = sample_sessions
    data = tmp_path / "data"
    data.mkdir()
    block = "".join(json.dumps({"event_ids": s}) + "\n" for s in normal)
    for name in "abcd":
        (data / f"{name}.jsonl").write_text(block * 600)   # each a task of seconds for one worker
    config = write_config(tmp_path / "c.yaml", {"lazy_loading": {"cache_workers": 2}})
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config), "--data-dir",
                                str(data), "--output-dir", str(tmp_path / "out")], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(_children(process.pid)) < 2:
        time.sleep(0.05)
    workers = _children(process.pid)
    assert len(workers) >= 2 and process.poll() is None, "the first pass did not start its workers"
    return process, workers, tmp_path / "cache"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pgrep, /proc and PR_SET_PDEATHSIG")
def test_sigterm_during_the_first_pass_says_so_and_leaves_no_worker_nor_temp_entry(tmp_path, sample_sessions):
    import signal
    import time
    process, workers, cache = _start_a_long_first_pass(tmp_path, sample_sessions)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM during the first pass")
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers)
    assert not list(cache.glob(".*.tmp"))
    assert not list((tmp_path / "out" / "checkpoints").glob("*.pt"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pgrep, /proc and PR_SET_PDEATHSIG")
def test_a_cache_worker_dies_with_its_killed_parent_even_in_a_long_task(tmp_path):
    """kill -9 of a first pass leaves no worker parsing on (and holding the cache lock) for nobody: a worker
    of cache._pool busy with a long task ends with its parent, not when the task is done."""
    import signal
    import time
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import cache; pool = cache._pool(1); "
              "pool.apply_async(time.sleep, (60,)); time.sleep(0.5); print('ready', flush=True); "
              "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(REPO)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    workers = _children(parent.pid)
    assert workers and all(_alive(pid) for pid in workers)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    time.sleep(1.0)   # the worker's task has 59 s to go: only dying with the parent ends it this soon
    assert not any(_alive(pid) for pid in workers)


def test_a_model_that_learned_nothing_is_named(tmp_path):
    """Events drawn uniformly at random: no model predicts them, and the run says so (its best loss stays
    near ln of the classes seen). A model that learned is not named (the next test)."""
    import random
    rng = random.Random(7)
    data = tmp_path / "noise.txt"
    data.write_text("".join(" ".join(str(rng.randrange(20)) for _ in range(12)) + "\n" for _ in range(300)))
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 1, "evaluate_after_training": True}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "o" / "training.log").read_text()
    warning = re.search(r"WARNING \| The model learned next to nothing: its best loss ([\d.]+) is (\d+)% "
                        r"of a uniform guess over the 21 classes seen in training \(ln 21 = 3\.0445\)", log)
    assert warning and float(warning.group(1)) > 0.75 * 3.0445
    # evaluate.py alone says so too, in its log and in the report
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "o" / "checkpoints" / "best_model.pt",
                        "--output-dir", tmp_path / "e")
    assert result.returncode == 0, result.stderr
    report = next((tmp_path / "e").glob("evaluation_report_*.txt")).read_text()
    assert "  WARNING: The model learned next to nothing: its loss on these sessions" in report
    assert "WARNING | The model learned next to nothing" in (tmp_path / "e" / "evaluation.log").read_text()


def test_top_k_and_top_g_beyond_a_small_vocabulary_are_scaled_with_a_warning(tmp_path):
    """Six event types (and the end): top_k 10 and top_g 9 would cover every class the model knows, so
    the thresholds are fitted at a third of them instead, and the report marks Top-10/20 as such."""
    import random
    rng = random.Random(3)
    sessions = [[1, 2] + [rng.choice([3, 4]) for _ in range(rng.randrange(1, 5))] + [5, 6]
                for _ in range(400)]
    data = tmp_path / "small.txt"
    data.write_text("".join(" ".join(map(str, s)) + "\n" for s in sessions))
    config = write_config(tmp_path / "c.yaml", {"training": {"epochs": 8, "learning_rate": 0.01,
                                                             "evaluate_after_training": True},
                                                "evaluation": {"top_k": 10, "top_g": 9}})
    result = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "o" / "training.log").read_text()
    assert ("evaluation.top_k 10 and top_g 9 are not below the 7 classes the model saw in training (6 event "
            "types and the end of session)") in log
    calibration = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert (calibration["top_k"], calibration["top_g"]) == (2, 2)
    report = next((tmp_path / "o").glob("evaluation_report_*.txt")).read_text()
    assert "Top-10 accuracy:   1.0000   (k >= the 7 classes the model saw in training: a trained model " \
        "hits every time)" in report
    assert "learned next to nothing" not in log   # this one learned
    assert re.search(r"Top-5  accuracy:   [\d.]+\n", report)   # below them: no note
    again = run_script("evaluate.py", "--checkpoint", tmp_path / "o" / "checkpoints" / "best_model.pt")
    assert again.returncode == 0, again.stderr   # the stored calibration's top_k is the one evaluated at


def test_a_finished_run_says_so_when_trained_again_or_resumed(straight_run, tmp_path):
    """Training that ran to its end is recorded as finished: training into its folder again is refused with
    that said and --overwrite offered, and resuming its last checkpoint says nothing is left to train
    (instead of a run that trains nothing), unless more epochs are asked for."""
    root, config, data, out, _ = straight_run
    record = json.loads((out / "run.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", record["finished"])
    before = _files(out)
    again = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", out)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert f"holds a finished training run, run {record['run_id']}" in again.stderr
    assert "--overwrite" in again.stderr and "python evaluate.py --checkpoint" in again.stderr
    resumed = run_script("train.py", "--config", config, "--resume", out / "checkpoints" / "epoch_2.pt")
    assert resumed.returncode == 2 and resumed.stderr.count("\n") == 1
    assert "its run is finished, nothing is left to resume: it trained all 2 epochs; to train longer, " \
           "resume with --epochs above 2" in resumed.stderr
    assert _files(out) == before                                       # nothing written, nothing removed
    import shutil
    stopped = shutil.copytree(out, tmp_path / "stopped")   # as a run stopped before its end left it
    (stopped / "run.json").write_text(json.dumps({**record, "finished": None}))
    refused = run_script("train.py", "--config", config, "--data-dir", data, "--output-dir", stopped)
    assert refused.returncode == 2 and "holds the files of another training run" in refused.stderr
    assert f"Continue it with --resume {stopped / 'checkpoints'}" in refused.stderr
    longer = run_script("train.py", "--config", config, "--resume", out / "checkpoints" / "epoch_2.pt",
                        "--epochs", "3", "--output-dir", tmp_path / "longer")
    assert longer.returncode == 0, longer.stderr
    assert "Epoch 3/3" in (tmp_path / "longer" / "training.log").read_text()


def test_the_eta_leaves_the_start_out_and_says_when_it_is_rough():
    """A start of 95 s (imports, a busy machine) then 1 s a step: the ETA follows the steps' pace."""
    import train
    time_left = train.TimeLeft(started=0.0, interval=5)
    assert time_left.text(100.0, 5, 100) == "~33.3m, settling"     # first line: all it knows is the start
    assert time_left.text(105.0, 10, 95) == "~1.6m, settling"      # 1 s a step since the first line
    assert time_left.text(120.0, 25, 80) == "1.3m"                  # 3 intervals since: settled
