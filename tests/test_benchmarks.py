"""The benchmark scripts' own plumbing (their figures live in benchmarks/README.md, not in tests)."""
import importlib.util
import sys

from conftest import REPO


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STAGE = """
import time
for line in ["| INFO | [Step 1] Loss: 1.0", "| INFO | noise", "| INFO | [Step 2] Loss: 0.9",
             "| INFO | Epoch 1/2 | train loss 0.5", "| WARNING | something to know"]:
    print("2026-01-01 00:00:00 " + line)
    time.sleep(0.2)
"""


def test_hdfs_benchmark_passes_on_milestones_and_a_step_line_now_and_then(tmp_path, capsys):
    """Off a terminal (nohup, CI) the benchmark must not be silent during a long epoch: step lines come through
    at most every progress_every_s, milestones and warnings always, other lines never."""
    hdfs = load("hdfs")
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE)
    hdfs.run([sys.executable, str(stage)], progress_every_s=0.3)
    shown = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert shown == ["[Step 2] Loss: 0.9", "Epoch 1/2 | train loss 0.5", "something to know"]
    hdfs.run([sys.executable, str(stage)], progress_every_s=1000)
    assert "Step" not in capsys.readouterr().out
