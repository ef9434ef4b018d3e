"""Train DeepLog on parsed log sessions, then evaluate the best model.

Examples:

    python train.py                                   # the shipped sample, CPU, under a minute
    python train.py --config config.yaml --data-dir /data/sessions --epochs 20 --batch-size 256 --lr 1e-3
    python train.py --resume outputs/checkpoints/step_1000.pt     # continue exactly where it stopped
    nohup python train.py --data-dir /data/sessions > train.out 2>&1 &   # plain log lines, no bar
    kill PID      # SIGTERM: saves checkpoints/step_N.pt at the next step, exits 143; then --resume it
    torchrun --standalone --nproc_per_node=4 train.py --data-dir /data/sessions   # DistributedDataParallel
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...
    python cache.py /data/sessions --vocab-size 10000   # optional: build the token cache before a big run
    python train.py --update outputs/checkpoints/best_model.pt --feedback false_positives.jsonl
    python train.py --update outputs/checkpoints/best_model.pt --feedback fp.txt --output-dir outputs/fixed

Outputs in training.output_dir: training.log, training_history.json, config.yaml (the resolved config),
checkpoints/{best_model,epoch_N,step_N}.pt and, when evaluation runs, the evaluation reports. The first
pass parses every data file once into a token cache (lazy_loading.cache_dir); later epochs, runs,
resumes and the evaluation read that.

--update CHECKPOINT --feedback FILE: learning from feedback. Sessions an operator marked normal (JSON lines
of sessions, DeepLog text, or detect.py's output lines) fine-tune the model for a few epochs (update:
section of the config) together with a replay sample of its own training data; its records of which event
types occur together take them in; its thresholds are fitted again as after training. The result goes to a
new folder, by default PARENT_RUN/update-TIME/checkpoints/best_model.pt, recording its parent and the
feedback; the parent is never written, so rollback is pointing detection back at it (feedback.py).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import evaluate
import feedback
import utils
from batches import CachedSessions
from cache import build_caches, cache_settings, default_cache_dir
from calibration import CalibrationError
from checkpoint import CheckpointError, TrainState, load_checkpoint, pair_table
from config import Config, load_config, reader_options, save_config
from dataset import IJSON_BACKEND, SPLIT_SCHEME, DataError, SessionDataset, batch_to_device, merge_counts
from model import DeepLog
from rules import MAX_EVENT_PAIRS, MAX_EVENT_SETS, CoOccurrence
from runtime import (
    GPUMonitor,
    LossWindow,
    Runtime,
    all_gather,
    all_reduce_sum,
    amp_settings,
    leave_group,
    lockstep,
    seed_everything,
    set_rng_state,
    setup_runtime,
    stop_requested,
)
from tokens import IGNORE_INDEX


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml; "
                        "missing keys take the defaults in config.py)")
    parser.add_argument("--data-dir", help="training data, a directory or a file (data.preprocessed_dir)")
    parser.add_argument("--epochs", type=int, help="number of epochs (training.epochs; with --update: "
                                                   "update.epochs)")
    parser.add_argument("--batch-size", type=int, help="global batch size, split across GPUs "
                                                       "(training.batch_size)")
    parser.add_argument("--lr", type=float, help="peak learning rate (training.learning_rate; with --update: "
                                                 "update.learning_rate)")
    parser.add_argument("--resume", help="checkpoint to continue from exactly (model, optimizer, data "
                                         "position, RNG)")
    parser.add_argument("--output-dir", help="where logs, checkpoints and reports go (training.output_dir)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (training.device)")
    parser.add_argument("--seed", type=int, help="seed for weights, split, shuffling and dropout "
                                                 "(training.seed)")
    parser.add_argument("--overwrite", action="store_true", help="train into an output directory that holds "
                        "another run's files: move them to OUTPUT_DIR/previous_runs/RUN_ID first")
    parser.add_argument("--update", metavar="CHECKPOINT", help="learn from feedback: fine-tune this "
                        "trained model on the sessions of --feedback (into a new folder; the checkpoint "
                        "itself is never written)")
    parser.add_argument("--feedback", metavar="FILE", help="with --update: sessions marked normal (JSON "
                        "lines, DeepLog text, or detect.py's output lines)")
    parser.add_argument("--parser-state", metavar="FILE", help="with --update: the parser_state.json of the "
                        "preprocess.py run that parsed the feedback's logs, naming the event types new to "
                        "the model that it holds (default: the one beside --feedback); the vocabulary grows "
                        "to hold them")
    args = parser.parse_args(argv)
    if bool(args.update) != bool(args.feedback):
        parser.error("--update CHECKPOINT and --feedback FILE go together")
    if args.parser_state and not args.update:
        parser.error("--parser-state names the new event types of --update's feedback: give --update too")
    if args.update and (args.resume or args.overwrite):
        parser.error("--update writes a new folder of its own: no --resume, no --overwrite")
    return args


def resolve_config(args) -> Config:
    config_path = args.config if (args.config != "config.yaml" or Path(args.config).exists()) else None
    return load_config(config_path, {
        "data.preprocessed_dir": args.data_dir, "training.epochs": args.epochs,
        "training.batch_size": args.batch_size, "training.learning_rate": args.lr,
        "training.output_dir": args.output_dir, "training.device": args.device, "training.seed": args.seed})


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    train: SessionDataset | CachedSessions
    val: SessionDataset | CachedSessions
    steps_per_epoch: int
    seen_targets: list | None   # target IDs that occur in training (None: not counted)
    event_sets: list | None     # sets of event types that co-occur in a normal training session
    event_pairs: object         # pairs of event types that share one (sorted codes, numpy), or None


def prepare_data(config: Config, runtime: Runtime, rank_batch_size: int, logger) -> Data:
    """The first pass (token caches, or a streaming count), then the training and validation datasets.
    Every record is validated before the first step, so bad data fails before any checkpoint exists."""
    data, loading, seed = config.data, config.lazy_loading, config.training.seed
    common = dict(max_seq_length=data.max_seq_length, window_context=data.window_context, seed=seed,
                  rank=runtime.rank, world_size=runtime.world_size)
    if loading.cache:
        cache_dir = loading.cache_dir or default_cache_dir()
        settings = cache_settings(config, config.model.vocab_size)
        def build():
            return build_caches(data.preprocessed_dir, settings, cache_dir, loading.cache_workers, logger)

        # One builder per machine, with all its cores; the other ranks wait, then find the caches built
        # (or, when cache_dir is not shared between machines, build the ones their machine lacks). Bad data
        # found by a builder is every rank's error, so that all of them stop with the same message.
        entries, error = None, None
        if runtime.local_rank == 0:
            try:
                entries = build()
            except DataError as found:
                error = str(found)
        errors = [e for e in all_gather(error, runtime) if e]
        if errors:
            raise DataError(errors[0])
        entries = entries or build()
        train = CachedSessions(entries, config.model.vocab_size, "train", shuffle=loading.shuffle_buffer,
                               buffer_size=loading.buffer_size, lazy=loading.enabled,
                               length_bucketing=loading.length_bucketing, **common)
        val = CachedSessions(entries, config.model.vocab_size, "val", shuffle=False,
                             buffer_size=loading.buffer_size, lazy=loading.enabled, **common)
        counted = train.count()
        windows_per_rank = train.windows_per_rank()
        if data.samples_per_epoch:
            logger.info("data.samples_per_epoch is not used with the token cache: the first pass counts "
                        "exactly")
    elif data.samples_per_epoch:
        counted = {"windows": data.samples_per_epoch, "seen_targets": None, "event_sets": None,
                   "event_pairs": None}
        windows_per_rank = data.samples_per_epoch // runtime.world_size  # lockstep keeps ranks together
        logger.info(f"Training samples per epoch (from data.samples_per_epoch): {data.samples_per_epoch}; no "
                    f"counting pass, so no record of which events occur in training, nor together")
    else:
        counting = _streaming_dataset(config, "train", runtime, common)
        counted = merge_counts(all_gather(counting.count(), runtime), disjoint=counting.shard_by_file)
        windows_per_rank = counted["windows_per_rank"]
    if "sessions" in counted:
        logger.info(f"Training data {data.preprocessed_dir}: {counted['sessions']} normal sessions -> "
                    f"{counted['windows']} windows, {counted['tokens']} predicted events | skipped: "
                    f"{counted['abnormal_skipped']} abnormal, {counted['bad_records']} bad records")
        if counted["event_sets"] is None:
            logger.warning(f"More than {MAX_EVENT_SETS:,} distinct sets of event types in the training data: "
                           "too varied for the event_set rule, which is off for this model")
        if counted["event_pairs"] is None:
            logger.warning(f"More than {MAX_EVENT_PAIRS:,} distinct pairs of event types sharing a session "
                           "in the training data: the event_pair rule is off for this model")
        if counted["bad_records"]:
            logger.warning("Skipped bad records (data.skip_bad_records): first was "
                           f"{counted['first_bad_record']}")
    if counted["windows"] == 0:
        raise DataError(f"{data.preprocessed_dir}: no normal training sessions (after the "
                        f"{data.validation_split:.0%} validation split)")
    if runtime.distributed and windows_per_rank == 0:
        raise DataError(f"{data.preprocessed_dir}: some of the {runtime.world_size} ranks get no training "
                        f"windows; use fewer ranks, more data, or (without the cache) more data files")
    if not loading.cache:
        # Every rank runs the same number of steps, otherwise DDP's gradient all-reduce waits forever.
        samples_per_rank = windows_per_rank if runtime.distributed else None
        train = _streaming_dataset(config, "train", runtime, common, samples_per_rank, loading.shuffle_buffer)
        val = _streaming_dataset(config, "val", runtime, common)
    steps = math.ceil((windows_per_rank if runtime.distributed else counted["windows"]) / rank_batch_size)
    return Data(train, val, steps, counted["seen_targets"], counted["event_sets"], counted["event_pairs"])


def _streaming_dataset(config, split, runtime, common, samples_per_rank=None,
                       shuffle=False) -> SessionDataset:
    data = config.data
    return SessionDataset(data.preprocessed_dir, config.model.vocab_size, split=split,
                          validation_split=data.validation_split, overlap=data.overlap, shuffle=shuffle,
                          buffer_size=config.lazy_loading.buffer_size, samples_per_rank=samples_per_rank,
                          num_workers=config.lazy_loading.num_workers, **common,
                          **reader_options(config))


# ----------------------------------------------------------------------------- steps
def token_loss_sum(model, batch, device, amp_dtype):
    """Summed cross-entropy over real targets (padding and context positions are ignored) and their count."""
    input_ids, targets = batch_to_device(batch, device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_ids)
    # The loss is computed in fp32 whatever the autocast dtype: log-softmax in half precision loses accuracy.
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def train_step(state: TrainState, model, batch, runtime, amp_dtype, max_grad_norm: float):
    """One optimizer step; returns the batch's summed loss and token count (still on the device)."""
    loss_sum, tokens = token_loss_sum(model, batch, runtime.device, amp_dtype)
    # Mean over this batch's real tokens. Under DDP, gradients are averaged over ranks, so ranks with
    # more tokens weigh the same as ranks with fewer: a small, accepted bias.
    loss = loss_sum / tokens.clamp(min=1)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if max_grad_norm > 0:
        # LSTMs are prone to exploding gradients on long sessions; clip the global norm.
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    return loss_sum.detach(), tokens


@torch.no_grad()
def evaluate_loss(model, dataset, batch_size, runtime, amp_dtype) -> tuple[float, int]:
    """Token-weighted mean validation loss over all ranks, and the token count."""
    model.eval()
    loss_total = torch.zeros((), device=runtime.device, dtype=torch.float64)
    tokens = torch.zeros((), device=runtime.device, dtype=torch.long)
    for batch, _ in dataset.batches(batch_size):
        loss_sum, count = token_loss_sum(model, batch, runtime.device, amp_dtype)
        loss_total += loss_sum
        tokens += count
    model.train()
    loss_total, token_count = all_reduce_sum([loss_total.item(), tokens.item()], runtime)
    return (loss_total / token_count if token_count else math.nan), int(token_count)


SETTLED_INTERVALS = 3   # log intervals since the first step line before the ETA is given as settled


class TimeLeft:
    """The step lines' ETA: from the pace since the first step line, so that the start (imports, the first
    reads of the cache, the first steps' allocations, a machine busy at first) stops weighing on it; given as
    rough ("~12m, settling") until SETTLED_INTERVALS log intervals have passed since. The first line's is the
    pace since the run started, the only one known then."""

    def __init__(self, started: float, interval: int):
        self.started, self.interval, self.first = started, interval, None   # first: (time, steps) logged

    def text(self, now: float, steps_this_run: int, steps_left: int) -> str:
        if self.first is None:
            self.first = (now, steps_this_run)
            pace, settled = (now - self.started) / max(steps_this_run, 1), False
        else:
            since, steps = self.first
            pace = (now - since) / max(steps_this_run - steps, 1)
            settled = steps_this_run - steps >= SETTLED_INTERVALS * self.interval
        eta = utils.format_duration(pace * steps_left)
        return eta if settled else f"~{eta}, settling"


def step_line(state: TrainState, last_loss, elapsed: float, eta: str, gpu_monitor,
              throughput: utils.Throughput) -> str:
    average = state.epoch_loss_sum / max(state.epoch_tokens, 1)
    fields = [f"[Step {state.step}] Loss: {last_loss:.4f} (avg: {average:.4f})",
              f"LR: {state.scheduler.get_last_lr()[0]:.2e}", throughput.fields()]
    gpu_field = gpu_monitor.summary() if gpu_monitor else None
    if gpu_field:
        fields.append(gpu_field)
    fields.append(f"Time: {utils.format_duration(elapsed)} (ETA: {eta})")
    return " | ".join(fields)


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    args = parse_args(argv)
    logger = logging.getLogger("deeplog")
    work = update if args.update else train
    return utils.exit_on_user_error(lambda: work(args, logger), logger)


def resume_defaults(config: Config, stored: dict, args) -> list[str]:
    """On --resume the checkpoint's output_dir and data settings are the defaults (flags still win), so that
    following a stop message continues that run, where it was, on its data. Returns what this changed."""
    changed = []
    wanted = {("training", "output_dir"): None if args.output_dir else stored["training"]["output_dir"]}
    wanted.update({("data", key): value for key, value in stored["data"].items()
                   if not (key == "preprocessed_dir" and args.data_dir)})
    for (section, key), value in wanted.items():
        current = getattr(getattr(config, section), key)
        if value is not None and value != current:
            changed.append(f"{section}.{key} {current!r} -> {value!r}")
            setattr(getattr(config, section), key, value)
    return changed


def train(args, logger):
    # before any work: a signal during the first pass stops it at once, its workers and temp files with it
    stop_signal = utils.StopSignal(raise_now=True)
    config = resolve_config(args)
    # read and validated before anything is built
    checkpoint = load_checkpoint(args.resume, for_resume=True) if args.resume else None
    from_checkpoint = resume_defaults(config, checkpoint["config"], args) if checkpoint is not None else []
    if checkpoint is not None:
        check_not_finished(checkpoint, config, args.resume)
    tc = config.training
    runtime = setup_runtime(tc.device, tc.use_multi_gpu)
    output_dir = Path(tc.output_dir)
    utils.setup_logger(None, runtime.is_master, logger=logger)   # the console only, until the folder is ours
    run = claim_output(output_dir, checkpoint, args, runtime, logger)
    utils.setup_logger(str(output_dir), runtime.is_master, logger=logger)
    if run is not None:
        logger.info(f"Run {run.run_id} in {output_dir}")
        if run.moved_aside:
            logger.warning(f"--overwrite: the files of the run that was in {output_dir} moved to "
                           f"{run.moved_aside}")
    if from_checkpoint:
        logger.info("Resuming with the checkpoint's settings where no flag gives them: "
                    f"{', '.join(from_checkpoint)}")
    if checkpoint is not None:
        check_resumable(checkpoint, config, args.resume, logger)
    seed_everything(tc.seed)
    logger.info(f"Device: {runtime.device} | processes: {runtime.world_size} | DataParallel GPUs: "
                f"{runtime.data_parallel_gpus} | ijson backend: {IJSON_BACKEND} | torch {torch.__version__}")

    # ---------------------------------------------------------------- data: the first pass
    if tc.batch_size % (runtime.world_size * runtime.data_parallel_gpus):
        logger.warning(f"batch_size {tc.batch_size} is not a multiple of the {runtime.world_size} ranks x "
                       f"{runtime.data_parallel_gpus} GPUs; per-GPU batches differ by one sample")
    rank_batch_size = max(1, tc.batch_size // runtime.world_size)
    try:
        data = prepare_data(config, runtime, rank_batch_size, logger)
    except utils.Stopped as signal_name:
        raise utils.Interrupted(f"{signal_name} during the first pass (reading the data, building its token "
                                f"cache): no checkpoint was written and no partial cache entry is left; run "
                                f"the same command again", stop_signal.exit_code) from None
    if runtime.is_master:  # only now: a run that fails on its data leaves the previous run's config alone
        save_config(config, output_dir / "config.yaml")

    # ---------------------------------------------------------------- model, optimizer, schedule, precision
    state, model, amp_dtype = build_training(config, data, runtime, logger)
    state.run = run
    if checkpoint is not None:
        resume(state, checkpoint, args.resume, runtime, logger)

    # ---------------------------------------------------------------- the loop, then the evaluation
    stop_signal.raise_now = False   # in the loop: stop at the next step, with a resumable checkpoint
    run_start = time.time()
    stopped = run_epochs(state, model, data, runtime, amp_dtype, rank_batch_size, stop_signal, logger)
    if stopped is not None:
        return stopped
    best = output_dir / "checkpoints" / "best_model.pt"
    logger.info(f"Training finished in {utils.format_duration(time.time() - run_start)} | best loss "
                f"{state.early_stopping.best_loss:.4f}{' (early stop)' if state.stopped_early else ''} | "
                f"best model: {best}")
    warn_if_nothing_learned(state.early_stopping.best_loss, data.seen_targets, logger)
    if run is not None:
        run.finish()
    leave_group(runtime)   # every rank together, before the master's single-process evaluation
    stop_signal.raise_now = True  # from here a signal stops the evaluation at once
    if tc.evaluate_after_training and runtime.is_master and best.exists():
        return evaluate_after_training(best, config, stop_signal, logger)
    return 0


def warn_if_nothing_learned(best_loss: float, seen_targets: list | None, logger) -> None:
    """A model whose loss stayed near a uniform guess predicts nothing: say so (evaluate.learned_little)."""
    message = evaluate.learned_little(best_loss, len(seen_targets or ()), "best loss")
    if message:
        logger.warning(message)


def update(args, logger) -> int:
    """--update: fine-tune a trained model on sessions an operator marked normal, with a replay sample of
    its training data; join its records of event types seen together with them; fit its thresholds again;
    write the new checkpoint, complete and once, into a folder of its own (feedback.py holds the plumbing).
    The parent is only read: rollback is pointing detection back at it."""
    stop_signal = utils.StopSignal(raise_now=True)   # until the checkpoint is written, a signal stops at once
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise utils.ConfigError("--update runs in one process: start it with python, not torchrun")
    # everything read and checked before the new folder exists: bad feedback leaves nothing behind
    parent = feedback.Parent.load(args.update)
    config = feedback.update_config(parent, args)
    found = feedback.read_feedback(args.feedback, config.model.vocab_size, reader_options(config))
    new = feedback.new_events(found, config.model.vocab_size, args.parser_state)
    config.model.vocab_size = new.vocab_size   # the token layout (cache, windows) of the grown model
    tc, uc, output_dir = config.training, config.update, Path(config.training.output_dir)
    utils.setup_logger(None, logger=logger)
    run = feedback.claim_output(output_dir, logger)
    utils.setup_logger(str(output_dir), logger=logger)
    logger.info(f"Update {run.run_id} in {output_dir} of {parent.describe()} | feedback {found.path}: "
                f"{len(found.sessions)} sessions to learn as normal{found.skipped_text()}")
    seed_everything(tc.seed)
    runtime = setup_runtime(tc.device, use_multi_gpu=False)
    try:
        data = prepare_data(config, runtime, tc.batch_size, logger)   # the token cache: replay and validation
        replay = feedback.replay_sample(config, logger)
    except utils.Stopped as signal_name:
        raise utils.Interrupted(f"{signal_name} while reading the training data: nothing was written; run "
                                f"the same command again", stop_signal.exit_code) from None

    model = DeepLog(**parent.checkpoint["model_args"])
    model.load_state_dict(parent.checkpoint["model_state_dict"])
    model = feedback.grown_for(model, new, logger)
    new_events = feedback.mark_seen(model, found.sessions)
    model.set_windows(config.data.max_seq_length, config.data.window_context).to(runtime.device)
    windows = feedback.update_windows(found.sessions, replay, config)
    state, amp_dtype = feedback.update_state(model, config, len(windows), runtime)
    state.run = run
    logger.info(feedback.plan_line(found, replay, windows, state, parent, new_events))
    started = time.time()
    records = {**parent.checkpoint, "model_args": model.model_args}   # joined with the feedback in this copy
    co_occurrence = feedback.join_records(records, found.sessions, config, logger)
    swept = (parent.checkpoint.get("calibration") or {}).get("training_sweep")   # the parent's records
    # The update checks itself: while fed-back sessions are still flagged, another round of update.epochs
    # epochs with a fresh schedule at ROUND_LR_FACTOR times the last one's learning rate (the replayed
    # sessions keep what the model knew), at most UPDATE_ROUNDS rounds in all; the log says how it ended.
    for round_number in range(1, UPDATE_ROUNDS + 1):
        first = (round_number - 1) * uc.epochs
        for epoch in range(first + 1, first + uc.epochs + 1):
            update_epoch(state, model, data, windows, runtime, amp_dtype, epoch, first + uc.epochs, logger)
        model.eval()
        calibration, normal, abnormal = feedback.recalibrate(model, co_occurrence, config, logger, swept)
        still = feedback.still_flagged(model, calibration, co_occurrence, found.sessions,
                                       config.evaluation.decision_rule)
        if not still or round_number == UPDATE_ROUNDS:
            break
        scale = ROUND_LR_FACTOR ** round_number
        logger.info(f"Self-check: {len(still)} of {len(found.sessions)} fed-back sessions still flagged "
                    f"(e.g. {found.session_ids[still[0]]}): another round of {uc.epochs} update epochs at "
                    f"learning rate {uc.learning_rate * scale:g}")
        history = state.history
        state, amp_dtype = feedback.update_state(model, config, len(windows), runtime, scale)
        state.history, state.run = history, run
    logger.info(f"Update finished in {utils.format_duration(time.time() - started)} ({round_number} "
                f"round(s)); the parent's training took {parent.training_time()}")
    logger.log(logging.WARNING if still else logging.INFO, feedback.self_check_line(still, found, uc))
    best = output_dir / "checkpoints" / "best_model.pt"
    save_config(config, output_dir / "config.yaml")
    utils.save_json(output_dir / "training_history.json", state.history)
    feedback.save_updated(state, records, parent, found, len(replay), calibration, best, new, logger)
    logger.info(f"Updated model: {best} | parent {parent.path} {parent.still_unchanged()}: rollback is "
                f"pointing detection back at it")
    try:
        feedback.evaluate_update(model, best, calibration, normal, abnormal, co_occurrence, config, logger)
    except utils.Stopped as signal_name:
        logger.info(f"Stopped by {signal_name} during the evaluation after the update; {best} is complete")
        return stop_signal.exit_code
    return 0


UPDATE_ROUNDS = 5     # rounds of update.epochs an update may take before it says what is still flagged
ROUND_LR_FACTOR = 3   # each round after the first at this many times the learning rate of the one before


def update_epoch(state: TrainState, model, data: Data, windows: list, runtime, amp_dtype, epoch: int,
                 planned: int, logger) -> None:
    """One epoch of an update over its windows (feedback and replay), then the validation loss on the
    parent's validation split: how much of what it knew the model kept."""
    config = state.config
    tc = config.training
    state.start_epoch(epoch)
    started = time.time()
    window = LossWindow(runtime.device)
    model.train()
    for batch in feedback.epoch_batches(windows, tc.batch_size, tc.seed, epoch, model.pad_id):
        window.add(*train_step(state, model, batch, runtime, amp_dtype, tc.max_grad_norm))
    window.flush_into(state)
    train_loss = state.epoch_loss_sum / max(state.epoch_tokens, 1)
    val_loss, val_tokens = evaluate_loss(model, data.val, tc.batch_size, runtime, amp_dtype)
    state.early_stopping.step(val_loss if val_tokens else train_loss)
    learning_rate = state.scheduler.get_last_lr()[0]
    for key, value in (("epoch", epoch), ("train_loss", train_loss),
                       ("val_loss", val_loss if val_tokens else None), ("learning_rate", learning_rate),
                       ("epoch_time", time.time() - started)):
        state.history[key].append(value)
    logger.info(f"Update epoch {epoch}/{planned} | train loss {train_loss:.4f} (feedback and "
                f"replay) | val loss {val_loss:.4f} ({val_tokens} events of the parent's validation split) | "
                f"LR {learning_rate:.2e} | time {utils.format_duration(time.time() - started)}")
    state.start_epoch(epoch + 1)


def claim_output(output_dir: Path, checkpoint: dict | None, args, runtime: Runtime, logger):
    """One run per output directory, and one run's files in it: the lock (no two runs at once) and the run
    record (no new run over another's checkpoints, unless --overwrite moves them aside). Master only; a
    refusal stops every rank with the same message."""
    run, error = None, None
    if runtime.is_master:
        try:
            atexit.register(utils.OutputLock(output_dir, logger).release)
            utils.remove_stale_temp_files(output_dir)   # what a killed run left half-written
            run = utils.RunRecord.claim(output_dir, checkpoint, args.resume, args.overwrite)
        except utils.ConfigError as refused:
            error = str(refused)
    errors = [e for e in all_gather(error, runtime) if e]
    if errors:
        raise utils.ConfigError(errors[0])
    return run


def check_not_finished(checkpoint: dict, config: Config, resume_path: str) -> None:
    """A checkpoint at the end of its run (past the last epoch, or early stopping said stop) has nothing left
    to train: say so, and the ways on, instead of a run that trains nothing."""
    epoch, epochs = checkpoint["data_position"]["epoch"], config.training.epochs
    stopping = checkpoint["early_stopping"]
    stopped = config.early_stopping.enabled and stopping["bad_epochs"] >= config.early_stopping.patience
    if epoch <= epochs and not stopped:
        return
    best = Path(resume_path).parent / "best_model.pt"
    why = (f"early stopping ended it (no val-loss improvement for {stopping['bad_epochs']} epochs)"
           if stopped else
           f"it trained all {epochs} epochs; to train longer, resume with --epochs above {epochs}")
    raise utils.ConfigError(f"{resume_path}: its run is finished, nothing is left to resume: {why}. To "
                            f"evaluate it: python evaluate.py --checkpoint {best}; to train anew in its "
                            "folder, run without --resume and pass --overwrite")


def check_resumable(checkpoint: dict, config: Config, resume_path: str, logger) -> None:
    if checkpoint.get("split_scheme") != SPLIT_SCHEME:
        logger.warning(f"{resume_path} was written with an earlier validation split: the sessions held out "
                       "now differ from those held out before the stop")
    if checkpoint["model_args"] != vars(config.model):
        differing = {k: (v, vars(config.model).get(k)) for k, v in checkpoint["model_args"].items()
                     if vars(config.model).get(k) != v}
        raise CheckpointError(f"{resume_path}: the model differs from the config's "
                                    + ", ".join(f"{k} {old} vs {new}" for k, (old, new) in differing.items()))


def build_training(config: Config, data: Data, runtime: Runtime, logger):
    """The model (wrapped for DDP or DataParallel), optimizer, LR schedule, precision and early stopping,
    in one TrainState; returns it, the model to call and the autocast dtype."""
    tc = config.training
    raw_model = DeepLog(**vars(config.model))
    if data.seen_targets is not None:  # events absent from training data are misses at detection time
        raw_model.seen_events.zero_()[data.seen_targets] = True
    raw_model.to(runtime.device)
    model = raw_model
    if runtime.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    elif runtime.data_parallel_gpus > 1:
        model = torch.nn.DataParallel(raw_model)  # splits each batch across the visible GPUs
    optimizer_class = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(raw_model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    total_steps = data.steps_per_epoch * tc.epochs
    warmup = utils.warmup_steps(tc.warmup_steps, total_steps)
    if warmup >= total_steps:
        logger.warning(f"training.warmup_steps {warmup} >= the run's {total_steps} steps: the learning rate "
                       "never reaches training.learning_rate; lower warmup_steps (or leave it null: scaled "
                       "to the run)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, utils.lr_multiplier(warmup, total_steps, tc.lr_schedule, tc.min_lr_ratio))
    amp_dtype, use_loss_scaling = amp_settings(config, runtime.device)
    # Enabled only for fp16: bf16 and fp32 share the same code path with a pass-through scaler.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=use_loss_scaling)
    early_stopping = utils.EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta)
    state = TrainState(raw_model, optimizer, scheduler, scaler, early_stopping, config)
    state.event_sets = data.event_sets if config.evaluation.event_set_rule else None
    pairs = data.event_pairs if config.evaluation.event_pair_rule else None
    state.event_pairs = pair_table(CoOccurrence(config.model.vocab_size, pairs=pairs))  # an [n, 2] tensor
    state.data_order = {"batch_size": tc.batch_size, "world_size": runtime.world_size, "seed": tc.seed,
                        **{f"data.{k}": getattr(config.data, k)
                           for k in ("validation_split", "max_seq_length", "window_context")},
                        **{f"lazy_loading.{k}": getattr(config.lazy_loading, k)
                           for k in ("cache", "buffer_size", "shuffle_buffer", "length_bucketing",
                                     "num_workers")}}
    state.total_steps = total_steps
    logger.info(f"Model: {sum(p.numel() for p in raw_model.parameters()):,} parameters {vars(config.model)} "
                f"| precision: {amp_dtype or torch.float32}{' + GradScaler' if use_loss_scaling else ''} | "
                f"{data.steps_per_epoch} steps/epoch x {tc.epochs} epochs, batch {tc.batch_size}, warm-up "
                f"{warmup} steps{'' if tc.warmup_steps is not None else ' (scaled to the run)'}")
    return state, model, amp_dtype


def resume(state: TrainState, checkpoint: dict, resume_path: str, runtime: Runtime,
           logger) -> None:
    """Everything the checkpoint saved, this rank's RNG states included: the run continues bit-exactly
    under the same settings."""
    try:
        order, rng_states = dict(state.data_order), state.load_state_dict(checkpoint)
    except CheckpointError as error:
        raise CheckpointError(f"{resume_path}: {error}") from None
    saved_order = checkpoint["data_position"].get("order", {})
    changed = [f"{k} {saved_order[k]} -> {v}" for k, v in order.items()
               if k in saved_order and saved_order[k] != v]
    if changed:
        logger.warning(f"Resuming with other settings than the checkpoint's ({', '.join(changed)}): the "
                       "batch order differs, so training continues, but not bit-exactly")
    set_rng_state(rng_states[runtime.rank % len(rng_states)])
    logger.info(f"Resumed from {resume_path}: epoch {state.epoch}, batch {state.batches_done}, step "
                f"{state.step}")


EXPECTATION_STEPS = 10   # steps timed before the run states what an epoch will cost


def log_expected_time(elapsed: float, first: int, last: int, steps_per_epoch: int, steps_left: int,
                      logger) -> None:
    per_step = elapsed / (last - first + 1)
    logger.info(f"Expected time: {utils.format_duration(per_step * steps_per_epoch)} per epoch, "
                f"{utils.format_duration(per_step * steps_left)} for the rest of the run (steps "
                f"{first}-{last} timed on this hardware, {per_step * 1000:.0f} ms a step; the step lines' "
                "ETA follows the pace)")


def run_epochs(state: TrainState, model, data: Data, runtime, amp_dtype, rank_batch_size: int,
               stop_signal: utils.StopSignal, logger) -> int | None:
    """The training loop, from where the state is to the last epoch or an early stop; a stop signal saves a
    step checkpoint and returns the exit code (None: training ran to its end)."""
    tc = state.config.training
    checkpoint_dir = Path(tc.output_dir) / "checkpoints"
    gpu_monitor = GPUMonitor(logger) if runtime.is_master else None
    run_start, steps_this_run = time.time(), 0
    time_left, first_step_done = TimeLeft(run_start, tc.log_every_steps), None
    window = LossWindow(runtime.device)
    model.train()
    for epoch in range(state.epoch, tc.epochs + 1):
        state.start_epoch(epoch)
        data.train.set_epoch(epoch)
        epoch_start = time.time() - state.epoch_time
        # A bar only on a terminal: under nohup or screen logs, plain lines stay readable.
        progress = tqdm(total=data.steps_per_epoch, initial=state.batches_done, desc=f"epoch {epoch}",
                        leave=False, disable=not (runtime.is_master and sys.stderr.isatty()))
        batches = utils.Throughput(lockstep(data.train.batches(rank_batch_size, state.batches_done),
                                                  runtime))
        with logging_redirect_tqdm([logger]) if not progress.disable else contextlib.nullcontext():
            for batch, state.batches_done in batches:  # the loader's position goes into the checkpoint
                loss_sum, tokens = train_step(state, model, batch, runtime, amp_dtype, tc.max_grad_norm)
                window.add(loss_sum, tokens)
                steps_this_run += 1
                progress.update(1)
                first_step_done = first_step_done or (time.time(), steps_this_run)
                if steps_this_run == min(EXPECTATION_STEPS, data.steps_per_epoch, state.total_steps):
                    # timed from the end of the first step: its one-off set-up would inflate every estimate
                    since, first = first_step_done if steps_this_run > 1 else (run_start, 0)
                    log_expected_time(time.time() - since, first + 1, steps_this_run, data.steps_per_epoch,
                                      state.total_steps - state.step, logger)
                if state.step % tc.log_every_steps == 0:
                    # this rank's tokens x ranks: the ranks' batches are alike in size
                    batches.tokens += window.flush_into(state) * runtime.world_size
                    last_loss = (loss_sum / tokens.clamp(min=1)).item()
                    now = time.time()
                    eta = time_left.text(now, steps_this_run, state.total_steps - state.step)
                    logger.info(step_line(state, last_loss, now - run_start, eta, gpu_monitor, batches))
                if gpu_monitor and gpu_monitor.handles and state.step % tc.gpu_stats_every_steps == 0:
                    for line in gpu_monitor.details():
                        logger.info(line)
                if tc.save_every_steps and state.step % tc.save_every_steps == 0:
                    batches.tokens += window.flush_into(state) * runtime.world_size
                    state.epoch_time = time.time() - epoch_start
                    state.save(checkpoint_dir / f"step_{state.step}.pt", runtime)
                    state.prune("step", tc.keep_last_checkpoints)
                if stop_requested(stop_signal, runtime, state.step, tc.log_every_steps):
                    window.flush_into(state)
                    state.epoch_time = time.time() - epoch_start
                    path = checkpoint_dir / f"step_{state.step}.pt"
                    state.save(path, runtime)
                    logger.info(f"Stopped by {stop_signal.received or 'a signal on another rank'} at step "
                                f"{state.step}: continue with --resume {path}")
                    progress.close()
                    return stop_signal.exit_code or 143
        progress.close()
        window.flush_into(state)
        if end_of_epoch(state, model, data, runtime, amp_dtype, rank_batch_size, time.time() - epoch_start,
                        Path(tc.output_dir), logger):
            state.stopped_early = True
            break
    return None


def evaluate_after_training(best: Path, config: Config, stop_signal: utils.StopSignal, logger) -> int:
    """Calibrate and evaluate the best model; a stop signal or data too small to calibrate on skip it with
    a line saying how to run it later, and only the signal makes the run's exit code non-zero."""
    later = f"python evaluate.py --checkpoint {best}"
    try:
        if stop_signal.received:
            raise utils.Stopped(stop_signal.received)
        evaluate.after_training(best, config, logger)
    except utils.Stopped as signal_name:
        logger.info(f"Stopped by {signal_name} before the evaluation after training ended; the checkpoints "
                    f"are complete; evaluate with: {later}")
        return stop_signal.exit_code
    except (DataError, CalibrationError) as error:   # too few normal sessions to fit thresholds on
        logger.warning(f"Evaluation after training skipped: {error}. With more normal sessions in the "
                       f"validation split (data.validation_split), or others via --calibrate-on: {later}")
    return 0


def end_of_epoch(state: TrainState, model, data: Data, runtime, amp_dtype, rank_batch_size: int,
                 epoch_time: float, output_dir: Path, logger) -> bool:
    """Validate, record the epoch, write the epoch and best checkpoints; True when early stopping says
    stop."""
    config, epoch = state.config, state.epoch
    train_loss_sum, train_tokens = all_reduce_sum([state.epoch_loss_sum, state.epoch_tokens], runtime)
    train_loss = train_loss_sum / max(train_tokens, 1)
    val_loss, val_tokens = evaluate_loss(state.model, data.val, rank_batch_size, runtime, amp_dtype)
    # Without a validation split (tiny data), model selection falls back to the training loss.
    is_best = state.early_stopping.step(val_loss if val_tokens else train_loss)
    learning_rate = state.scheduler.get_last_lr()[0]
    for key, value in (("epoch", epoch), ("train_loss", train_loss),
                       ("val_loss", val_loss if val_tokens else None), ("learning_rate", learning_rate),
                       ("epoch_time", epoch_time)):
        state.history[key].append(value)
    logger.info(f"Epoch {epoch}/{config.training.epochs} | train loss {train_loss:.4f} | val loss "
                f"{val_loss:.4f} ({val_tokens} events) | LR {learning_rate:.2e} | time "
                f"{utils.format_duration(epoch_time)}{' | new best' if is_best else ''}")
    if runtime.is_master:
        utils.save_json(output_dir / "training_history.json", state.history)
    # Saved as "the next epoch, batch 0": resuming from an epoch checkpoint starts the next epoch.
    state.start_epoch(epoch + 1)
    checkpoint_dir = output_dir / "checkpoints"
    if config.training.save_every_epoch:
        state.save(checkpoint_dir / f"epoch_{epoch}.pt", runtime)
        state.prune("epoch", config.training.keep_last_checkpoints)
    if is_best:
        state.save(checkpoint_dir / "best_model.pt", runtime)
    if config.early_stopping.enabled and state.early_stopping.should_stop:
        logger.info(f"Early stopping: no val-loss improvement > {config.early_stopping.min_delta} "
                    f"for {state.early_stopping.patience} epochs")
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
