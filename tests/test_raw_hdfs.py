"""End to end from raw HDFS logs (issue #9, item 7), on a subset of ../shared/data/hdfs and a small recipe.

Raw HDFS_v1-style lines are written from event-key sessions (the first training sessions, a seeded sample of
the dev sets): each key's template of loghub's HDFS_templates.csv filled with plausible values, blocks
interleaved in time. Then:
- preprocess.py gives the training sessions back up to a bijective renaming of IDs, and the dev sessions,
  through the saved parser state, with the training IDs (unseen events: the unknown ID) and their labels;
- train.py + evaluate.py with one recipe (the project's config.yaml with a tiny model and few epochs) detect
  on dev from its output within 0.01 (recall, F1 of the default rule) of the event-ID route on the same
  sessions as event-key files, with the same rule and session counts;
- evaluate.py --detect on the raw dev log through the parser state gives the verdicts of that evaluation, and
  each miss names the very raw line of its event.

The work is done once per module (fixtures); the tests skip where ../shared/data/hdfs or
../shared/data/loghub is absent."""
from __future__ import annotations

import csv
import json
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import HDFS_DIR, REPO, run_script

LOGHUB = REPO.parent / "shared" / "data" / "loghub"
pytestmark = pytest.mark.skipif(
    not ((HDFS_DIR / "hdfs_train").exists() and (LOGHUB / "HDFS_templates.csv").exists()),
    reason="../shared/data/hdfs or ../shared/data/loghub is absent")
LOG_FORMAT = "<Date> <Time> <Pid> <Level> <Component>: <Content>"
SESSION_KEY = r"blk_-?\d+"
EXCEPTION = "java.io.IOException: Connection reset by peer"
# The subset: the first training sessions, a seeded sample of each dev set
TRAIN_SESSIONS, DEV_NORMAL, DEV_ABNORMAL = 1000, 200, 1000
# The small recipe: the project's config.yaml with these values
SMALL = {"model": {"embedding_dim": 16, "hidden_size": 32, "num_layers": 1},
         "training": {"epochs": 2}}

# What fills each <*> of the HDFS_templates.csv template of an event, in order ({blk}, {ip}... drawn per
# line), and the level and component of its lines, as in HDFS_v1 (see ../shared/data/loghub/HDFS_2k.log).
XCEIVER, RESPONDER = "dfs.DataNode$DataXceiver", "dfs.DataNode$PacketResponder"
NAMESYSTEM = "dfs.FSNamesystem"
FILL = {
    "E1": (["", " {blk}"], "INFO", "dfs.FSDataset"),
    "E2": (["", " {blk}"], "INFO", "dfs.DataBlockScanner"),
    "E3": (["{ip}:50010 ", " {blk} ", " /{ip2}"], "INFO", XCEIVER),
    "E4": (["{ip}:50010:", " {blk} ", " /{ip2}:"], "WARN", XCEIVER),
    "E5": (["", " {blk} ", " /{ip}:{port} ", " /{ip}:50010"], "INFO", XCEIVER),
    "E6": (["", " {blk} ", " /{ip}:{port} ", " /{ip2}:50010 ", " {size}"], "INFO", XCEIVER),
    "E7": (["", " {blk} ", " java.io.IOException: Could not read from stream"], "INFO", XCEIVER),
    "E8": (["", " {responder} ", " {blk} ", "."], "INFO", RESPONDER),
    "E9": (["", " {blk} ", " {size} ", " /{ip}"], "INFO", RESPONDER),
    "E10": (["", " {blk} {responder} ", " " + EXCEPTION], "INFO", RESPONDER),
    "E11": (["", "{responder}", "{blk}", ""], "INFO", RESPONDER),
    "E12": (["{ip}:50010", " {blk} ", " {ip2}:50010"], "INFO", XCEIVER),
    "E13": (["", " {blk}"], "INFO", XCEIVER),
    "E14": (["", " {blk} " + EXCEPTION], "INFO", XCEIVER),
    "E15": (["", " {blk} ", " {offset} ", " {offset2} ", " {meta}"], "INFO", "dfs.DataNode$BlockReceiver"),
    "E16": (["{ip}:50010", " {blk} ", " /{ip2}:50010"], "INFO", "dfs.DataNode$DataTransfer"),
    "E17": (["{ip}:50010", " {blk} ", " {ip2}:50010 ", " " + EXCEPTION], "WARN", "dfs.DataNode"),
    "E18": (["{ip}:50010 ", " {blk} ", " {ip2}:50010"], "INFO", "dfs.DataNode"),
    "E19": (["", " {blk}"], "INFO", "dfs.FSDataset"),
    "E20": (["", " {blk}. ", "."], "WARN", "dfs.FSDataset"),
    "E21": (["", " {blk} ", " /mnt/hadoop/dfs/data/current/subdir{subdir}/{blk}"], "INFO", "dfs.FSDataset"),
    "E22": (["", ".", " /user/root/rand/_temporary/_task_{job}_m_{task:06d}_0/part-{task:05d}. {blk}"],
            "INFO", NAMESYSTEM),
    "E23": (["", ".", " {blk} ", " {ip}:50010"], "INFO", NAMESYSTEM),
    "E24": (["", " {blk} ", "."], "INFO", NAMESYSTEM),
    "E25": (["", " {ip}:50010 ", " {blk} ", " datanode(s) {targets}"], "INFO", NAMESYSTEM),
    "E26": (["", ".", " {ip}:50010 ", " {blk} ", " {size}"], "INFO", NAMESYSTEM),
    "E27": (["", ".", " {blk} ", " {ip}:50010 ", " {size}"], "WARN", NAMESYSTEM),
    "E28": (["", ".", " {blk} ", " {ip}:50010 ", " {size} "], "WARN", NAMESYSTEM),
}


def read_templates() -> dict[int, str]:
    """Event key (1..30) -> template of HDFS_templates.csv (EventId E1..E30)."""
    with (LOGHUB / "HDFS_templates.csv").open() as handle:
        return {int(row["EventId"][1:]): row["EventTemplate"] for row in csv.DictReader(handle)}


def read_sessions(path: Path) -> list[list[int]]:
    return [[int(key) for key in line.split()] for line in path.read_text().splitlines()]


def write_sessions(sessions: list[list[int]], path: Path) -> Path:
    """Event-key sessions in the format of ../shared/data/hdfs (DeepLog text)."""
    path.write_text("".join(" ".join(map(str, keys)) + "\n" for keys in sessions))
    return path


class RawWriter:
    """Raw HDFS_v1 lines for event-key sessions: each session a block with its own id, sessions started in
    file order and interleaved at random (seeded) while each keeps its own order, the clock moving on as it
    goes. `places[block]` holds the line number (from 1) of each event of the block, in its log."""

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
        self.places: dict[str, list[int]] = {}
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
                  "responder": rng.randint(0, 2), "offset": rng.randint(0, 2 ** 26),
                  "offset2": rng.randint(0, 2 ** 26), "meta": rng.randint(7, 524295),
                  "subdir": rng.randint(0, 63), "job": self.job, "task": task,
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
            number = 0
            while True:
                while len(active) < concurrent and (index := next(pending, None)) is not None:
                    active.append([index, 0])
                    self.places[blocks[index]] = []
                if not active:
                    break
                which = self.rng.randrange(len(active))
                index, position = active[which]
                handle.write(self.line(sessions[index][position], blocks[index], index) + "\n")
                number += 1
                self.places[blocks[index]].append(number)
                if position + 1 == len(sessions[index]):
                    active.pop(which)
                else:
                    active[which][1] += 1
        return blocks


def check_renaming(original: list[list[int]], parsed: dict[str, list[int]],
                   blocks: list[str]) -> dict[int, int]:
    """The parsed sessions are the original ones up to a renaming of IDs: a bijection, from first
    occurrences."""
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


def run_ok(script: str, *args) -> str:
    """Runs a script of the repository (conftest.run_script) with one thread for torch: the models
    here are tiny, and two scripts run side by side (see `beside`), where more threads than cores only wait
    on each other."""
    result = run_script(script, *args, timeout=900, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    return result.stdout + result.stderr


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for line in handle]


def train(config: Path) -> Path:
    """train.py with `config`; its best checkpoint."""
    run_ok("train.py", "--config", config)
    output_dir = Path(yaml.safe_load(config.read_text())["training"]["output_dir"])
    return output_dir / "checkpoints" / "best_model.pt"


def evaluate(checkpoint: Path, name: str, *data, output: Path) -> dict:
    """evaluate.py's results on `data` (--data-dir ...), tagged `name`."""
    run_ok("evaluate.py", "--checkpoint", checkpoint, *data, "--output-dir", output, "--tag", name)
    found = list(output.glob(f"evaluation_results_*_{name}.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def timed(what: str, work, *args, **kwargs):
    started = time.perf_counter()
    result = work(*args, **kwargs)
    print(f"{what}: {time.perf_counter() - started:.1f} s")
    return result


# ----------------------------------------------------------------------------- the work, once per module
@pytest.fixture(scope="module")
def beside():
    """Runs scripts in the background, beside the main line of fixtures (two at a time use both cores of a
    small machine): the event-ID route from the start, the detection beside the raw route's evaluation."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> SimpleNamespace:
    """The subset as event-key files and as raw logs: the training sessions in one log, dev normal and
    abnormal interleaved in another, with an anomaly_label.csv; and the small recipe."""
    base = tmp_path_factory.mktemp("raw_hdfs")
    train = read_sessions(HDFS_DIR / "hdfs_train")[:TRAIN_SESSIONS]
    normal = random.Random(11).sample(read_sessions(HDFS_DIR / "hdfs_dev_normal"), DEV_NORMAL)
    abnormal = random.Random(12).sample(read_sessions(HDFS_DIR / "hdfs_dev_abnormal"), DEV_ABNORMAL)
    ids = base / "ids"
    ids.mkdir()
    files = {name: write_sessions(sessions, ids / f"hdfs_{name}")
             for name, sessions in (("train", train), ("dev_normal", normal), ("dev_abnormal", abnormal))}

    writer = RawWriter(read_templates(), seed=9)
    train_blocks = writer.write(train, base / "train.log")
    order = random.Random(10).sample(range(len(normal) + len(abnormal)), len(normal) + len(abnormal))
    dev = [(normal + abnormal)[i] for i in order]
    dev_blocks = writer.write(dev, base / "dev.log")
    labels = {block: "Anomaly" if i >= len(normal) else "Normal" for i, block in zip(order, dev_blocks)}
    with (base / "anomaly_label.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("BlockId", "Label"), *labels.items()])

    recipe = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, values in SMALL.items():
        recipe[section].update(values)
    recipe["lazy_loading"]["cache_dir"] = str(base / "cache")
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return SimpleNamespace(base=base, train=train, normal=normal, abnormal=abnormal, files=files,
                           train_blocks=train_blocks, dev=dev, dev_blocks=dev_blocks, labels=labels,
                           places=writer.places, recipe=base / "recipe.yaml")


@pytest.fixture(scope="module")
def ids_started(logs, beside) -> Future:
    """The event-ID route, started in the background: the same recipe on the same sessions as event-key
    files."""
    recipe = yaml.safe_load(logs.recipe.read_text())
    ids_dir = logs.base / "ids" / "run"
    recipe["data"].update(preprocessed_dir=str(logs.files["train"]), abnormal_dir=None)
    recipe["training"]["output_dir"] = str(ids_dir)
    recipe["lazy_loading"]["cache_dir"] = str(logs.base / "ids" / "cache")  # no cache shared while both run
    ids_dir.mkdir()
    (ids_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    data = ("--data-dir", logs.files["dev_normal"], "--abnormal-dir", logs.files["dev_abnormal"])
    return beside.submit(lambda: timed("event-ID route: train.py + evaluate.py", lambda: evaluate(
        train(ids_dir / "recipe.yaml"), "ids", *data, output=ids_dir)))


@pytest.fixture(scope="module")
def parsed(logs, ids_started) -> SimpleNamespace:
    """The training log through preprocess.py (default masks, no tuning), the small recipe as its --config
    (the event-ID route runs meanwhile)."""
    out = logs.base / "raw"
    started = time.perf_counter()
    output = run_ok("preprocess.py", logs.base / "train.log", "--output", out, "--log-format", LOG_FORMAT,
                    "--session-key", SESSION_KEY, "--config", logs.recipe)
    seconds = time.perf_counter() - started
    speed = re.search(r"([\d,]+) lines/s", output)
    print(f"\npreprocess: {sum(map(len, logs.train))} lines in {seconds:.1f} s (script; its own count: "
          f"{speed and speed[1]} lines/s)")
    return SimpleNamespace(out=out, sessions={s["session_id"]: s["event_ids"] for s in
                                              read_jsonl(out / "sessions.jsonl")},
                           stats=json.loads((out / "sources.json").read_text())["stats"])


@pytest.fixture(scope="module")
def mapping(logs, parsed) -> dict[int, int]:
    return check_renaming(logs.train, parsed.sessions, logs.train_blocks)


@pytest.fixture(scope="module")
def dev_parsed(logs, parsed) -> SimpleNamespace:
    """The dev log through the parser state of the training log, labelled by anomaly_label.csv; matched only
    (--match-only: an unseen line gets the one unknown ID, as detection on the raw log gives it)."""
    out = logs.base / "raw_dev"
    run_ok("preprocess.py", logs.base / "dev.log", "--output", out, "--parser-state",
           parsed.out / "parser_state.json", "--labels", logs.base / "anomaly_label.csv", "--match-only")
    return SimpleNamespace(out=out, sessions={s["session_id"]: s for s in read_jsonl(out / "sessions.jsonl")},
                           stats=json.loads((out / "sources.json").read_text())["stats"])


@pytest.fixture(scope="module")
def raw_route(logs, parsed, dev_parsed, beside) -> SimpleNamespace:
    """train.py on preprocess.py's config.yaml as it is, evaluate.py on the parsed dev sessions; and,
    beside that evaluation, evaluate.py --detect on the raw dev log through the parser state."""
    checkpoint = timed("raw route: train.py", train, parsed.out / "config.yaml")
    output = logs.base / "detections.jsonl"
    detection = beside.submit(run_ok, "evaluate.py", "--checkpoint", checkpoint, "--detect",
                              logs.base / "dev.log", "--parser-state", parsed.out / "parser_state.json",
                              "--output", output)
    results = timed("raw route: evaluate.py", evaluate, checkpoint, "raw", "--data-dir",
                    dev_parsed.out / "sessions.jsonl", output=parsed.out)
    return SimpleNamespace(results=results, detection=detection, detections=output)


@pytest.fixture(scope="module")
def ids_route(ids_started) -> dict:
    return ids_started.result()


@pytest.fixture(scope="module")
def detections(raw_route) -> dict[str, dict]:
    """The lines of evaluate.py --detect on the raw dev log, by session (block id)."""
    raw_route.detection.result()
    return {line["session_id"]: line for line in read_jsonl(raw_route.detections)}


# ----------------------------------------------------------------------------- the tests
def test_the_training_log_gives_the_same_sessions_up_to_a_renaming_of_ids(logs, parsed, mapping):
    lines = sum(map(len, logs.train))
    stats = parsed.stats
    assert (stats["lines"], stats["parsed"], stats["templates"]) == (lines, lines, len(mapping))
    print(f"{len(mapping)} templates; key -> ID {dict(sorted(mapping.items()))}")


def test_the_dev_log_through_the_parser_state_gets_the_training_ids(logs, mapping, dev_parsed):
    """Known events get their training IDs, others the unknown ID (vocab_size); labels from the CSV."""
    unknown = len(mapping)
    assert sorted(dev_parsed.sessions) == sorted(logs.dev_blocks)
    for keys, block in zip(logs.dev, logs.dev_blocks):
        assert dev_parsed.sessions[block]["event_ids"] == [mapping.get(k, unknown) for k in keys], block
        assert dev_parsed.sessions[block]["label"] == (logs.labels[block] == "Anomaly")
    unseen = sum(key not in mapping for keys in logs.dev for key in keys)
    assert unseen > 0, "the dev subset holds no event unseen in training: the unknown ID goes untested"
    assert (dev_parsed.stats["lines"], dev_parsed.stats["unknown"]) == (sum(map(len, logs.dev)), unseen)
    print(f"dev: {dev_parsed.stats['lines']} lines, {unseen} of events unseen in training (unknown ID)")


def test_both_routes_train_with_the_same_small_recipe(logs, parsed):
    """preprocess.py's config.yaml is the recipe but for the data path, vocabulary and output folder."""
    config = yaml.safe_load((parsed.out / "config.yaml").read_text())
    recipe = yaml.safe_load(logs.recipe.read_text())
    for section in set(recipe) - {"preprocess"}:
        for key in set(recipe[section]) - {"vocab_size", "output_dir", "preprocessed_dir", "abnormal_dir"}:
            assert config[section][key] == recipe[section][key], (section, key)
    assert config["model"]["vocab_size"] == parsed.stats["templates"]
    assert {section: {key: config[section][key] for key in values}
            for section, values in SMALL.items()} == SMALL


def test_the_raw_route_detects_as_the_event_id_route(logs, raw_route, ids_route):
    raw, ids = raw_route.results, ids_route
    for name, results in (("raw", raw), ("event IDs", ids)):
        d = results["default"]
        print(f"{name}: rule {d['rule']} recall {d['recall']:.4f} FPR {d['fpr']:.4%} precision "
              f"{d['precision']:.4f} F1 {d['f1']:.4f} FP {d['fp']} FN {d['fn']}")
    assert raw["default"]["rule"] == ids["default"]["rule"]
    counts = (len(logs.normal), len(logs.abnormal))
    assert (raw["normal_scores"]["count"], raw["abnormal_sessions"]["count"]) == counts
    assert (ids["normal_scores"]["count"], ids["abnormal_sessions"]["count"]) == counts
    assert raw["default"]["recall"] == pytest.approx(ids["default"]["recall"], abs=0.01)
    assert raw["default"]["f1"] == pytest.approx(ids["default"]["f1"], abs=0.01)


def test_detection_on_the_raw_log_gives_the_evaluated_verdicts_and_names_each_miss_raw_line(
        logs, dev_parsed, raw_route, detections):
    default = raw_route.results["default"]
    assert sorted(detections) == sorted(logs.dev_blocks)
    assert {line["rule"] for line in detections.values()} == {default["rule"]}
    flagged = {label: sum(detections[block]["verdict"] == "abnormal" for block, name in logs.labels.items()
                          if name == label) for label in ("Anomaly", "Normal")}
    assert (flagged["Anomaly"], flagged["Normal"]) == (default["tp"], default["fp"])

    dev_log = (logs.base / "dev.log").resolve()
    raw_lines = dev_log.read_text().splitlines()
    shown = 0
    for block, line in detections.items():
        assert line["misses"] == [] or line["verdict"] == "abnormal", block
        for miss in line["misses"]:
            events = dev_parsed.sessions[block]["event_ids"]
            if miss["position"] == len(events):  # the end of the session: no line of its own
                assert (miss["actual"], "at" in miss) == ("<end>", False), (block, miss)
                continue
            assert miss["actual"] == events[miss["position"]], (block, miss)
            number = logs.places[block][miss["position"]]
            assert (miss["at"], miss["raw"]) == (f"{dev_log}:{number}", raw_lines[number - 1]), (block, miss)
            assert block in miss["raw"]
            shown += 1
    assert shown > 0, "no miss named a raw line"
    print(f"detection on the raw log: {flagged} abnormal verdicts, {shown} misses shown with their raw line")
