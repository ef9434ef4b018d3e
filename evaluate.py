"""Evaluate a DeepLog checkpoint, calibrate its thresholds, or flag abnormal sessions in new data.

Examples:

    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt      # data from the checkpoint's config
    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt \\
        --data-dir ../shared/data/hdfs/hdfs_dev_normal --abnormal-dir ../shared/data/hdfs/hdfs_dev_abnormal
    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt --calibrate-on /data/quiet_day \\
        --data-dir /data/today --tag today                # refit thresholds on other normal sessions first
    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt --detect data/sample/new \\
        --output outputs/detections.jsonl                 # one JSON line per session, streaming

Scores. For every session the model predicts each next event from the start token to the end of the
session. Per session we keep: the anomaly score (fraction of predictions whose actual event is outside
the top-k), the worst rank (DeepLog's rule: abnormal when any event is outside the top-g), the lowest
probability the model gave an actual event (the probability rule) and whether its set of event types
ever occurred in a normal training session (the event_set rule); `combined`, the default, is
probability or event_set. Thresholds are fitted on normal sessions only (calibration), stored with the
model, and never fitted on the data being scored.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import utils
from dataset import DataError, is_validation, iter_sessions
from model import DeepLog

ACCURACY_KS = (1, 5, 10, 20)
PERCENTILES = (90, 95, 99)
RULES = ("combined", "probability", "event_set", "top_g", "score_p90", "score_p95", "score_p99")


# ----------------------------------------------------------------------------- loading
def load_model(checkpoint_path, device: torch.device) -> tuple[DeepLog, dict]:
    checkpoint = utils.load_checkpoint(checkpoint_path, map_location="cpu")  # works without the GPU it was saved on
    try:
        model = DeepLog(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model_state_dict"])
    except (TypeError, RuntimeError) as error:
        raise utils.CheckpointError(f"{checkpoint_path}: weights do not fit the stored model arguments "
                                    f"{checkpoint['model_args']} ({str(error).splitlines()[0]})") from None
    return model.to(device).eval(), checkpoint


def known_event_sets(checkpoint: dict) -> set[frozenset] | None:
    """The sets of event types that co-occur in normal training sessions (None: not recorded)."""
    sets = checkpoint.get("event_sets")
    return None if sets is None else {frozenset(s) for s in sets}


def reader_options(config: utils.Config) -> dict:
    data = config.data
    return dict(event_ids_field=data.event_ids_field, label_field=data.label_field,
                session_id_field=data.session_id_field, json_array_key=data.json_array_key,
                skip_bad_records=data.skip_bad_records)


def collect(path, options: dict, all_abnormal: bool = False) -> tuple[Counter, Counter]:
    """Distinct sessions with their counts, (normal, abnormal) by label. IDs are not checked against the
    vocabulary here: an unknown ID is scored as a miss, not rejected."""
    normal, abnormal = Counter(), Counter()
    for record in iter_sessions(path, None, **options):
        (abnormal if all_abnormal or record.label else normal)[tuple(record.event_ids)] += 1
    return normal, abnormal


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_sessions(model: DeepLog, sessions: list[tuple], top_ks, batch_size: int = 256,
                   desc: str = "scoring", event_sets: set | None = None) -> dict[str, np.ndarray]:
    """Score distinct sessions in batches of similar length, one LSTM pass each.

    Returns arrays aligned with `sessions`: predictions (n + 1), misses_at_k for each k, max_rank,
    min_log_prob, loss_sum and loss_count (targets the model knows), unknown (events never seen in
    training), novel_set (1 when the session's set of event types never occurred in a normal training
    session; always 0 without `event_sets`).
    """
    ks = sorted(set(top_ks))
    order = sorted(range(len(sessions)), key=lambda i: len(sessions[i]))
    columns = ["predictions", "max_rank", "min_log_prob", "loss_sum", "loss_count", "unknown", "novel_set"] + \
        [f"misses_at_{k}" for k in ks]
    out = {name: np.zeros(len(sessions), dtype=np.float64) for name in columns}
    if event_sets is not None:
        out["novel_set"] = np.array([frozenset(s) not in event_sets for s in sessions], dtype=np.float64)
    device = next(model.parameters()).device
    with tqdm(total=len(sessions), desc=desc, disable=not sys.stderr.isatty(), leave=False) as progress:
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            inputs, targets = model.encode([sessions[i] for i in rows], device)
            ranks, log_probs = model.prediction_ranks(inputs, targets)
            valid = ranks >= 0
            finite = valid & torch.isfinite(log_probs)
            values = {"predictions": valid.sum(1), "max_rank": ranks.max(1).values,
                      "min_log_prob": torch.where(valid, log_probs, math.inf).min(1).values,
                      "loss_sum": -torch.where(finite, log_probs, 0.0).sum(1), "loss_count": finite.sum(1),
                      "unknown": (valid & ~finite).sum(1)}
            values.update({f"misses_at_{k}": ((ranks >= k) & valid).sum(1) for k in ks})
            for name, tensor in values.items():
                out[name][rows] = tensor.double().cpu().numpy()
            progress.update(len(rows))
    return out


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value v with at least q% of the total weight at or below v (duplicates count)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, q / 100 * cumulative[-1] - 1e-9))
    return float(values[order][min(index, len(order) - 1)])


def fit_calibration(model, normal: Counter, top_k: int, top_g: int, margin: float, source: str,
                    default_rule: str, batch_size: int = 256, event_sets: set | None = None) -> dict:
    """Thresholds from normal sessions only: score percentiles, and the probability bound, which is
    `margin` times the lowest probability the model gave an actual event of a normal session (events
    never seen in training left out: they are flagged anyway). Records how often each rule fires on
    these normal sessions: the false-positive rate to expect."""
    if not normal:
        raise DataError(f"{source}: no normal sessions to calibrate on")
    sessions, counts = list(normal), np.array(list(normal.values()), dtype=np.float64)
    scores = score_sessions(model, sessions, [top_k, top_g], batch_size, "calibrating", event_sets)
    anomaly = scores[f"misses_at_{top_k}"] / scores["predictions"]
    finite = np.isfinite(scores["min_log_prob"])
    least_likely = float(scores["min_log_prob"][finite].min()) if finite.any() else 0.0
    calibration = {
        "top_k": top_k, "top_g": top_g, "default_rule": default_rule, "source": source,
        "sessions": int(counts.sum()), "distinct_sessions": len(sessions),
        "score_thresholds": {f"p{q}": weighted_percentile(anomaly, counts, q) for q in PERCENTILES},
        "least_likely_normal_log_prob": least_likely, "probability_margin": margin,
        "probability_bound": least_likely + math.log(margin), "event_set_rule": event_sets is not None,
        "fitted_at": datetime.now().isoformat(timespec="seconds")}
    calibration["flagged_on_calibration"] = {
        rule: float(counts[verdicts(scores, calibration, rule)].sum() / counts.sum()) for rule in RULES}
    return calibration


def verdicts(scores: dict, calibration: dict, rule: str) -> np.ndarray:
    """True where the session is abnormal under `rule`."""
    if rule == "combined":
        return verdicts(scores, calibration, "probability") | verdicts(scores, calibration, "event_set")
    if rule == "event_set":
        return scores["novel_set"] > 0
    if rule == "top_g":
        return scores["max_rank"] >= calibration["top_g"]
    if rule == "probability":
        return scores["min_log_prob"] < calibration["probability_bound"]
    top_k = calibration["top_k"]
    return scores[f"misses_at_{top_k}"] / scores["predictions"] > calibration["score_thresholds"][rule[6:]]


def confusion(abnormal_pred_normal: np.ndarray, normal_w: np.ndarray,
              abnormal_pred_abnormal: np.ndarray, abnormal_w: np.ndarray) -> dict:
    """Weighted counts (every session as often as it occurs) and the derived rates."""
    fp = float(normal_w[abnormal_pred_normal].sum())
    tn = float(normal_w.sum()) - fp
    tp = float(abnormal_w[abnormal_pred_abnormal].sum())
    fn = float(abnormal_w.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "fpr": fp / (fp + tn) if fp + tn else 0.0}


def check_top_k(calibration: dict, top_k: int) -> None:
    if top_k != calibration["top_k"]:
        raise utils.ConfigError(f"the stored thresholds were fitted at top_k={calibration['top_k']}; "
                                f"refit them with --calibrate-on DIR to use --top-k {top_k}")


def evaluate(model, calibration: dict, normal: Counter, abnormal: Counter, top_k: int,
             default_rule: str, batch_size: int = 256, event_sets: set | None = None) -> tuple[dict, tuple]:
    """Next-event metrics on normal sessions, score statistics and, with abnormal data, each rule's metrics."""
    check_top_k(calibration, top_k)
    if not normal and not abnormal:
        raise DataError("no sessions to evaluate")
    ks = [*ACCURACY_KS, top_k, calibration["top_g"]]
    results: dict = {"top_k": top_k}
    normal_scores = score_sessions(model, list(normal), ks, batch_size, "normal", event_sets) if normal else None
    normal_w = np.array(list(normal.values()), dtype=np.float64)
    if normal_scores is not None:
        predictions = float((normal_scores["predictions"] * normal_w).sum())
        loss_count = (normal_scores["loss_count"] * normal_w).sum()
        results["next_event"] = {
            "loss": float((normal_scores["loss_sum"] * normal_w).sum() / max(loss_count, 1)),
            "total_predictions": int(predictions),
            **{f"top{k}_accuracy": 1 - float((normal_scores[f"misses_at_{k}"] * normal_w).sum()) / predictions
               for k in ACCURACY_KS}}
        anomaly = normal_scores[f"misses_at_{top_k}"] / normal_scores["predictions"]
        mean = float((anomaly * normal_w).sum() / normal_w.sum())
        results["normal_scores"] = {
            "mean": mean, "std": float(math.sqrt((((anomaly - mean) ** 2) * normal_w).sum() / normal_w.sum())),
            "count": int(normal_w.sum()), "distinct": len(normal),
            "recommended_thresholds": {f"p{q}": weighted_percentile(anomaly, normal_w, q) for q in PERCENTILES}}
    results["unknown_events"] = {}
    if normal_scores is not None:
        results["unknown_events"]["normal"] = int((normal_scores["unknown"] * normal_w).sum())
    if abnormal:
        abnormal_w = np.array(list(abnormal.values()), dtype=np.float64)
        abnormal_scores = score_sessions(model, list(abnormal), ks, batch_size, "abnormal", event_sets)
        results["unknown_events"]["abnormal"] = int((abnormal_scores["unknown"] * abnormal_w).sum())
        empty = np.zeros(0, dtype=bool)
        results["rules"] = {}
        for rule in RULES:
            on_normal = verdicts(normal_scores, calibration, rule) if normal_scores is not None else empty
            results["rules"][rule] = confusion(on_normal, normal_w if normal else np.zeros(0),
                                               verdicts(abnormal_scores, calibration, rule), abnormal_w)
        results["default"] = {"rule": default_rule, **results["rules"][default_rule]}
        results["abnormal_sessions"] = {"count": int(abnormal_w.sum()), "distinct": len(abnormal)}
        plot_data = (normal_scores, normal_w, abnormal_scores, abnormal_w)
    elif normal_scores is not None:
        flagged = {rule: float(normal_w[verdicts(normal_scores, calibration, rule)].sum()) for rule in RULES}
        results["false_positive_rate"] = {rule: n / normal_w.sum() for rule, n in flagged.items()}
        results["default"] = {"rule": default_rule, "fpr": results["false_positive_rate"][default_rule]}
        plot_data = (normal_scores, normal_w, None, None)
    return results, plot_data


# ----------------------------------------------------------------------------- reports
def report_paths(output_dir: Path, tag: str | None) -> tuple[Path, Path]:
    """evaluation_results_YYYYMMDD[_tag].json; a second run the same day adds the time, never overwrites."""
    now = datetime.now()
    day = now.strftime("%Y%m%d") + (f"_{tag}" if tag else "")
    timed = day + now.strftime("_%H%M%S")
    for stem in [day, timed] + [f"{timed}_{n}" for n in range(2, 10000)]:
        if not (output_dir / f"evaluation_results_{stem}.json").exists():
            return output_dir / f"evaluation_results_{stem}.json", output_dir / f"evaluation_report_{stem}.txt"
    raise RuntimeError("no free report file name")


def write_reports(results: dict, plot_data, output_dir: Path, tag: str | None, logger) -> tuple[Path, Path]:
    json_path, text_path = report_paths(output_dir, tag)
    utils.save_json(json_path, results)
    utils.atomic_write_text(text_path, format_report(results))
    logger.info(f"Evaluation results: {json_path} | report: {text_path}")
    if plot_data is not None:
        plot_scores(plot_data, results, output_dir / "score_distribution.png", logger)
    return json_path, text_path


def format_report(r: dict) -> str:
    lines = ["=" * 72, "DeepLog evaluation report", "=" * 72,
             f"Date:        {r['date']}", f"Checkpoint:  {r['checkpoint']}",
             f"Normal data: {r['data']['normal']}", f"Abnormal:    {r['data']['abnormal']}",
             f"Top-k:       {r['top_k']}    Scoring time: {r['timing']['scoring_seconds']:.1f}s "
             f"({r['timing']['sessions_per_second']:.0f} sessions/s)", ""]
    if "next_event" in r:
        ne = r["next_event"]
        lines += ["NEXT-EVENT PREDICTION (normal sessions, weighted by event)", "-" * 72,
                  f"  Loss:              {ne['loss']:.4f}", f"  Predictions:       {ne['total_predictions']}"]
        lines += [f"  Top-{k:<2} accuracy:   {ne[f'top{k}_accuracy']:.4f}" for k in ACCURACY_KS] + [""]
        ns = r["normal_scores"]
        lines += ["ANOMALY SCORES ON NORMAL DATA (fraction of events outside the top-k)", "-" * 72,
                  f"  Mean: {ns['mean']:.4f}   Std: {ns['std']:.4f}   Sessions: {ns['count']} "
                  f"({ns['distinct']} distinct)",
                  "  Recommended thresholds: " + "  ".join(f"{p}={v:.4f}" for p, v in
                                                          ns["recommended_thresholds"].items()), ""]
    c = r["calibration"]
    lines += ["THRESHOLDS APPLIED (fitted on normal sessions only)", "-" * 72,
              f"  Calibrated on: {c['source']} ({c['sessions']} sessions)",
              "  Score thresholds: " + "  ".join(f"{p}={v:.4f}" for p, v in c["score_thresholds"].items()),
              f"  DeepLog top-g: g={c['top_g']}",
              f"  Probability bound: p < {math.exp(c['probability_bound']):.3g} "
              f"({c['probability_margin']} x least likely normal event)",
              f"  Event-set rule: {'on' if c['event_set_rule'] else 'off (no record of event sets from training)'}",
              "  Flagged on the calibration sessions (expected FPR): " + "  ".join(
                  f"{rule}={rate:.2%}" for rule, rate in c["flagged_on_calibration"].items()), ""]
    unknown = ", ".join(f"{side} {n}" for side, n in r["unknown_events"].items())
    lines += ["EVENTS NEVER SEEN IN TRAINING (IDs >= vocab_size, or absent from the training data)", "-" * 72,
              f"  Occurrences: {unknown}. Each counts as a miss at every k and as probability 0.", ""]
    if "rules" in r:
        lines += ["DETECTION (every session weighted by its count)", "-" * 72,
                  f"  {'rule':<13}{'precision':>10}{'recall':>9}{'F1':>8}{'FPR':>9}{'TP':>8}{'FP':>7}"
                  f"{'TN':>8}{'FN':>7}"]
        for rule, m in r["rules"].items():
            marker = " *" if rule == r["default"]["rule"] else ""
            lines.append(f"  {rule:<13}{m['precision']:>10.4f}{m['recall']:>9.4f}{m['f1']:>8.4f}"
                         f"{m['fpr']:>9.4%}{m['tp']:>8}{m['fp']:>7}{m['tn']:>8}{m['fn']:>7}{marker}")
        lines += ["  * the default rule: the verdict detection gives", ""]
    elif "false_positive_rate" in r:
        lines += ["FALSE-POSITIVE RATE ON NORMAL DATA (no abnormal data given)", "-" * 72]
        lines += [f"  {rule:<13}{fpr:.4%}" for rule, fpr in r["false_positive_rate"].items()] + [""]
    return "\n".join(lines) + "\n"


def pyplot_or_note(picture: str, logger):
    """matplotlib.pyplot (headless), or None after one log line saying which picture is skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info(f"matplotlib not installed: no {picture} (pip install matplotlib)")
        return None
    return plt


def plot_scores(plot_data, results, path: Path, logger) -> None:
    """Normal vs abnormal score histograms with the thresholds marked (matplotlib is optional)."""
    plt = pyplot_or_note(path.name, logger)
    if plt is None:
        return
    normal_scores, normal_w, abnormal_scores, abnormal_w = plot_data
    calibration, top_k = results["calibration"], results["top_k"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for scores, weights, label in ((normal_scores, normal_w, "normal"), (abnormal_scores, abnormal_w, "abnormal")):
        if scores is None:
            continue
        left.hist(scores[f"misses_at_{top_k}"] / scores["predictions"], bins=40, range=(0, 1), weights=weights,
                  alpha=0.6, label=label)
        right.hist(np.maximum(scores["min_log_prob"], -30) / math.log(10), bins=60, weights=weights,
                   alpha=0.6, label=label)
    for name, value in calibration["score_thresholds"].items():
        left.axvline(value, linestyle="--", color="black", linewidth=0.8)
        left.annotate(name, (value, left.get_ylim()[1] * 0.9), fontsize=8)
    right.axvline(calibration["probability_bound"] / math.log(10), color="red", linestyle="--", label="bound")
    left.set(title=f"anomaly score (fraction outside top-{top_k})", xlabel="score", ylabel="sessions", yscale="log")
    right.set(title="least likely actual event per session", xlabel="log10 probability", yscale="log")
    left.legend(), right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    logger.info(f"Score distribution plot: {path}")


# ----------------------------------------------------------------------------- detection
def detect(model, calibration: dict, path, options: dict, rule: str, out, batch_size: int = 256,
           event_sets: set | None = None, chunk_size: int = 4096, max_misses: int = 3) -> dict:
    """Stream sessions from `path` in chunks and write one JSON line per session. Memory holds one chunk."""
    top_k, totals = calibration["top_k"], Counter()
    bound = calibration["probability_bound"] if rule in ("probability", "combined") else None
    records = iter_sessions(path, None, **options)
    while True:
        chunk = [record for _, record in zip(range(chunk_size), records)]
        if not chunk:
            return dict(totals)
        distinct = list(dict.fromkeys(tuple(r.event_ids) for r in chunk))  # identical sessions scored once
        scores = score_sessions(model, distinct, [top_k, calibration["top_g"]], batch_size, "detecting", event_sets)
        abnormal = verdicts(scores, calibration, rule)
        flagged = [s for s, a in zip(distinct, abnormal) if a]
        reasons = dict(zip(flagged, model.diagnose(flagged, top_k, max_misses, log_prob_bound=bound))) \
            if flagged else {}
        index = {session: i for i, session in enumerate(distinct)}
        for record in chunk:
            i = index[tuple(record.event_ids)]
            out.write(json.dumps({
                "session_id": record.session_id, "score": round(float(scores[f"misses_at_{top_k}"][i] /
                                                                     scores["predictions"][i]), 6),
                "verdict": "abnormal" if abnormal[i] else "normal", "rule": rule,
                "min_probability": float(math.exp(scores["min_log_prob"][i])),
                "novel_event_set": bool(scores["novel_set"][i]),
                "misses": reasons.get(tuple(record.event_ids), [])}) + "\n")
            totals["abnormal" if abnormal[i] else "normal"] += 1


# ----------------------------------------------------------------------------- entry points
def run_evaluation(model, checkpoint_path, calibration, normal, abnormal, data_paths, config, output_dir,
                   top_k, tag, logger, event_sets) -> dict:
    started = time.time()
    results, plot_data = evaluate(model, calibration, normal, abnormal, top_k, config.evaluation.decision_rule,
                                  config.evaluation.batch_size, event_sets)
    elapsed = time.time() - started
    sessions = sum(normal.values()) + sum(abnormal.values())
    results = {"date": datetime.now().isoformat(timespec="seconds"), "checkpoint": str(checkpoint_path),
               "data": data_paths, "calibration": calibration,
               "timing": {"scoring_seconds": elapsed, "sessions": sessions,
                          "distinct_sessions": len(normal) + len(abnormal),
                          "sessions_per_second": sessions / max(elapsed, 1e-9)}, **results}
    unseen, predictions = results["unknown_events"].get("normal", 0), results.get("next_event", {}).get(
        "total_predictions", 0)
    if predictions and unseen > 0.05 * predictions:
        logger.warning(f"{unseen} of {predictions} events in the normal data were never seen in training: "
                       f"is this checkpoint trained on this kind of data (vocab_size, event IDs)?")
    write_reports(results, plot_data, Path(output_dir), tag, logger)
    for line in format_report(results).splitlines()[4:]:  # the report, without its title, into the log
        if line.strip():
            logger.info(line)
    return results


def store_calibration(checkpoint_path, checkpoint: dict, calibration: dict, output_dir: Path) -> None:
    """Into the checkpoint (atomic rewrite) and calibration.json beside the outputs."""
    checkpoint["calibration"] = calibration
    utils.save_checkpoint(checkpoint, checkpoint_path)
    utils.save_json(output_dir / "calibration.json", calibration)


def validation_sessions(config: utils.Config, options: dict) -> tuple[Counter, Counter, Counter]:
    """One pass over the training data: the calibration and evaluation halves of its normal validation
    split (halved by another hash, so neither ever scores what the other fitted), and the sessions
    labelled abnormal. With validation_split 0 the halves come from all normal sessions."""
    data, seed = config.data, config.training.seed
    calibration, evaluation, abnormal = Counter(), Counter(), Counter()
    for record in iter_sessions(data.preprocessed_dir, None, **options):
        events = tuple(record.event_ids)
        if record.label:
            abnormal[events] += 1
        elif data.validation_split == 0 or is_validation(record.file, record.index, seed, data.validation_split):
            half = calibration if is_validation(record.file, record.index, seed + 1, 0.5) else evaluation
            half[events] += 1
    return calibration, evaluation, abnormal


def after_training(checkpoint_path, config: utils.Config, logger) -> dict:
    """Called by train.py: calibrate on half of the normal validation split, evaluate on the other half
    (plus abnormal sessions: labelled 1 in the training data, and data.abnormal_dir)."""
    output_dir, data, ev = Path(config.training.output_dir), config.data, config.evaluation
    plot_training_curve(output_dir, logger)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_model(checkpoint_path, device)
    event_sets = known_event_sets(checkpoint)
    options = reader_options(config)
    if data.validation_split == 0:
        logger.warning("data.validation_split is 0: thresholds are fitted on sessions the model trained on")
    calibration_set, normal, abnormal = validation_sessions(config, options)
    if not calibration_set:  # tiny data: fall back to the other half
        calibration_set = normal
    calibration = fit_calibration(model, calibration_set, ev.top_k, ev.top_g, ev.probability_margin,
                                  f"validation split of {data.preprocessed_dir} (calibration half)",
                                  ev.decision_rule, ev.batch_size, event_sets)
    store_calibration(checkpoint_path, checkpoint, calibration, output_dir)
    if data.abnormal_dir:
        abnormal.update(collect(data.abnormal_dir, options, all_abnormal=True)[1])
    paths = {"normal": f"{data.preprocessed_dir} (validation split, evaluation half)",
             "abnormal": ", ".join(filter(None, [data.abnormal_dir, f"label 1 in {data.preprocessed_dir}"]))}
    return run_evaluation(model, checkpoint_path, calibration, normal, abnormal, paths, config, output_dir,
                          ev.top_k, None, logger, event_sets)


def plot_training_curve(output_dir: Path, logger) -> None:
    plt = pyplot_or_note("training_curve.png", logger)
    if plt is None:
        return
    history = json.loads((output_dir / "training_history.json").read_text())
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    loss_axis.plot(history["epoch"], history["val_loss"], "o-", label="val loss")
    loss_axis.set(xlabel="epoch", ylabel="loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(history["epoch"], history["learning_rate"], "k:", label="learning rate")
    lr_axis.set_ylabel("learning rate")
    figure.legend(loc="upper center")
    figure.tight_layout()
    figure.savefig(output_dir / "training_curve.png", dpi=100)
    plt.close(figure)
    logger.info(f"Training curve plot: {output_dir / 'training_curve.png'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--data-dir", help="sessions to evaluate: label 0 (or none) normal, label 1 abnormal "
                        "(default: the checkpoint config's validation split)")
    parser.add_argument("--abnormal-dir", help="sessions that are all abnormal, whatever their label")
    parser.add_argument("--output-dir", help="where reports go (default: the checkpoint's output_dir)")
    parser.add_argument("--top-k", type=int, help="k of the anomaly score (default: evaluation.top_k)")
    parser.add_argument("--rule", choices=RULES, help="decision rule (default: evaluation.decision_rule)")
    parser.add_argument("--calibrate-on", help="refit the thresholds on these normal sessions first "
                        "(saved as OUTPUT_DIR/calibration.json; never the data being scored)")
    parser.add_argument("--calibration", help="use thresholds from this calibration.json")
    parser.add_argument("--detect", help="score these sessions without metrics: one JSON line per session")
    parser.add_argument("--output", help="with --detect: write the JSON lines here (default: stdout)")
    parser.add_argument("--tag", help="added to the report file names")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logger = logging.getLogger("deeplog")
    return utils.exit_on_user_error(lambda: run(args, logger), (*utils.USER_ERRORS, DataError), logger)


def run(args, logger):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_model(args.checkpoint, device)
    event_sets = known_event_sets(checkpoint)
    config = utils.config_from_dict(checkpoint["config"])
    ev = config.evaluation
    if args.rule:
        ev.decision_rule = args.rule
    output_dir = Path(args.output_dir or config.training.output_dir)
    to_stdout = args.detect and not args.output
    utils.setup_logger(None if to_stdout else str(output_dir), log_file="evaluation.log", logger=logger)
    if to_stdout:  # keep stdout for the JSON lines
        logger.handlers[0].setStream(sys.stderr)
    top_k = args.top_k or ev.top_k
    options = reader_options(config)
    calibration = checkpoint.get("calibration")
    if args.calibration:
        try:
            calibration = json.loads(Path(args.calibration).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise utils.ConfigError(f"{args.calibration}: unreadable calibration file ({error})") from None
        missing = {"top_k", "top_g", "score_thresholds", "probability_bound"} - set(calibration)
        if missing:
            raise utils.ConfigError(f"{args.calibration}: not a calibration.json "
                                    f"(missing {', '.join(sorted(missing))})")
    scored = [Path(p).resolve() for p in (args.data_dir, args.abnormal_dir, args.detect) if p]
    if args.calibrate_on and Path(args.calibrate_on).resolve() in scored:
        raise utils.ConfigError(f"--calibrate-on {args.calibrate_on} is also the data being scored: thresholds "
                                f"must be fitted on other normal sessions")
    if args.calibrate_on:
        normal, _ = collect(args.calibrate_on, options)
        calibration = fit_calibration(model, normal, top_k, ev.top_g, ev.probability_margin, args.calibrate_on,
                                      ev.decision_rule, ev.batch_size, event_sets)
        utils.save_json(output_dir / "calibration.json", calibration)
        logger.info(f"Calibrated on {args.calibrate_on}: {output_dir / 'calibration.json'}")
    if calibration is None:
        raise utils.CheckpointError(f"{args.checkpoint}: holds no calibration (training was stopped before "
                                    f"it ended?); pass --calibrate-on DIR with normal sessions")
    check_top_k(calibration, top_k)
    if args.detect:
        try:
            out = open(args.output, "w") if args.output else sys.stdout
        except OSError as error:
            raise utils.ConfigError(f"--output {args.output}: cannot write ({error.strerror})") from None
        try:
            totals = detect(model, calibration, args.detect, options, ev.decision_rule, out, ev.batch_size,
                            event_sets)
        finally:
            if args.output:
                out.close()
        logger.info(f"Detection ({ev.decision_rule} rule) on {args.detect}: {totals.get('abnormal', 0)} abnormal, "
                    f"{totals.get('normal', 0)} normal sessions")
        return 0
    if args.data_dir:
        normal, abnormal = collect(args.data_dir, options)
        normal_path = args.data_dir
    else:  # the evaluation half of the validation split, as after training
        _, normal, abnormal = validation_sessions(config, options)
        normal_path = f"{config.data.preprocessed_dir} (validation split, evaluation half)"
    abnormal_dir = args.abnormal_dir or (None if args.data_dir else config.data.abnormal_dir)
    if abnormal_dir:
        abnormal.update(collect(abnormal_dir, options, all_abnormal=True)[1])
    run_evaluation(model, args.checkpoint, calibration, normal, abnormal,
                   {"normal": normal_path, "abnormal": abnormal_dir}, config, output_dir, top_k, args.tag, logger,
                   event_sets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
