"""End to end from raw HDFS logs (issue #9, item 7): raw HDFS_v1-style lines are written from the event-key sessions of
../shared/data/hdfs (each key's template of loghub's HDFS_templates.csv filled with plausible values, blocks
interleaved in time); preprocess.py must give the same sessions back up to a renaming of IDs, and train.py +
evaluate.py on its output must detect on dev within 0.01 (recall, F1 of the default rule) of the event-ID route.

Runs only where ../shared/data/hdfs and ../shared/data/loghub exist: two trainings with the project's recipe
(config.yaml, 10 epochs), about two minutes on 2 CPU cores."""
from __future__ import annotations

import csv
import json
import random
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import HDFS_DIR, REPO, run_script

LOGHUB = REPO.parent / "shared" / "data" / "loghub"
needs_data = pytest.mark.skipif(not ((HDFS_DIR / "hdfs_train").exists() and (LOGHUB / "HDFS_templates.csv").exists()),
                                reason="../shared/data/hdfs or ../shared/data/loghub is absent")
LOG_FORMAT = "<Date> <Time> <Pid> <Level> <Component>: <Content>"
SESSION_KEY = r"blk_-?\d+"
EXCEPTION = "java.io.IOException: Connection reset by peer"

# What fills each <*> of the HDFS_templates.csv template of an event, in order ({blk}, {ip}... drawn per line),
# and the level and component of its lines, as in HDFS_v1 (see ../shared/data/loghub/HDFS_2k.log).
FILL = {
    "E1": (["", " {blk}"], "INFO", "dfs.FSDataset"),
    "E2": (["", " {blk}"], "INFO", "dfs.DataBlockScanner"),
    "E3": (["{ip}:50010 ", " {blk} ", " /{ip2}"], "INFO", "dfs.DataNode$DataXceiver"),
    "E4": (["{ip}:50010:", " {blk} ", " /{ip2}:"], "WARN", "dfs.DataNode$DataXceiver"),
    "E5": (["", " {blk} ", " /{ip}:{port} ", " /{ip}:50010"], "INFO", "dfs.DataNode$DataXceiver"),
    "E6": (["", " {blk} ", " /{ip}:{port} ", " /{ip2}:50010 ", " {size}"], "INFO", "dfs.DataNode$DataXceiver"),
    "E7": (["", " {blk} ", " java.io.IOException: Could not read from stream"], "INFO", "dfs.DataNode$DataXceiver"),
    "E8": (["", " {responder} ", " {blk} ", "."], "INFO", "dfs.DataNode$PacketResponder"),
    "E9": (["", " {blk} ", " {size} ", " /{ip}"], "INFO", "dfs.DataNode$PacketResponder"),
    "E10": (["", " {blk} {responder} ", " " + EXCEPTION], "INFO", "dfs.DataNode$PacketResponder"),
    "E11": (["", "{responder}", "{blk}", ""], "INFO", "dfs.DataNode$PacketResponder"),
    "E12": (["{ip}:50010", " {blk} ", " {ip2}:50010"], "INFO", "dfs.DataNode$DataXceiver"),
    "E13": (["", " {blk}"], "INFO", "dfs.DataNode$DataXceiver"),
    "E14": (["", " {blk} " + EXCEPTION], "INFO", "dfs.DataNode$DataXceiver"),
    "E15": (["", " {blk} ", " {offset} ", " {offset2} ", " {meta}"], "INFO", "dfs.DataNode$BlockReceiver"),
    "E16": (["{ip}:50010", " {blk} ", " /{ip2}:50010"], "INFO", "dfs.DataNode$DataTransfer"),
    "E17": (["{ip}:50010", " {blk} ", " {ip2}:50010 ", " " + EXCEPTION], "WARN", "dfs.DataNode"),
    "E18": (["{ip}:50010 ", " {blk} ", " {ip2}:50010"], "INFO", "dfs.DataNode"),
    "E19": (["", " {blk}"], "INFO", "dfs.FSDataset"),
    "E20": (["", " {blk}. ", "."], "WARN", "dfs.FSDataset"),
    "E21": (["", " {blk} ", " /mnt/hadoop/dfs/data/current/subdir{subdir}/{blk}"], "INFO", "dfs.FSDataset"),
    "E22": (["", ".", " /user/root/rand/_temporary/_task_{job}_m_{task:06d}_0/part-{task:05d}. {blk}"],
            "INFO", "dfs.FSNamesystem"),
    "E23": (["", ".", " {blk} ", " {ip}:50010"], "INFO", "dfs.FSNamesystem"),
    "E24": (["", " {blk} ", "."], "INFO", "dfs.FSNamesystem"),
    "E25": (["", " {ip}:50010 ", " {blk} ", " datanode(s) {targets}"], "INFO", "dfs.FSNamesystem"),
    "E26": (["", ".", " {ip}:50010 ", " {blk} ", " {size}"], "INFO", "dfs.FSNamesystem"),
    "E27": (["", ".", " {blk} ", " {ip}:50010 ", " {size}"], "WARN", "dfs.FSNamesystem"),
    "E28": (["", ".", " {blk} ", " {ip}:50010 ", " {size} "], "WARN", "dfs.FSNamesystem"),
}


def read_templates() -> dict[int, str]:
    """Event key (1..30) -> template of HDFS_templates.csv (EventId E1..E30)."""
    with (LOGHUB / "HDFS_templates.csv").open() as handle:
        return {int(row["EventId"][1:]): row["EventTemplate"] for row in csv.DictReader(handle)}


def read_sessions(path: Path) -> list[list[int]]:
    return [[int(key) for key in line.split()] for line in path.read_text().splitlines()]


class RawWriter:
    """Raw HDFS_v1 lines for event-key sessions: each session a block with its own id, sessions started in file
    order and interleaved at random (seeded) while each keeps its own order, the clock moving on as it goes."""

    def __init__(self, templates: dict[int, str], seed: int):
        self.rng = random.Random(seed)
        self.formats = {}
        for key, template in templates.items():
            if f"E{key}" not in FILL:
                continue
            slots, level, component = FILL[f"E{key}"]
            pieces = template.split("<*>")
            assert len(pieces) == len(slots) + 1, f"E{key}: {len(slots)} fillers for {template!r}"
            content = "".join(piece + slot for piece, slot in zip(pieces, slots)) + pieces[-1]
            self.formats[key] = (level, component, content.strip())
        self.blocks: set[str] = set()
        self.clock = 1226262915  # 2008-11-09 20:35:15 UTC, as HDFS_v1 starts
        self.job = "200811092030_0001"

    def block_id(self) -> str:
        while True:
            block = f"blk_{self.rng.randint(-2 ** 63, 2 ** 63 - 1)}"
            if block not in self.blocks:
                self.blocks.add(block)
                return block

    def ip(self) -> str:
        return f"10.{self.rng.choice((250, 251))}.{self.rng.randint(0, 255)}.{self.rng.randint(1, 254)}"

    def line(self, key: int, block: str, task: int) -> str:
        rng, ip = self.rng, self.ip
        values = {"blk": block, "ip": ip(), "ip2": ip(), "port": rng.randint(32768, 60999),
                  "size": rng.choice((67108864, 67108864, 67108864, rng.randint(1, 67108863))),
                  "responder": rng.randint(0, 2), "offset": rng.randint(0, 2 ** 26), "offset2": rng.randint(0, 2 ** 26),
                  "meta": rng.randint(7, 524295), "subdir": rng.randint(0, 63), "job": self.job, "task": task,
                  "targets": " ".join(f"{ip()}:50010" for _ in range(rng.randint(1, 2)))}
        level, component, content = self.formats[key]
        self.clock += rng.random() < 0.05
        stamp = time.strftime("%y%m%d %H%M%S", time.gmtime(self.clock))
        return f"{stamp} {rng.randint(13, 30000)} {level} {component}: {content.format(**values)}"

    def write(self, sessions: list[list[int]], path: Path, concurrent: int = 40) -> list[str]:
        """Writes the log; returns the block id of each session, in the order given."""
        blocks = [self.block_id() for _ in sessions]
        pending, active = iter(range(len(sessions))), []   # active: [session index, next position]
        with path.open("w") as handle:
            while True:
                while len(active) < concurrent and (index := next(pending, None)) is not None:
                    active.append([index, 0])
                if not active:
                    break
                which = self.rng.randrange(len(active))
                index, position = active[which]
                handle.write(self.line(sessions[index][position], blocks[index], index) + "\n")
                if position + 1 == len(sessions[index]):
                    active.pop(which)
                else:
                    active[which][1] += 1
        return blocks


def check_renaming(original: list[list[int]], parsed: dict[str, list[int]], blocks: list[str]) -> dict[int, int]:
    """The parsed sessions are the original ones up to a renaming of IDs: a bijection, from first occurrences."""
    assert sorted(parsed) == sorted(blocks)
    mapping: dict[int, int] = {}
    for keys, block in zip(original, blocks):
        for key, new in zip(keys, parsed[block]):
            mapping.setdefault(key, new)
    inverse = {}
    for key, new in mapping.items():
        inverse.setdefault(new, []).append(key)
    merged = {new: keys for new, keys in inverse.items() if len(keys) > 1}
    assert not merged, f"templates merged by Drain (new ID: original keys): {merged}"
    wrong = [(block, keys, parsed[block]) for keys, block in zip(original, blocks)
             if [mapping[k] for k in keys] != parsed[block]]
    assert not wrong, f"{len(wrong)} sessions differ, e.g. {wrong[:3]} under {mapping}"
    return mapping


def train_and_evaluate(config: Path, name: str, *data, output: Path) -> dict:
    result = run_script("train.py", "--config", config, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = Path(yaml.safe_load(config.read_text())["training"]["output_dir"]) / "checkpoints" / "best_model.pt"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, *data, "--output-dir", output, "--tag", name,
                        timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(output.glob(f"evaluation_results_*_{name}.json")).read_text())


@needs_data
def test_raw_hdfs_logs_give_the_same_sessions_and_the_same_detection(tmp_path):
    templates = read_templates()
    train = read_sessions(HDFS_DIR / "hdfs_train")
    normal, abnormal = read_sessions(HDFS_DIR / "hdfs_dev_normal"), read_sessions(HDFS_DIR / "hdfs_dev_abnormal")
    writer = RawWriter(templates, seed=9)

    # 1. raw logs: the training sessions in one, dev normal and abnormal interleaved in another, with labels
    train_blocks = writer.write(train, tmp_path / "train.log")
    order = random.Random(10).sample(range(len(normal) + len(abnormal)), len(normal) + len(abnormal))
    dev = [(normal + abnormal)[i] for i in order]
    dev_blocks = writer.write(dev, tmp_path / "dev.log")
    labels = {block: "Anomaly" if i >= len(normal) else "Normal" for i, block in zip(order, dev_blocks)}
    with (tmp_path / "anomaly_label.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("BlockId", "Label"), *labels.items()])

    # 2. preprocess the training log (default masks, no tuning): the same sessions up to a renaming of IDs
    out = tmp_path / "raw"
    started = time.perf_counter()
    result = run_script("preprocess.py", tmp_path / "train.log", "--output", out, "--log-format", LOG_FORMAT,
                        "--session-key", SESSION_KEY, "--config", REPO / "config.yaml")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = {s["session_id"]: s["event_ids"] for s in map(json.loads, (out / "sessions.jsonl").open())}
    mapping = check_renaming(train, parsed, train_blocks)
    lines = sum(map(len, train))
    stats = json.loads((out / "sources.json").read_text())["stats"]
    assert (stats["lines"], stats["parsed"], stats["templates"]) == (lines, lines, len(mapping))
    speed = re.search(r"([\d,]+) lines/s", result.stdout + result.stderr)
    print(f"\npreprocess: {lines} lines in {seconds:.1f} s (script; its own count: {speed and speed[1]} lines/s), "
          f"{len(mapping)} templates; key -> ID {dict(sorted(mapping.items()))}")

    # the dev log through the saved parser state: known events get their training IDs, others the unknown ID
    dev_out = tmp_path / "raw_dev"
    result = run_script("preprocess.py", tmp_path / "dev.log", "--output", dev_out, "--parser-state",
                        out / "parser_state.json", "--labels", tmp_path / "anomaly_label.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    dev_parsed = {s["session_id"]: s for s in map(json.loads, (dev_out / "sessions.jsonl").open())}
    dev_stats = json.loads((dev_out / "sources.json").read_text())["stats"]
    print(f"dev: {dev_stats['lines']} lines, {dev_stats['unknown']} of events unseen in training (unknown ID)")
    unknown = len(mapping)
    assert sorted(dev_parsed) == sorted(dev_blocks)
    for keys, block in zip(dev, dev_blocks):
        assert dev_parsed[block]["event_ids"] == [mapping.get(k, unknown) for k in keys], block
        assert dev_parsed[block]["label"] == (labels[block] == "Anomaly")

    # 3. the raw route: the generated config as it is (the project's recipe), caches in tmp_path
    config = yaml.safe_load((out / "config.yaml").read_text())
    recipe = yaml.safe_load((REPO / "config.yaml").read_text())
    config["lazy_loading"]["cache_dir"] = recipe["lazy_loading"]["cache_dir"] = str(tmp_path / "cache")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # the same recipe as the event-ID route's below, but for the data path, vocabulary and output folder
    for section in set(recipe) - {"preprocess"}:
        for key in set(recipe[section]) - {"vocab_size", "output_dir", "preprocessed_dir", "abnormal_dir"}:
            assert config[section][key] == recipe[section][key], (section, key)
    started = time.perf_counter()
    raw = train_and_evaluate(out / "config.yaml", "raw", "--data-dir", dev_out / "sessions.jsonl", output=out)
    print(f"raw route: train.py + evaluate.py {time.perf_counter() - started:.0f} s")

    # 4. the event-ID route on the original files, the same recipe
    ids_dir = tmp_path / "ids"
    recipe["data"].update(preprocessed_dir=str(HDFS_DIR / "hdfs_train"), abnormal_dir=None)
    recipe["training"]["output_dir"] = str(ids_dir)
    ids_dir.mkdir()
    (ids_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    ids = train_and_evaluate(ids_dir / "recipe.yaml", "ids", "--data-dir", HDFS_DIR / "hdfs_dev_normal",
                             "--abnormal-dir", HDFS_DIR / "hdfs_dev_abnormal", output=ids_dir)
    print(f"event-ID route: train.py + evaluate.py {time.perf_counter() - started:.0f} s")

    for name, results in (("raw", raw), ("event IDs", ids)):
        d = results["default"]
        print(f"{name}: rule {d['rule']} recall {d['recall']:.4f} FPR {d['fpr']:.4%} precision "
              f"{d['precision']:.4f} F1 {d['f1']:.4f} FP {d['fp']} FN {d['fn']}")
    assert raw["default"]["rule"] == ids["default"]["rule"]
    assert (raw["normal_scores"]["count"], raw["abnormal_sessions"]["count"]) == (len(normal), len(abnormal))
    assert raw["default"]["recall"] == pytest.approx(ids["default"]["recall"], abs=0.01)
    assert raw["default"]["f1"] == pytest.approx(ids["default"]["f1"], abs=0.01)
