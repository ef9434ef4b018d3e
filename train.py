"""Train DeepLog on parsed log sessions, then evaluate the best model.

Examples:

    python train.py                                   # the shipped sample, CPU, under 2 minutes
    python train.py --config config.yaml --data-dir /data/sessions --epochs 20 --batch-size 256 --lr 1e-3
    python train.py --resume outputs/checkpoints/step_1000.pt     # continue exactly where it stopped
    nohup python train.py --data-dir /data/sessions > train.out 2>&1 &   # plain log lines, no bar
    kill PID      # SIGTERM: saves checkpoints/step_N.pt at the next step, exits 143; then --resume it
    torchrun --standalone --nproc_per_node=4 train.py --data-dir /data/sessions   # DistributedDataParallel
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...

Outputs in training.output_dir: training.log, training_history.json, config.yaml (the resolved config),
checkpoints/{best_model,epoch_N,step_N}.pt and, when evaluation runs, the evaluation reports.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import utils
from dataset import IJSON_BACKEND, MAX_EVENT_SETS, DataError, SessionDataset, merge_counts
from model import IGNORE_INDEX, DeepLog


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml; "
                        "missing keys take the defaults in utils.py)")
    parser.add_argument("--data-dir", help="training data, a directory or a file (data.preprocessed_dir)")
    parser.add_argument("--epochs", type=int, help="number of epochs (training.epochs)")
    parser.add_argument("--batch-size", type=int, help="global batch size, split across GPUs (training.batch_size)")
    parser.add_argument("--lr", type=float, help="peak learning rate (training.learning_rate)")
    parser.add_argument("--resume", help="checkpoint to continue from exactly (model, optimizer, data position, RNG)")
    parser.add_argument("--output-dir", help="where logs, checkpoints and reports go (training.output_dir)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (training.device)")
    parser.add_argument("--seed", type=int, help="seed for weights, split, shuffling and dropout (training.seed)")
    return parser.parse_args(argv)


def resolve_config(args) -> utils.Config:
    config_path = args.config if (args.config != "config.yaml" or Path(args.config).exists()) else None
    return utils.load_config(config_path, {
        "data.preprocessed_dir": args.data_dir, "training.epochs": args.epochs,
        "training.batch_size": args.batch_size, "training.learning_rate": args.lr,
        "training.output_dir": args.output_dir, "training.device": args.device, "training.seed": args.seed})


def build_dataset(config: utils.Config, split: str, runtime: utils.Runtime, samples_per_rank=None, shuffle=False):
    data = config.data
    return SessionDataset(
        data.preprocessed_dir, config.model.vocab_size, split=split, validation_split=data.validation_split,
        seed=config.training.seed, max_seq_length=data.max_seq_length, window_context=data.window_context,
        shuffle=shuffle, buffer_size=config.lazy_loading.buffer_size, rank=runtime.rank,
        world_size=runtime.world_size, samples_per_rank=samples_per_rank, num_workers=config.lazy_loading.num_workers,
        event_ids_field=data.event_ids_field, label_field=data.label_field, session_id_field=data.session_id_field,
        json_array_key=data.json_array_key, skip_bad_records=data.skip_bad_records)


def token_loss_sum(model, batch, device, amp_dtype):
    """Summed cross-entropy over real targets (padding and context positions are ignored) and their count."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_ids)
    # The loss is computed in fp32 whatever the autocast dtype: log-softmax in half precision loses accuracy.
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


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
    loss_total, token_count = utils.all_reduce_sum([loss_total.item(), tokens.item()], runtime)
    return (loss_total / token_count if token_count else math.nan), int(token_count)


def main(argv=None):
    args = parse_args(argv)
    logger = logging.getLogger("deeplog")
    return utils.exit_on_user_error(lambda: train(args, logger), (*utils.USER_ERRORS, DataError), logger)


def train(args, logger):
    config = resolve_config(args)
    tc = config.training
    runtime = utils.setup_runtime(tc.device, tc.use_multi_gpu)
    output_dir = Path(tc.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    utils.setup_logger(str(output_dir), runtime.is_master, logger=logger)
    # ---------------------------------------------------------------- resume state (read before anything is built)
    checkpoint = utils.load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None and checkpoint["model_args"] != vars(config.model):
        differing = {k: (v, vars(config.model).get(k)) for k, v in checkpoint["model_args"].items()
                     if vars(config.model).get(k) != v}
        raise utils.CheckpointError(f"{args.resume}: the model differs from the config's "
                                    + ", ".join(f"{k} {old} vs {new}" for k, (old, new) in differing.items()))
    utils.seed_everything(tc.seed)
    if runtime.is_master:
        utils.save_config(config, output_dir / "config.yaml")
    logger.info(f"Device: {runtime.device} | processes: {runtime.world_size} | DataParallel GPUs: "
                f"{runtime.data_parallel_gpus} | ijson backend: {IJSON_BACKEND} | torch {torch.__version__}")

    # ---------------------------------------------------------------- data
    if tc.batch_size % (runtime.world_size * runtime.data_parallel_gpus):
        logger.warning(f"batch_size {tc.batch_size} is not a multiple of the {runtime.world_size} ranks x "
                       f"{runtime.data_parallel_gpus} GPUs; per-GPU batches differ by one sample")
    rank_batch_size = max(1, tc.batch_size // runtime.world_size)
    seen_targets, event_sets = None, None
    if config.data.samples_per_epoch:
        total_samples = config.data.samples_per_epoch
        windows_per_rank = total_samples // runtime.world_size  # an estimate: utils.lockstep keeps ranks together
        logger.info(f"Training samples per epoch (from data.samples_per_epoch): {total_samples}; no counting "
                    f"pass, so no record of which events and event sets occur in training (event_set rule off)")
    else:
        counting = build_dataset(config, "train", runtime)
        counted = merge_counts(utils.all_gather(counting.count(), runtime), disjoint=counting.shard_by_file)
        total_samples, seen_targets, event_sets = counted["windows"], counted["seen_targets"], counted["event_sets"]
        windows_per_rank = counted["windows_per_rank"]
        logger.info(f"Training data {config.data.preprocessed_dir}: {counted['sessions']} normal sessions -> "
                    f"{counted['windows']} windows, {counted['tokens']} predicted events | skipped: "
                    f"{counted['abnormal_skipped']} abnormal, {counted['bad_records']} bad records")
        if event_sets is None:
            logger.warning(f"More than {MAX_EVENT_SETS:,} distinct sets of event types in the training data: too "
                           f"varied for the event_set rule, which is off for this model")
        if counted["bad_records"]:
            logger.warning(f"Skipped bad records (data.skip_bad_records): first was {counted['first_bad_record']}")
    if total_samples == 0:
        raise DataError(f"{config.data.preprocessed_dir}: no normal training sessions (after the "
                        f"{config.data.validation_split:.0%} validation split)")
    # Every rank runs the same number of steps, otherwise DDP's gradient all-reduce waits forever.
    samples_per_rank = windows_per_rank if runtime.distributed else None
    if samples_per_rank == 0:
        raise DataError(f"{config.data.preprocessed_dir}: some of the {runtime.world_size} ranks get no training "
                        f"sessions from their share of the files; use fewer ranks or split the data into more files")
    steps_per_epoch = math.ceil((samples_per_rank or total_samples) / rank_batch_size)
    train_data = build_dataset(config, "train", runtime, samples_per_rank, config.lazy_loading.shuffle_buffer)
    val_data = build_dataset(config, "val", runtime)

    # ---------------------------------------------------------------- model, optimizer, schedule, precision
    raw_model = DeepLog(**vars(config.model))
    if seen_targets is not None:  # events absent from training data are misses at detection time
        raw_model.seen_events.zero_()[seen_targets] = True
    raw_model.to(runtime.device)
    model = raw_model
    if runtime.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    elif runtime.data_parallel_gpus > 1:
        model = torch.nn.DataParallel(raw_model)  # splits each batch across the visible GPUs
    optimizer_class = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(raw_model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, utils.lr_multiplier(tc.warmup_steps, total_steps, tc.lr_schedule, tc.min_lr_ratio))
    amp_dtype, use_loss_scaling = utils.amp_settings(config, runtime.device)
    # Enabled only for fp16: bf16 and fp32 share the same code path with a pass-through scaler.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=use_loss_scaling)
    early_stopping = utils.EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta)
    n_params = sum(p.numel() for p in raw_model.parameters())
    logger.info(f"Model: {n_params:,} parameters {vars(config.model)} | precision: "
                f"{amp_dtype or torch.float32}{' + GradScaler' if use_loss_scaling else ''} | "
                f"{steps_per_epoch} steps/epoch x {tc.epochs} epochs, batch {tc.batch_size}")

    history = {"epoch": [], "train_loss": [], "val_loss": [], "learning_rate": [], "epoch_time": []}
    start_epoch, start_batch, global_step = 1, 0, 0
    epoch_loss_sum, epoch_tokens, epoch_time_before = 0.0, 0, 0.0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
        early_stopping.load_state_dict(checkpoint["early_stopping"])
        history = checkpoint["history"]
        position = checkpoint["data_position"]
        start_epoch, start_batch = position["epoch"], position["batches_done"]
        epoch_loss_sum, epoch_tokens = position["epoch_loss_sum"], position["epoch_tokens"]
        epoch_time_before = position["epoch_time"]
        global_step = checkpoint["step"]
        event_sets = event_sets if event_sets is not None else checkpoint.get("event_sets")
        rng_states = checkpoint["rng_state"]
        if len(rng_states) != runtime.world_size:
            logger.warning(f"Checkpoint was written by {len(rng_states)} processes, this run has "
                           f"{runtime.world_size}: training continues, but not bit-exactly")
        utils.set_rng_state(rng_states[runtime.rank % len(rng_states)])
        logger.info(f"Resumed from {args.resume}: epoch {start_epoch}, batch {start_batch}, step {global_step}")

    def save(path: Path, epoch: int, batches_done: int, epoch_elapsed: float) -> None:
        # Every rank's RNG state is gathered so that a DDP resume restores each rank's dropout stream.
        states = [utils.rng_state()]
        if runtime.distributed:
            states = [None] * runtime.world_size
            torch.distributed.all_gather_object(states, utils.rng_state())
        if not runtime.is_master:
            return
        utils.save_checkpoint({
            "model_state_dict": raw_model.state_dict(), "model_args": raw_model.model_args,
            "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
            "scaler_state_dict": scaler.state_dict(), "early_stopping": early_stopping.state_dict(),
            "rng_state": states, "history": history, "step": global_step, "epoch": epoch,
            "data_position": {"epoch": epoch, "batches_done": batches_done, "epoch_loss_sum": epoch_loss_sum,
                              "epoch_tokens": epoch_tokens, "epoch_time": epoch_elapsed},
            "config": utils.config_to_dict(config), "world_size": runtime.world_size,
            "event_sets": event_sets,  # which event types co-occur in normal training sessions
        }, path)

    # ---------------------------------------------------------------- the loop
    gpu_monitor = utils.GPUMonitor(logger) if runtime.is_master else None
    stop_signal = utils.StopSignal()
    run_start, steps_this_run = time.time(), 0
    window_loss = torch.zeros((), device=runtime.device)  # since the last log line, kept on device:
    window_tokens = torch.zeros((), device=runtime.device, dtype=torch.long)  # .item() only at log time

    def flush(loss_sum: float, tokens: int) -> tuple[float, int]:
        """Move the on-device loss window into the epoch's running sums (one host sync)."""
        loss_sum, tokens = loss_sum + window_loss.item(), tokens + int(window_tokens.item())
        window_loss.zero_(), window_tokens.zero_()
        return loss_sum, tokens

    model.train()
    stopped_early = False
    for epoch in range(start_epoch, tc.epochs + 1):
        train_data.set_epoch(epoch)
        epoch_start = time.time() - (epoch_time_before if epoch == start_epoch else 0.0)
        first_batch = start_batch if epoch == start_epoch else 0
        if epoch != start_epoch:
            epoch_loss_sum, epoch_tokens = 0.0, 0
        # A bar only on a terminal: under nohup or screen logs, plain lines stay readable.
        progress = tqdm(total=steps_per_epoch, initial=first_batch, desc=f"epoch {epoch}", leave=False,
                        disable=not (runtime.is_master and sys.stderr.isatty()))
        with logging_redirect_tqdm([logger]) if not progress.disable else contextlib.nullcontext():
            for batch, batches_done in utils.lockstep(train_data.batches(rank_batch_size, first_batch), runtime):
                loss_sum, tokens = token_loss_sum(model, batch, runtime.device, amp_dtype)
                # Mean over this batch's real tokens. Under DDP, gradients are averaged over ranks, so
                # ranks with more tokens weigh the same as ranks with fewer: a small, accepted bias.
                loss = loss_sum / tokens.clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tc.max_grad_norm > 0:
                    # LSTMs are prone to exploding gradients on long sessions; clip the global norm.
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                global_step += 1
                steps_this_run += 1
                window_loss += loss_sum.detach()
                window_tokens += tokens
                progress.update(1)

                if global_step % tc.log_every_steps == 0:
                    epoch_loss_sum, epoch_tokens = flush(epoch_loss_sum, epoch_tokens)
                    elapsed = time.time() - run_start
                    remaining_steps = total_steps - global_step
                    eta = elapsed / steps_this_run * remaining_steps
                    fields = [f"[Step {global_step}] Loss: {loss.item():.4f} "
                              f"(avg: {epoch_loss_sum / max(epoch_tokens, 1):.4f})",
                              f"LR: {scheduler.get_last_lr()[0]:.2e}"]
                    gpu_field = gpu_monitor.summary() if gpu_monitor else None
                    if gpu_field:
                        fields.append(gpu_field)
                    fields.append(f"Time: {utils.format_duration(elapsed)} (ETA: {utils.format_duration(eta)})")
                    logger.info(" | ".join(fields))
                if gpu_monitor and gpu_monitor.handles and global_step % tc.gpu_stats_every_steps == 0:
                    for line in gpu_monitor.details():
                        logger.info(line)
                if tc.save_every_steps and global_step % tc.save_every_steps == 0:
                    epoch_loss_sum, epoch_tokens = flush(epoch_loss_sum, epoch_tokens)
                    save(checkpoint_dir / f"step_{global_step}.pt", epoch, batches_done, time.time() - epoch_start)
                    if runtime.is_master:
                        utils.prune_checkpoints(checkpoint_dir, "step", tc.keep_last_checkpoints)
                if stop_signal.check(runtime, global_step, tc.log_every_steps):
                    epoch_loss_sum, epoch_tokens = flush(epoch_loss_sum, epoch_tokens)
                    path = checkpoint_dir / f"step_{global_step}.pt"
                    save(path, epoch, batches_done, time.time() - epoch_start)
                    logger.info(f"Stopped by {stop_signal.received or 'a signal on another rank'} at step "
                                f"{global_step}: continue with --resume {path}")
                    progress.close()
                    return stop_signal.exit_code or 143
        progress.close()
        epoch_loss_sum, epoch_tokens = flush(epoch_loss_sum, epoch_tokens)

        # ------------------------------------------------------------ end of epoch: validate, record, save
        train_loss_sum, train_tokens = utils.all_reduce_sum([epoch_loss_sum, epoch_tokens], runtime)
        train_loss = train_loss_sum / max(train_tokens, 1)
        val_loss, val_tokens = evaluate_loss(raw_model, val_data, rank_batch_size, runtime, amp_dtype)
        # Without a validation split (tiny data), model selection falls back to the training loss.
        selection_loss = val_loss if val_tokens else train_loss
        is_best = early_stopping.step(selection_loss)
        epoch_time = time.time() - epoch_start
        history["epoch"].append(epoch)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss if val_tokens else None)
        history["learning_rate"].append(scheduler.get_last_lr()[0])
        history["epoch_time"].append(epoch_time)
        logger.info(f"Epoch {epoch}/{tc.epochs} | train loss {train_loss:.4f} | val loss "
                    f"{val_loss:.4f} ({val_tokens} events) | LR {scheduler.get_last_lr()[0]:.2e} | "
                    f"time {utils.format_duration(epoch_time)}{' | new best' if is_best else ''}")
        epoch_loss_sum, epoch_tokens = 0.0, 0
        if runtime.is_master:
            utils.save_json(output_dir / "training_history.json", history)
        # Position "epoch + 1, batch 0": resuming from an epoch checkpoint starts the next epoch.
        if tc.save_every_epoch:
            save(checkpoint_dir / f"epoch_{epoch}.pt", epoch + 1, 0, 0.0)
            if runtime.is_master:
                utils.prune_checkpoints(checkpoint_dir, "epoch", tc.keep_last_checkpoints)
        if is_best:
            save(checkpoint_dir / "best_model.pt", epoch + 1, 0, 0.0)
        if config.early_stopping.enabled and early_stopping.should_stop:
            logger.info(f"Early stopping: no val-loss improvement > {config.early_stopping.min_delta} "
                        f"for {early_stopping.patience} epochs")
            stopped_early = True
            break

    total_time = time.time() - run_start
    logger.info(f"Training finished in {utils.format_duration(total_time)} | best loss "
                f"{early_stopping.best_loss:.4f}{' (early stop)' if stopped_early else ''} | "
                f"best model: {checkpoint_dir / 'best_model.pt'}")
    if runtime.distributed:
        torch.distributed.barrier()
    if tc.evaluate_after_training and runtime.is_master and (checkpoint_dir / "best_model.pt").exists():
        import evaluate  # imported here: evaluation is a separate, optional stage
        evaluate.after_training(checkpoint_dir / "best_model.pt", config, logger)
    if runtime.distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
