"""Learning from feedback: the plumbing of `train.py --update` (the story itself is train.update).

Examples:

    python train.py --update outputs/checkpoints/best_model.pt --feedback false_positives.jsonl
    python train.py --update outputs/checkpoints/best_model.pt --feedback fp.txt --output-dir outputs/fixed
    python train.py --update outputs/checkpoints/best_model.pt --feedback detections.jsonl --epochs 5
    # event types new to the model (templates preprocess.py --parser-state made): the vocabulary grows
    python train.py --update outputs/checkpoints/best_model.pt --feedback today/fp.jsonl \
        --parser-state today/parser_state.json
    python -c "import feedback; print(feedback.read_feedback('fp.jsonl', 29).sessions[:3])"
    # rollback: point detection back at outputs/checkpoints/best_model.pt (the parent is never written)

The feedback FILE lists sessions an operator marked normal, told apart by content: JSON lines of sessions as
dataset.py reads them (one labelled 1 is skipped and counted), DeepLog text lines, or detect.py's output
(flagged sessions; its early alerts and "normal" verdicts are skipped and counted); a *.json file holds an
array of session objects. A bad line stops the update before anything is written, naming file and line.

The update fine-tunes the parent's weights for update.epochs epochs over every feedback session repeated
update.feedback_repeats times plus update.replay_sessions sessions of the parent's training data, at
update.learning_rate; the parent's records of which event types occur in training are joined with the
feedback's; the thresholds are fitted again on the calibration half of the validation split. The new
checkpoint is written once, complete: OUTPUT_DIR/checkpoints/best_model.pt, recording its "parent" (path,
sha256, run_id, step, epoch) and the "feedback" it learned (path, sha256, sessions).
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import calibration as cal
import evaluate
import utils
from checkpoint import (
    TrainState,
    co_occurrence_of,
    count_vectors_state,
    load_checkpoint,
    model_from_checkpoint,
    pair_table,
    save_checkpoint,
)
from config import (
    MAX_VOCAB_SIZE,
    Config,
    reader_options,
    resolve_config,
)
from dataset import DataError, _numbered_items, _open, _record, collate, make_windows
from logparse import load_state
from model import DeepLog
from rules import (
    MAX_COUNT_ENTRIES,
    MAX_COUNT_VECTORS,
    MAX_EVENT_PAIRS,
    MAX_EVENT_SETS,
    CoOccurrence,
    CountVectors,
    pairs_of_sets,
    sorted_unique,
    verdicts,
)
from runtime import Runtime, amp_settings, rng_state
from scoring import ChunkScorer, data_chunks
from tokens import special_tokens

UPDATE_FOLDER = "update-{time}"   # beside the parent's run: OUTPUT_DIR/update-YYYYmmdd-HHMMSS
SKIPPED_WORDS = {"early_alerts": "early-alert lines (no event_ids: not a whole session)",
                 "normal_verdicts": "lines with verdict normal (nothing to correct)",
                 "labelled_abnormal": "sessions labelled 1 (abnormal: not feedback that they are normal)"}


# ----------------------------------------------------------------------------- the parent
@dataclass
class Parent:
    path: Path
    checkpoint: dict
    sha256: str

    @classmethod
    def load(cls, path) -> "Parent":
        """The checkpoint to update, validated by the one loader, with the digest of its bytes."""
        checkpoint = load_checkpoint(path, map_location="cpu")
        return cls(Path(path).resolve(), checkpoint, file_sha256(path))

    @property
    def run_dir(self) -> Path:
        """The folder of the parent's run: the one holding checkpoints/, else the checkpoint's own folder."""
        folder = self.path.parent
        return folder.parent if folder.name == "checkpoints" else folder

    def describe(self) -> str:
        c = self.checkpoint
        return f"{self.path} (run {c.get('run_id')}, step {c.get('step')}, {self.epochs_done()})"

    def epochs_done(self) -> str:
        """The epochs the parent completed, in words: its checkpoint's "epoch" is the one a resume would
        start (11 after 10), and an update's are update epochs."""
        c = self.checkpoint
        epoch, batches = c.get("epoch"), (c.get("data_position") or {}).get("batches_done", 0)
        if not isinstance(epoch, int):
            return "epochs unrecorded"
        kind = "update epoch" if c.get("feedback") else "epoch"
        done = f"after {epoch - 1} {kind}{'' if epoch - 1 == 1 else 's'}"
        return done + (f" and {batches} batches of the next" if isinstance(batches, int) and batches else "")

    def training_time(self) -> str:
        """The parent's own training (or update) time, as its history recorded it."""
        history = self.checkpoint.get("history") or {}
        times = [t for t in history.get("epoch_time", []) if isinstance(t, (int, float))]
        return f"{utils.format_duration(sum(times))} over its {len(times)} recorded epochs" if times else \
            "an unrecorded time"

    def still_unchanged(self) -> str:
        """Whether the parent file still holds the bytes the update read (nothing here writes it)."""
        same = self.path.is_file() and file_sha256(self.path) == self.sha256
        return f"unchanged (sha256 {self.sha256[:12]}...)" if same else "CHANGED by another process meanwhile"

    def record(self) -> dict:
        """What the new checkpoint says about where it came from (rollback: point detection back here)."""
        c = self.checkpoint
        return {"path": str(self.path), "sha256": self.sha256, "run_id": c.get("run_id"),
                "step": c.get("step"), "epoch": c.get("epoch")}


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2 ** 20):
            digest.update(block)
    return digest.hexdigest()


def update_config(parent: Parent, args) -> Config:
    """The parent's resolved config, with the update: section of --config (config.yaml where present) and
    the flags (--epochs and --lr set update.epochs and update.learning_rate)."""
    config_path = args.config if (args.config != "config.yaml" or Path(args.config).exists()) else None
    config = resolve_config(config_path, [("command line", {
        "update.epochs": args.epochs, "update.learning_rate": args.lr, "data.preprocessed_dir": args.data_dir,
        "training.batch_size": args.batch_size, "training.device": args.device, "training.seed": args.seed})],
        # the update: section is never the parent's: the file's, else the defaults
        stored={k: v for k, v in parent.checkpoint["config"].items() if k != "update"}, sections=("update",))
    output_dir = Path(args.output_dir) if args.output_dir else \
        parent.run_dir / UPDATE_FOLDER.format(time=time.strftime("%Y%m%d-%H%M%S"))
    if output_dir.resolve() in (parent.path.parent, parent.run_dir):
        raise utils.ConfigError(f"--output-dir {output_dir} is the parent's own run folder: the update "
                                "writes a new folder, so that the parent stays as it is (rollback)")
    config.training.output_dir = str(output_dir)
    config.training.evaluate_after_training = True
    if not Path(config.data.preprocessed_dir).exists():
        raise DataError(f"{config.data.preprocessed_dir}: the parent's training data is not there; it is "
                        f"needed for the replay sample and the recalibration (its validation split): pass "
                        f"--data-dir")
    return config


# ----------------------------------------------------------------------------- the feedback file
@dataclass
class Feedback:
    path: Path
    sha256: str
    sessions: list[list[int]]
    session_ids: list[str]
    skipped: Counter = field(default_factory=Counter)
    first_new: tuple[str, int] | None = None   # (where, ID) of the first event ID the model has no place for

    def record(self) -> dict:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "sessions": len(self.sessions),
                "distinct_sessions": len({tuple(s) for s in self.sessions}),
                "skipped": {key: int(self.skipped[key]) for key in SKIPPED_WORDS}}

    def skipped_text(self) -> str:
        parts = [f"{self.skipped[key]} {words}" for key, words in SKIPPED_WORDS.items() if self.skipped[key]]
        return "; skipped: " + ", ".join(parts) if parts else ""


def feedback_format(file: Path) -> str:
    """"json" (an array, by its suffix), "jsonl" (the first non-blank byte opens an object) or "text"."""
    name = file.name[:-3] if file.name.endswith(".gz") else file.name
    if name.endswith(".json"):
        return "json"
    with _open(file) as handle:
        while block := handle.read(4096):
            stripped = block.lstrip()
            if stripped:
                return "jsonl" if stripped[:1] == b"{" else "text"
    raise DataError(f"{file}: empty feedback file: no sessions to learn from")


def read_feedback(path, vocab_size: int, options: dict | None = None) -> Feedback:
    """Every session of a feedback file, validated in full before any work starts: DataError naming the
    file and the line of the first bad record (no skipping: feedback is few sessions, each deliberate). IDs
    at or above vocab_size are event types new to the model (new_events says whether it can learn them)."""
    file, options = Path(path), options or reader_options(Config())
    if not file.exists():
        raise DataError(f"{file}: feedback file not found")
    if not file.is_file():
        raise DataError(f"{file}: not a regular file: pass a file of sessions")
    fmt = feedback_format(file)
    fields = (options["event_ids_field"], options["label_field"], options["session_id_field"])
    found = Feedback(file, file_sha256(file), [], [])
    try:
        for index, item in _numbered_items(file, fmt, options["json_array_key"], None, 1):
            # detect.py's output lines that are no session to learn from
            kind = None if not isinstance(item, dict) or "event_ids" in item else \
                "early_alerts" if item.get("alert") is not None else \
                "normal_verdicts" if item.get("verdict") == "normal" else None
            if kind is not None:
                found.skipped[kind] += 1
                continue
            record = _record(file, index, item, fields, None, fmt)
            if record.label:
                found.skipped["labelled_abnormal"] += 1
                continue
            outside = next((e for e in record.event_ids if e >= vocab_size), None)
            if outside is not None and found.first_new is None:
                found.first_new = (f"{'record' if fmt == 'json' else 'line'} {index}", outside)
            found.sessions.append(record.event_ids)
            found.session_ids.append(record.session_id)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(f"{file}: unreadable: {' '.join(str(error).split())[:160]}") from None
    if not found.sessions:
        raise DataError(f"{file}: no feedback sessions to learn from{found.skipped_text()}")
    return found


# ----------------------------------------------------------------------------- event types new to the model
@dataclass
class NewEvents:
    parent_vocab: int
    vocab_size: int                 # the updated model's
    templates: dict[int, str]       # each new ID the feedback holds -> its template
    state_path: Path | None = None  # the parser state that names them
    state: dict | None = None

    def record(self) -> dict:
        return {"parent": self.parent_vocab, "updated": self.vocab_size, "parser_state": str(self.state_path),
                "new_events": [[i, t] for i, t in sorted(self.templates.items())]}

    def growth_line(self) -> str:
        named = "; ".join(f"{i} {utils.short(t)}" for i, t in list(self.templates.items())[:5])
        return (f"Vocabulary grows from {self.parent_vocab} to {self.vocab_size} event types "
                f"({self.state_path}) for the {len(self.templates)} new to the model in the feedback: {named}"
                + ("; ..." if len(self.templates) > 5 else ""))


def new_events(found: Feedback, vocab_size: int, parser_state: str | None) -> NewEvents:
    """The event types of the feedback that the model has no place for (IDs >= its vocab_size). Each must be
    a template of the parser state that parsed the feedback's logs (--parser-state, else the
    parser_state.json beside the feedback file): the vocabulary grows to hold them (up to the largest; the
    state's later templates stay unknown until fed back), and the updated model and later parses through
    the state agree on every ID. An ID that no template holds (a line that matched none, under --match-only
    or in live detection) names nothing and cannot be learned."""
    if found.first_new is None:
        return NewEvents(vocab_size, vocab_size, {})
    where, first = found.first_new
    path = Path(parser_state) if parser_state else found.path.parent / "parser_state.json"
    if not parser_state and not path.is_file():
        raise DataError(f"{found.path}: {where}: event ID {first} is new to the model (its vocabulary is "
                        f"0..{vocab_size - 1}) and no parser state names it: pass --parser-state, the "
                        f"parser_state.json of the preprocess.py run that parsed these sessions (it learned "
                        f"their new templates)")
    state = load_state(str(path))
    known = {t["id"]: t["template"] for t in state["templates"]}
    ids = sorted({e for s in found.sessions for e in s if e >= vocab_size})
    missing = next((i for i in ids if i not in known), None)
    if missing is not None:
        raise DataError(f"{found.path}: event ID {missing} is new to the model (its vocabulary is "
                        f"0..{vocab_size - 1}) and no template of {path} has it (lines that matched no "
                        f"template get ID {state['vocab_size']}): parse the logs with preprocess.py "
                        f"--parser-state, which makes templates of new lines, and feed back its sessions")
    if state["vocab_size"] > MAX_VOCAB_SIZE:
        raise DataError(f"{path}: {state['vocab_size']:,} event types, more than a model holds "
                        f"({MAX_VOCAB_SIZE:,})")
    return NewEvents(vocab_size, ids[-1] + 1, {i: known[i] for i in ids}, path.absolute(), state)


def grown_for(model: DeepLog, new: NewEvents, logger) -> DeepLog:
    """The model with room for the feedback's new event types (grown), said in the log; else itself."""
    if not new.templates:
        return model
    logger.info(new.growth_line())
    return grown(model, new.vocab_size)


def grown(model: DeepLog, vocab_size: int) -> DeepLog:
    """`model` with room for event IDs up to vocab_size - 1 (tokens.py: the special tokens move above them).
    The IDs it had keep every weight; a new ID reads as the model read it before (the unknown token's
    embedding) and is predicted with no weight and the lowest bias less the log of their number (together,
    the share of one class at the lowest bias), unseen until mark_seen: until the update teaches them, the
    grown model scores sessions almost as the old one did (the old classes' logits are unchanged)."""
    old = model.vocab_size
    larger = DeepLog(**{**model.model_args, "vocab_size": vocab_size})
    before, after = model.state_dict(), larger.state_dict()
    for key, value in before.items():
        if key.startswith("lstm."):
            after[key] = value
    after["embedding.weight"][:old] = before["embedding.weight"][:old]
    after["embedding.weight"][vocab_size:] = before["embedding.weight"][old:]   # end, pad, start, unk
    after["embedding.weight"][old:vocab_size] = before["embedding.weight"][model.unk_id]
    for key in ("head.weight", "head.bias", "seen_events"):   # classes: the events, then the end
        after[key][:old], after[key][vocab_size] = before[key][:old], before[key][old]
    after["head.weight"][old:vocab_size] = 0
    after["head.bias"][old:vocab_size] = before["head.bias"].min() - math.log(vocab_size - old)
    after["seen_events"][old:vocab_size] = False
    larger.load_state_dict(after)
    return larger


# ----------------------------------------------------------------------------- records joined
def join_records(checkpoint: dict, sessions: list[list[int]], config: Config, logger) -> CoOccurrence:
    """The parent's records of which event types occur in training, joined with the feedback sessions',
    written into `checkpoint` (a copy) and returned; one the parent did not keep stays unkept."""
    vocab_size = checkpoint["model_args"]["vocab_size"]
    known = co_occurrence_of(checkpoint)
    if "count_vectors" not in checkpoint:   # a parent whose evaluation after training never ran
        evaluate.record_count_vectors(checkpoint, known, config, reader_options(config), logger)
    new_sets = {frozenset(s) for s in sessions} - (known.sets or set())
    sets = None if known.sets is None else known.sets | new_sets
    if sets is not None and len(sets) > MAX_EVENT_SETS:
        logger.warning(f"With the feedback, more than {MAX_EVENT_SETS:,} distinct sets of event types: "
                       f"the event_set rule is off for the updated model")
        sets = None
    pairs, new_pairs = known.pairs, 0
    if pairs is not None:
        joined = sorted_unique(pairs, pairs_of_sets(new_sets, vocab_size))
        new_pairs, pairs = len(joined) - len(pairs), joined
        if len(pairs) > MAX_EVENT_PAIRS:
            logger.warning(f"With the feedback, more than {MAX_EVENT_PAIRS:,} pairs of event types: the "
                           f"event_pair rule is off for the updated model")
            pairs = None
    repeats = config.update.feedback_repeats if config is not None else 2
    counts = None if known.counts is None else join_count_vectors(known.counts, sessions, repeats)
    checkpoint["event_sets"] = None if sets is None else sorted(sorted(s) for s in sets)
    joined = CoOccurrence(vocab_size, checkpoint["event_sets"], pairs, counts)
    checkpoint["event_pairs"] = pair_table(joined)
    checkpoint["count_vectors"] = count_vectors_state(counts)
    logger.info(f"Records joined with the feedback: {'not kept' if sets is None else len(new_sets)} new "
                f"sets of event types, {'not kept' if pairs is None else new_pairs} new pairs, count "
                f"vectors {'not kept' if counts is None else f'of {counts.sessions} sessions'}")
    return joined


def join_count_vectors(known: CountVectors, sessions: list[list[int]],
                       repeats: int = 2) -> CountVectors | None:
    """The parent's count vectors and the feedback sessions', each counted `repeats` times (at least 2), as
    it is trained: a fed-back session is then the nearest normal session of its own vector (distance 0)
    and never the lone odd one whose distance to the rest would set the count-vector threshold (one odd
    fed-back session made that rule flag nothing); None beyond the record's bounds."""
    added = CountVectors.from_chunks([[list(s) for s in sessions for _ in range(max(repeats, 2))]])
    weights: dict[bytes, int] = {}
    vectors: dict[bytes, np.ndarray] = {}
    for record in (known, added):
        if record is None:
            continue
        bounds = np.searchsorted(record.entries[:, 0], np.arange(len(record.weights) + 1))
        for vector, weight in enumerate(record.weights.tolist()):
            pairs = record.entries[bounds[vector]:bounds[vector + 1], 1:]
            key = np.ascontiguousarray(pairs).tobytes()
            vectors.setdefault(key, pairs)
            weights[key] = weights.get(key, 0) + weight
    if len(vectors) > MAX_COUNT_VECTORS or sum(map(len, vectors.values())) > MAX_COUNT_ENTRIES:
        return None
    entries = np.concatenate([np.column_stack([np.full(len(v), i), v])
                              for i, v in enumerate(vectors.values())])
    return CountVectors(entries, np.array(list(weights.values())))


def mark_seen(model, sessions: list[list[int]]) -> list[int]:
    """Mark the feedback's targets seen (the model may predict them now); those training never had."""
    ids = sorted({e for s in sessions for e in s})
    new = [e for e in ids if not bool(model.seen_events[e])]
    model.seen_events[ids] = True
    model.seen_events[special_tokens(model.vocab_size)[0]] = True   # every session ends
    return new


# ----------------------------------------------------------------------------- what is trained on
def replay_sample(config: Config, logger) -> list[list[int]]:
    """update.replay_sessions sessions drawn uniformly from the parent's training sessions."""
    chunks = evaluate.training_sessions(config, reader_options(config), logger)
    return reservoir(chunks, config.update.replay_sessions, config.training.seed)


def reservoir(chunks, wanted: int, seed: int) -> list[list[int]]:
    """A uniform sample of `wanted` sessions from chunks of sessions, in one pass (reservoir, seeded)."""
    if wanted <= 0:
        return []
    rng = np.random.default_rng(seed)
    sample: list = []
    seen = 0
    for chunk in chunks:
        for session in chunk:
            seen += 1
            if len(sample) < wanted:
                sample.append(list(session))
                continue
            slot = int(rng.integers(seen))
            if slot < wanted:
                sample[slot] = list(session)
    return sample


def update_windows(feedback: list[list[int]], replay: list[list[int]], config: Config) -> list:
    """The training windows of an update epoch: every feedback session update.feedback_repeats times, and
    the replay sample once, cut as training cuts sessions."""
    vocab, data = config.model.vocab_size, config.data
    windows = []
    for sessions, repeats in ((feedback, config.update.feedback_repeats), (replay, 1)):
        for session in sessions:
            windows += make_windows(session, vocab, data.max_seq_length, data.window_context) * repeats
    return windows


def epoch_batches(windows: list, batch_size: int, seed: int, epoch: int, pad_id: int):
    """The batches of one update epoch: the windows in a seeded random order, padded."""
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for begin in range(0, len(windows), batch_size):
        yield collate([windows[i] for i in order[begin:begin + batch_size].tolist()], pad_id)


def optimizer_for(model, config: Config, total_steps: int, scale: float = 1.0):
    """A fresh optimizer at update.learning_rate (times `scale`), warmed up and decayed like training's."""
    tc = config.training
    optimizer_class = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=config.update.learning_rate * scale,
                                weight_decay=tc.weight_decay)
    warmup = utils.warmup_steps(None, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, utils.lr_multiplier(warmup, total_steps, tc.lr_schedule, tc.min_lr_ratio))
    return optimizer, scheduler


def update_state(model, config: Config, window_count: int, runtime: Runtime, scale: float = 1.0):
    """The update's TrainState (fresh optimizer and schedule at update.learning_rate x `scale`, training's
    precision) and autocast dtype."""
    tc, uc = config.training, config.update
    steps = math.ceil(window_count / tc.batch_size) * uc.epochs
    optimizer, scheduler = optimizer_for(model, config, steps, scale)
    amp_dtype, use_loss_scaling = amp_settings(config, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=use_loss_scaling)
    early_stopping = utils.EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta)
    state = TrainState(model, optimizer, scheduler, scaler, early_stopping, config)
    state.total_steps = steps
    return state, amp_dtype


def plan_line(found: Feedback, replay: list, windows: list, state: TrainState, parent: Parent,
              new_events: list[int]) -> str:
    uc = state.config.update
    parent_steps = parent.checkpoint.get("step")
    share = f", {state.total_steps / parent_steps:.1%} of them" if parent_steps else ""
    new = f"; event types new to the model: {new_events}" if new_events else ""
    return (f"Fine-tuning: {len(found.sessions)} feedback sessions x {uc.feedback_repeats} + {len(replay)} "
            f"replayed training sessions = {len(windows)} windows; {state.total_steps} steps "
            f"({uc.epochs} epochs) at lr {uc.learning_rate:g} (the parent trained {parent_steps} steps"
            f"{share}){new}")


# ----------------------------------------------------------------------------- the new checkpoint
def claim_output(output_dir: Path, logger):
    """The update's own folder, claimed as a training run claims one (another run's is refused)."""
    lock = utils.OutputLock(output_dir, logger)
    atexit.register(lock.release)
    utils.remove_stale_temp_files(output_dir)
    return utils.RunRecord.claim(output_dir, None, None, overwrite=False)


def recalibrate(model, co_occurrence: CoOccurrence, config: Config, logger,
                training_sweep: dict | None = None):
    """Thresholds fitted on the calibration half of the parent's validation split, as after training (with
    the joined count vectors, and what the sweep of the parent's training data found: its records are the
    parent's, less what the feedback put back); the calibration, the evaluation half and the abnormal
    sessions."""
    ev = config.evaluation
    options = reader_options(config)
    calibration_set, source, normal, abnormal = evaluate.calibration_sessions(config, options, logger,
                                                                              ", after the update")
    calibration = evaluate.fit_calibration(model, calibration_set, ev.top_k, ev.top_g, ev.target_fpr, source,
                                           ev.decision_rule, ev.batch_size, co_occurrence,
                                           training_sweep=training_sweep)
    evaluate.log_rule(calibration, ev.decision_rule, logger)
    return calibration, normal, abnormal


def evaluate_update(model, checkpoint_path: Path, calibration: dict, normal, abnormal, co_occurrence,
                    config: Config, logger) -> dict:
    """The evaluation after training, for the updated model, reports in the update's folder."""
    data = config.data
    if data.abnormal_dir:
        abnormal = itertools.chain(abnormal, data_chunks(data.abnormal_dir, config, "all", logger))
    paths = {"normal": f"{data.preprocessed_dir} (validation split, evaluation half)",
             "abnormal": ", ".join(filter(None, [data.abnormal_dir, f"label 1 in {data.preprocessed_dir}"]))}
    return evaluate.run_evaluation(model, checkpoint_path, calibration, normal, abnormal, paths, config,
                                   Path(config.training.output_dir), config.evaluation.top_k, None, logger,
                                   co_occurrence)


def save_updated(state: TrainState, records: dict, parent: Parent, found: Feedback, replayed: int,
                 calibration: dict, path: Path, new: NewEvents, logger) -> dict:
    """The new checkpoint, complete (weights, records, calibration, lineage), written once, atomically (the
    parent is never touched); then calibration.json beside it, and where the vocabulary grew, the parser
    state that names the new IDs (for later parses and detection)."""
    checkpoint = state.state_dict([rng_state()])
    checkpoint.update({key: records[key] for key in ("event_sets", "event_pairs", "count_vectors")})
    checkpoint["calibration"] = calibration
    checkpoint["parent"] = parent.record()
    checkpoint["feedback"] = {**found.record(), "replay_sessions": replayed,
                              "epochs": state.config.update.epochs,
                              "learning_rate": state.config.update.learning_rate,
                              "feedback_repeats": state.config.update.feedback_repeats}
    if new.templates:
        checkpoint["feedback"]["vocabulary"] = new.record()
    save_checkpoint(checkpoint, path)
    if state.run is not None:
        state.run.wrote(path.name)
    output_dir = Path(state.config.training.output_dir)
    cal.save_calibration(output_dir / "calibration.json", calibration)
    if new.state is not None:
        utils.save_json(output_dir / "parser_state.json", new.state)
        logger.info(f"Parse later logs and detect with {output_dir / 'parser_state.json'} (a copy of "
                    f"{new.state_path}), so that the new event types keep the IDs this model learned")
    return checkpoint


# ----------------------------------------------------------------------------- checking an update
def still_flagged(model, calibration: dict, co_occurrence: CoOccurrence, sessions: list,
                  rule: str) -> list[int]:
    """The indexes of the fed-back sessions the updated model still flags under its new calibration."""
    scorer = ChunkScorer(model, [calibration["top_k"], calibration["top_g"]], co_occurrence=co_occurrence)
    distinct, scores, _ = scorer([tuple(s) for s in sessions])
    flags = dict(zip(distinct, verdicts(scores, calibration, rule).tolist()))
    return [i for i, session in enumerate(sessions) if flags[tuple(session)]]


def self_check_line(still: list[int], found: Feedback, uc) -> str:
    """What the update's self-check found, in words, with what to do when it did not pass."""
    if not still:
        return (f"Self-check: none of the {len(found.sessions)} fed-back sessions is flagged by the updated "
                "model")
    names = ", ".join(found.session_ids[i] for i in still[:5])
    return (f"Self-check: {len(still)} of {len(found.sessions)} fed-back sessions are still flagged after "
            f"the update ({names}{', ...' if len(still) > 5 else ''}): raise update.feedback_repeats or "
            f"update.learning_rate ({uc.learning_rate:g}), or check that they are normal")


def flagged_sessions(checkpoint_path, sessions: list) -> tuple[np.ndarray, dict]:
    """Which of `sessions` a checkpoint flags under its stored calibration and rule, and that calibration."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    calibration, rule = checkpoint["calibration"], checkpoint["config"]["evaluation"]["decision_rule"]
    scorer = ChunkScorer(model, [calibration["top_k"], calibration["top_g"]],
                                  co_occurrence=co_occurrence_of(checkpoint))
    distinct, scores, _ = scorer([tuple(s) for s in sessions])
    flags = verdicts(scores, calibration, rule)
    row = {session: i for i, session in enumerate(distinct)}
    return np.array([bool(flags[row[tuple(s)]]) for s in sessions], dtype=bool), calibration
