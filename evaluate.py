"""Evaluate a DeepLog checkpoint, calibrate its thresholds, or flag abnormal sessions in new data.

Examples:

    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt      # data from the checkpoint's config
    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt \\
        --data-dir ../shared/data/hdfs/hdfs_dev_normal --abnormal-dir ../shared/data/hdfs/hdfs_dev_abnormal
    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt --calibrate-on /data/quiet_day \\
        --data-dir /data/today --tag today                # refit thresholds on other normal sessions first
    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt --detect data/sample/new \\
        --output outputs/detections.jsonl    # detection is detect.py's (live too); this flag runs it

Scores. For every session the model predicts each next event from the start token to the end of the session.
Per session we keep: the anomaly score (fraction of predictions whose actual event is outside the top-k), the
worst rank (DeepLog's rule: abnormal when any event is outside the top-g), the lowest probability the model
gave an actual event and the probability it gave the session's end (the probability rule bounds each), whether
its set of event types ever occurred in a normal training session (the event_set rule), whether every pair
of its event types shared one (the event_pair rule) and how far its event counts are from the nearest normal
training session's (the count_vector rule). The rules and their thresholds are calibration.py's: fitted on
normal sessions only, stored with the model, and never fitted on the data being scored.

Memory does not grow with the data: sessions stream from their source in chunks (CHUNK_SIZE) and every
metric is a sum accumulated chunk by chunk, the same numbers as if every distinct session were scored at
once and weighted by its count. Identical sessions are scored once per chunk, and across chunks while
they are among the MAX_CACHED most recently seen (of at most MAX_CACHED_LENGTH events). In the results,
"distinct" (per side; "distinct_sessions" in calibration and timing) is exact while that cache never
overflowed and null otherwise; "scored" always counts the sessions the model actually scored. Score
percentiles are exact up to calibration.MAX_EXACT_SCORES distinct score values, then taken from a histogram
of calibration.SKETCH_BINS bins, never below the exact value ("percentile_method" says which and how far
above it may be). The scoring time includes reading the data.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import calibration as cal
import detect
import utils
import values
from batches import session_chunks
from calibration import ScoreQuantiles
from checkpoint import (
    CheckpointError,
    co_occurrence_of,
    count_vectors_state,
    load_trained,
    pair_table,
    save_checkpoint,
)
from config import Config, config_from_dict, reader_options
from dataset import (
    CALIBRATION,
    EVALUATION,
    SPLIT_SCHEME,
    TRAIN,
    DataError,
    iter_sessions,
    list_data_files,
    split_class,
)
from rules import (
    MAX_COUNT_VECTORS,
    MAX_RECORD_SESSIONS,
    PERCENTILES,
    RULES,
    CoOccurrence,
    CountVectors,
    anomaly_scores,
    verdicts,
)
from scoring import (
    CHUNK_SIZE,
    MAX_CACHED,
    POSITIONS_PER_SESSION,
    ChunkScorer,
    cache_entries,
    chunked,
    data_chunks,
    file_chunks,
    nonempty,
)
from sweep import FILE_NAME, MAX_LISTED, Sweep, describe, sweep, write_suspicious

ACCURACY_KS = (1, 5, 10, 20)
NOT_SWEPT = ("not swept (data.assume_clean true, or a checkpoint from before the sweep): every "
             "normal-labelled training session was taken as normal")
SCORE_EDGES = np.linspace(0, 1, 41)                                  # the plot's bins of the anomaly score
LOG10_PROBABILITY_EDGES = np.linspace(-30 / math.log(10), 0, 61)     # and of the least likely event's log10 p


def confusion(fp: float, normal: float, tp: float, abnormal: float) -> dict:
    """Counts and rates from the weights flagged abnormal (fp, tp) of the total normal and abnormal weights
    (every session counted as often as it occurs)."""
    tn, fn = normal - fp, abnormal - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn), "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "fpr": fp / (fp + tn) if fp + tn else 0.0}


class SideTotals:
    """What the report needs from one side (normal or abnormal sessions), summed chunk by chunk with every
    session weighted by its count: next-event sums, the anomaly score's mean and spread (per-chunk sums of
    squared deviations merged as in Chan et al., which stays exact where sum x^2 - n mean^2 cancels), its
    percentiles, how often each rule fires, and the fixed-bin histograms of the plot (and "records": the
    weights the record rules of 'combined' flag, and the others, where it takes any)."""

    SUMMED = ("predictions", "loss_sum", "loss_count", "unknown", *(f"misses_at_{k}" for k in ACCURACY_KS))

    def __init__(self, scorer: ChunkScorer, calibration: dict, max_exact_scores: int = cal.MAX_EXACT_SCORES):
        self.scorer, self.calibration = scorer, calibration
        self.sessions = self.score_sum = self.score_squared_deviations = 0.0
        self.sums = dict.fromkeys(self.SUMMED, 0.0)
        self.flagged = dict.fromkeys(RULES, 0.0)
        self.quantiles = ScoreQuantiles(max_exact_scores)
        self.histograms = {"score": np.zeros(len(SCORE_EDGES) - 1),
                           "log10_probability": np.zeros(len(LOG10_PROBABILITY_EDGES) - 1)}
        self.record_rules = record_rules(calibration, scorer.co_occurrence)
        if self.record_rules:   # sessions the record rules of 'combined' flag, and the others
            self.histograms["records"] = np.zeros(2)

    def add(self, chunk: list) -> None:
        _, scores, weights = self.scorer(chunk)
        weight = float(weights.sum())
        if not weight:
            return
        anomaly = anomaly_scores(scores, self.calibration["top_k"])
        for name in self.SUMMED:
            self.sums[name] += float((scores[name] * weights).sum())
        chunk_sum = float((anomaly * weights).sum())
        self.score_squared_deviations += float((weights * (anomaly - chunk_sum / weight) ** 2).sum())
        if self.sessions:
            delta = chunk_sum / weight - self.score_sum / self.sessions
            self.score_squared_deviations += delta ** 2 * self.sessions * weight / (self.sessions + weight)
        self.sessions += weight
        self.score_sum += chunk_sum
        for rule in RULES:
            self.flagged[rule] += float(weights[verdicts(scores, self.calibration, rule)].sum())
        self.quantiles.add(anomaly, weights)
        self.histograms["score"] += np.histogram(anomaly, SCORE_EDGES, weights=weights)[0]
        log10_probability = np.maximum(scores["min_log_prob"], -30) / math.log(10)
        self.histograms["log10_probability"] += np.histogram(log10_probability, LOG10_PROBABILITY_EDGES,
                                                             weights=weights)[0]
        if self.record_rules:
            flagged = verdicts(scores, {**self.calibration, "combined_rules": self.record_rules}, "combined")
            novel = weights[flagged].sum()
            self.histograms["records"] += [novel, weight - novel]

    def counts(self) -> dict:
        return {"count": int(self.sessions), "distinct": self.scorer.distinct, "scored": self.scorer.scored}


def evaluate(model, calibration: dict, normal: Iterable[list], abnormal: Iterable[list], top_k: int,
             default_rule: str, batch_size: int = 256, co_occurrence: CoOccurrence | None = None,
             max_cached: int = MAX_CACHED,
             max_exact_scores: int = cal.MAX_EXACT_SCORES) -> tuple[dict, dict]:
    """Next-event metrics on normal sessions, score statistics and, with abnormal data, each rule's metrics.
    `normal` and `abnormal` are chunks of sessions, each read once, one side after the other. Returns the
    results and, for the plot, each side's histograms."""
    cal.check_top_k(calibration, top_k)
    ks = [*ACCURACY_KS, top_k, calibration["top_g"]]
    sides = {}
    for side, chunks in (("normal", normal), ("abnormal", abnormal)):
        totals = SideTotals(ChunkScorer(model, ks, batch_size, co_occurrence, max_cached, side), calibration,
                            max_exact_scores)
        for chunk in chunks:
            totals.add(chunk)
        if totals.sessions:
            sides[side] = totals
    if not sides:
        raise DataError("no sessions to evaluate")
    results: dict = {"top_k": top_k}
    n, a = sides.get("normal"), sides.get("abnormal")
    if n:
        predictions = n.sums["predictions"]
        results["next_event"] = {
            "loss": n.sums["loss_sum"] / max(n.sums["loss_count"], 1), "total_predictions": int(predictions),
            **{f"top{k}_accuracy": 1 - n.sums[f"misses_at_{k}"] / predictions for k in ACCURACY_KS},
            "classes_seen": int(model.seen_events.sum())}   # at k beyond them, a trained model always hits
        results["normal_scores"] = {
            "mean": n.score_sum / n.sessions, "std": math.sqrt(n.score_squared_deviations / n.sessions),
            **n.counts(), "reference_percentiles": {f"p{q}": n.quantiles.percentile(q) for q in PERCENTILES},
            "percentile_method": n.quantiles.method}
    results["unknown_events"] = {side: int(totals.sums["unknown"]) for side, totals in sides.items()}
    if a:
        results["rules"] = {rule: confusion(n.flagged[rule] if n else 0.0, n.sessions if n else 0.0,
                                            a.flagged[rule], a.sessions) for rule in RULES}
        results["default"] = {"rule": default_rule, **results["rules"][default_rule]}
        results["abnormal_sessions"] = a.counts()
    else:
        results["false_positive_rate"] = {rule: n.flagged[rule] / n.sessions for rule in RULES}
        results["default"] = {"rule": default_rule, "fpr": results["false_positive_rate"][default_rule]}
    return results, {side: totals.histograms for side, totals in sides.items()}


def fit_calibration(model, normal: Iterable[list], top_k: int, top_g: int, target_fpr: float, source: str,
                    default_rule: str, batch_size: int = 256, co_occurrence: CoOccurrence | None = None,
                    max_cached: int = MAX_CACHED, max_exact_scores: int = cal.MAX_EXACT_SCORES,
                    training_sweep: dict | None = None) -> dict:
    """calibration.fit on chunks of normal sessions, scored as evaluate() scores them."""
    scorer = ChunkScorer(model, [top_k, top_g], batch_size, co_occurrence, max_cached, "calibrating")
    return cal.fit(model, scorer, normal, top_k, top_g, target_fpr, source, default_rule, co_occurrence,
                   batch_size * POSITIONS_PER_SESSION, max_exact_scores, training_sweep)


# ----------------------------------------------------------------------------- reports
def output_name(output_dir: Path, prefix: str, checkpoint_path, tag: str | None, suffix: str) -> Path:
    """PREFIX_<checkpoint>_<YYYYmmdd-HHMMSS>[_tag]SUFFIX in output_dir: which checkpoint and when, so that no
    evaluation overwrites or is confused with another (a second one in the same second adds _2, _3, ...)."""
    stem = f"{Path(checkpoint_path).stem}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for unique in [stem] + [f"{stem}_{n}" for n in range(2, 10000)]:
        path = output_dir / f"{prefix}_{unique}{f'_{tag}' if tag else ''}{suffix}"
        if not path.exists():
            return path
    raise OSError(f"{output_dir}: no free name for {prefix}_{stem}")


def write_reports(results: dict, histograms: dict, output_dir: Path, tag: str | None,
                  logger) -> tuple[Path, Path]:
    json_path = output_name(output_dir, "evaluation_results", results["checkpoint"], tag, ".json")
    text_path = json_path.with_name(json_path.name.replace("evaluation_results", "evaluation_report")
                                    .replace(".json", ".txt"))
    utils.save_json(json_path, results)
    utils.atomic_write_text(text_path, format_report(results))
    logger.info(f"Evaluation results: {json_path} | report: {text_path}")
    # named like its report, so that another run (or --tag) never overwrites it
    picture = json_path.name.replace("evaluation_results", "score_distribution").replace(".json", ".png")
    plot_scores(histograms, results, output_dir / picture, logger)
    return json_path, text_path


def abnormal_data(r: dict) -> str:
    """Where abnormal sessions were looked for, and whether any were found (never named as data that the
    report then says was not there)."""
    found = "rules" in r or "false_positive_rate" not in r
    return r["data"]["abnormal"] + ("" if found else " (none found there)")


def format_report(r: dict) -> str:
    lines = ["=" * 72, "DeepLog evaluation report", "=" * 72,
             f"Date:        {r['date']}", f"Checkpoint:  {r['checkpoint']}",
             f"Normal data: {r['data']['normal']}", f"Abnormal:    {abnormal_data(r)}",
             (f"Top-k:       {r['top_k']}    Scoring time: {r['timing']['scoring_seconds']:.1f}s "
              f"({r['timing']['sessions_per_second']:.0f} sessions/s)"), ""]
    if "next_event" in r:
        ne = r["next_event"]
        lines += ["NEXT-EVENT PREDICTION (normal sessions, weighted by event)", "-" * 72,
                  f"  Loss:              {ne['loss']:.4f}", f"  Predictions:       {ne['total_predictions']}"]
        seen = ne.get("classes_seen", math.inf)
        warning = learned_little(ne["loss"], seen if math.isfinite(seen) else 0, "loss on these sessions")
        lines += [f"  WARNING: {warning}"] if warning else []
        lines += [f"  Top-{k:<2} accuracy:   {ne[f'top{k}_accuracy']:.4f}" + (
            f"   (k >= the {seen} classes the model saw in training: a trained model hits every time)"
            if k >= seen else "")
            for k in ACCURACY_KS] + [""]
        ns = r["normal_scores"]
        lines += ["ANOMALY SCORES ON NORMAL DATA (fraction of events outside the top-k)", "-" * 72,
                  f"  Mean: {ns['mean']:.4f}   Std: {ns['std']:.4f}   Sessions: {session_counts(ns)}",
                  "  Percentiles: "
                  + "  ".join(f"{p}={v:.4f}" for p, v in ns["reference_percentiles"].items())
                  + f" ({ns['percentile_method']})",
                  "  (of these scores, for reference: the thresholds applied are the calibrated ones below;",
                  "  evaluate.py --calibrate-on DIR refits those on other normal sessions)", ""]
    c = r["calibration"]
    lines += ["THRESHOLDS APPLIED (fitted on normal sessions only)", "-" * 72,
              f"  Calibrated on: {c['source']} ({c['sessions']} sessions)",
              "  Score thresholds: " + "  ".join(f"{p}={v:.4f}" for p, v in c["score_thresholds"].items()),
              f"  DeepLog top-g: g={c['top_g']}",
              (f"  Probability rule: {cal.probability_rule_text(c)} ({cal.probability_bound_origin(c)}; "
               f"natural logs log_probability_bound {c['log_probability_bound']:.4f}"
               + (f", log_end_probability_bound {c['log_end_probability_bound']:.4f}"
                  if c["log_end_probability_bound"] is not None else "") + " in the JSON)"),
              f"  Event-set rule: {record_state(c, 'event_set', 'event sets')}    "
              f"Event-pair rule: {record_state(c, 'event_pair', 'event pairs')}",
              f"  {cal.rule_summary(c, r['default']['rule'])}",
              *(f"  WARNING: {w}" for w in cal.calibration_warnings(c, r["default"]["rule"])),
              "  Flagged on the calibration sessions (observed there, not the expected rate above): "
              + "  ".join(f"{rule}={rate:.2%}" for rule, rate in c["flagged_on_calibration"].items()), ""]
    swept = c.get("training_sweep")
    lines += ["TRAINING DATA (the sweep of its normal-labelled sessions, sweep.py)", "-" * 72,
              f"  {describe(swept, swept['file'] + ' in the training run') if swept else NOT_SWEPT}", ""]
    unknown = ", ".join(f"{side} {n}" for side, n in r["unknown_events"].items())
    lines += ["EVENTS NEVER SEEN IN TRAINING (IDs >= vocab_size, or absent from the training data)", "-" * 72,
              f"  Occurrences: {unknown}. Each counts as a miss at every k and as probability 0.", ""]
    if "rules" in r:
        lines += ["DETECTION (every session weighted by its count)", "-" * 72,
                  (f"  {'rule':<13}{'precision':>10}{'recall':>9}{'F1':>8}{'FPR':>10}{'TP':>8}{'FP':>7}"
                   f"{'TN':>8}{'FN':>7}")]
        for rule, m in r["rules"].items():
            marker = " *" if rule == r["default"]["rule"] else ""
            lines.append(f"  {rule:<13}{m['precision']:>10.4f}{m['recall']:>9.4f}{m['f1']:>8.4f}"
                         f"{m['fpr']:>10.4%}{m['tp']:>8}{m['fp']:>7}{m['tn']:>8}{m['fn']:>7}{marker}")
        lines += ["  * the default rule: the verdict detection gives", ""]
    elif "false_positive_rate" in r:
        lines += ["FALSE-POSITIVE RATE ON NORMAL DATA (no abnormal sessions in the data)", "-" * 72]
        lines += [f"  {rule:<13}{fpr:.4%}" for rule, fpr in r["false_positive_rate"].items()] + [""]
    if "parameter" in r:
        lines += values.report_lines(r["parameter"])
    return "\n".join(lines) + "\n"


LEARNED_LITTLE = 0.75   # a loss above this share of a uniform guess's: the model learned next to nothing


def learned_little(loss: float, classes: int, what: str = "loss") -> str | None:
    """The warning for a model whose loss stays near a uniform guess over the classes it saw in training
    (ln of their number): it predicts nothing, and every rule built on its probabilities means little."""
    if classes < 3 or not math.isfinite(loss) or loss < LEARNED_LITTLE * math.log(classes):
        return None
    return (f"The model learned next to nothing: its {what} {loss:.4f} is {loss / math.log(classes):.0%} of "
            f"a uniform guess over the {classes} classes seen in training (ln {classes} = "
            f"{math.log(classes):.4f}), so its predictions and the probability rule mean little. Usual "
            "causes: too few epochs or too low a learning rate, too little data, or sessions whose next "
            "event does not follow from the ones before (check the grouping: --session-key, --window)")


def record_state(calibration: dict, rule: str, records: str) -> str:
    """Whether a record rule can fire, and whether the default 'combined' takes it: never 'on' beside a
    'left out' further down."""
    if not calibration[f"{rule}_rule"]:
        return f"off (no record of {records} from training)"
    in_combined = rule in calibration["combined_rules"]
    return "on, in 'combined'" if in_combined else "on alone, left out of 'combined'"


def session_counts(counts: dict) -> str:
    if counts["distinct"] is None:
        return f"{counts['count']} ({counts['scored']} scored; distinct unknown: the score cache overflowed)"
    return f"{counts['count']} ({counts['distinct']} distinct)"


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


def threshold_groups(thresholds: dict[str, float]) -> list[tuple[str, float]]:
    """(label, value) per distinct threshold value, lowest first: equal thresholds share one ("p90=p95")."""
    names_at: dict[float, list[str]] = {}
    for name, value in thresholds.items():
        names_at.setdefault(value, []).append(name)
    return [("=".join(names), value) for value, names in sorted(names_at.items())]


THRESHOLD_STYLES = ("--", "-.", ":")


def draw_thresholds(axis, thresholds: dict[str, float]) -> list:
    """A line at each distinct score threshold, each its own style, named in the legend (below the panel)
    rather than on the panel: a label on the panel hid the bars under it. Under the bars (zorder 1), so a
    threshold at a bar's edge never hides the bar either. The lines."""
    return [axis.axvline(value, linestyle=THRESHOLD_STYLES[rank % len(THRESHOLD_STYLES)], color="black",
                         linewidth=1.2, zorder=1, label=f"{label} threshold {value:.3g}")
            for rank, (label, value) in enumerate(threshold_groups(thresholds))]


RECORD_RULES = {"event_set": "sets", "event_pair": "pairs", "count_vector": "counts"}   # rule: its record


def record_rules(calibration: dict, co_occurrence) -> list[str]:
    """The rules of 'combined' that read a record of the training sessions, where that record is kept."""
    if co_occurrence is None:
        return []
    return [rule for rule in calibration["combined_rules"]
            if rule in RECORD_RULES and getattr(co_occurrence, RECORD_RULES[rule]) is not None]


def record_counts(histograms: dict) -> dict[str, tuple[float, float]] | None:
    """Per side (normal, abnormal): (sessions the record rules of 'combined' flag, the others), every session
    counted as often as it occurs; None when 'combined' takes no record rule."""
    counts = {side: tuple(float(n) for n in h["records"]) for side, h in histograms.items() if "records" in h}
    return counts or None


SIDE_COLORS = {"normal": "tab:blue", "abnormal": "tab:red"}


def plot_scores(histograms: dict, results, path: Path, logger) -> None:
    """Normal vs abnormal score histograms (as evaluate() accumulates them: side -> {"score",
    "log10_probability"} counts over SCORE_EDGES, LOG10_PROBABILITY_EDGES, and "co_occurrence" when the
    event types seen together in training are known) with the thresholds marked, and how many sessions of
    each side the event-set or event-pair rule flags (matplotlib is optional). Sides are outlines, so that
    neither hides the other; legends sit below the panels, off the bars."""
    plt = pyplot_or_note(path.name, logger)
    if plt is None:
        return
    calibration, top_k = results["calibration"], results["top_k"]
    figure, (left, right, sets) = plt.subplots(1, 3, figsize=(17, 5.2),
                                               gridspec_kw={"width_ratios": [5, 5, 3]})
    for side, counts in histograms.items():  # one value per bin, weighted by the bin's count
        style = dict(histtype="step", linewidth=1.8, color=SIDE_COLORS.get(side),
                     label=f"{side} sessions ({counts['score'].sum():.0f})")
        left.hist(SCORE_EDGES[:-1], SCORE_EDGES, weights=counts["score"], **style)
        right.hist(LOG10_PROBABILITY_EDGES[:-1], LOG10_PROBABILITY_EDGES, weights=counts["log10_probability"],
                   **style)
    draw_thresholds(left, calibration["score_thresholds"])
    left.set(title=f"anomaly score: share of events outside the top-{top_k}", xlabel="score",
             ylabel="sessions", yscale="log",
             xlim=data_range(SCORE_EDGES, histograms, "score", calibration["score_thresholds"].values()))
    draw_probability_panel(right, calibration, histograms)
    for axis in (left, right):
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
        plain_counts(axis)
        axis.set_ylim(top=axis.get_ylim()[1] * (2 if axis.get_yscale() == "log" else 1))  # headroom
    draw_records_panel(sets, record_counts(histograms), calibration["combined_rules"])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    logger.info(f"Score distribution plot: {path}")


def draw_probability_panel(axis, calibration: dict, histograms: dict) -> None:
    """The least likely prediction of each session (an event, or its end) against the probability rule's
    two bounds, each drawn and named; the leftmost bin (p = 0: an event never seen in training) is named."""
    axis.axvline(calibration["log_probability_bound"] / math.log(10), color="black", linestyle="--",
                 label=f"event bound p={math.exp(calibration['log_probability_bound']):.2g}")
    if calibration["log_end_probability_bound"] is not None:
        axis.axvline(calibration["log_end_probability_bound"] / math.log(10), color="tab:orange",
                     linestyle=":", linewidth=2,
                     label=f"end-of-session bound p={math.exp(calibration['log_end_probability_bound']):.2g}")
    bounds = [b / math.log(10) for b in (calibration["log_probability_bound"],
                                         calibration["log_end_probability_bound"]) if b is not None]
    axis.set(title="least likely prediction per session (an actual event, or the end)",
             xlabel="log10 probability the model gave it", ylabel="sessions", yscale="log",
             xlim=data_range(LOG10_PROBABILITY_EDGES, histograms, "log10_probability", bounds))
    if any(counts["log10_probability"][0] for counts in histograms.values()):
        axis.annotate(f"leftmost bar: p = 0 (an event\nnever seen in training)\nor p < {math.exp(-30):.0e}",
                      (LOG10_PROBABILITY_EDGES[0], 0.6), xycoords=("data", "axes fraction"), xytext=(6, 0),
                      textcoords="offset points", fontsize=8,
                      bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})


def data_range(edges: np.ndarray, histograms: dict, name: str, marks) -> tuple[float, float]:
    """The x range of a histogram panel: the bins that hold sessions and the thresholds drawn, with a margin
    on each side, so that the data fills the panel and a bar at its edge stays in view."""
    filled = [i for counts in histograms.values() for i in np.flatnonzero(counts[name])]
    points = [*(edges[i] for i in filled), *(edges[i + 1] for i in filled), *marks]
    low, high = (min(points), max(points)) if points else (edges[0], edges[-1])
    margin = max(high - low, edges[1] - edges[0]) * 0.04
    return low - margin, high + margin


def plain_counts(axis) -> None:
    """Counts labelled as counts: a linear axis of whole numbers up to 20 sessions a bin, else log-scale
    labelled 1, 10, 100 (never 2x10^0, 3x10^0 on a short range)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
    top = axis.get_ylim()[1]
    if top <= 20:
        axis.set_yscale("linear")
        axis.set_ylim(0, top * 1.1)   # headroom: the tallest bar never touches the frame
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        return
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())


def draw_records_panel(axis, counts: dict[str, tuple[float, float]] | None, combined: list[str]) -> None:
    """Bars: per side, the sessions the record rules of 'combined' flag (event types never seen together in
    a normal training session, event counts unlike any) and the others; or a note when 'combined' takes
    none."""
    parts = [rule for rule in combined if rule in RECORD_RULES]
    axis.set_title("record rules in 'combined'\n(" + (", ".join(parts) or "none") + ")")
    if counts is None:
        axis.text(0.5, 0.5, "'combined' takes no rule that reads a\nrecord of the training sessions",
                  ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    sides = list(counts)
    positions = np.arange(len(sides))
    for offset, (label, column, color) in enumerate((("flagged", 0, "tab:red"),
                                                     ("not flagged", 1, "tab:gray"))):
        values = [counts[side][column] for side in sides]
        bars = axis.bar(positions + (offset - 0.5) * 0.4, values, 0.4, label=label, color=color)
        axis.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
    axis.set_xticks(positions, [f"{side} sessions" for side in sides])
    axis.set(ylabel="sessions")
    axis.margins(y=0.15)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)


# ----------------------------------------------------------------------------- entry points
def run_evaluation(model, checkpoint_path, calibration, normal, abnormal, data_paths, config, output_dir,
                   top_k, tag, logger, co_occurrence, extra: dict | None = None) -> dict:
    started = time.time()
    ev = config.evaluation
    results, histograms = evaluate(model, calibration, normal, abnormal, top_k, ev.decision_rule,
                                   ev.batch_size, co_occurrence)
    elapsed = time.time() - started  # reading and scoring: the data streams while it is scored
    sides = [results[key] for key in ("normal_scores", "abnormal_sessions") if key in results]
    sessions, distinct = sum(side["count"] for side in sides), [side["distinct"] for side in sides]
    results = {"date": datetime.now().isoformat(timespec="seconds"), "checkpoint": str(checkpoint_path),
               "data": data_paths, "calibration": calibration,
               "timing": {"scoring_seconds": elapsed, "sessions": sessions,
                          "distinct_sessions": None if None in distinct else sum(distinct),
                          "scored_sessions": sum(side["scored"] for side in sides),
                          "sessions_per_second": sessions / max(elapsed, 1e-9)}, **results, **(extra or {})}
    unseen, predictions = results["unknown_events"].get("normal", 0), results.get("next_event", {}).get(
        "total_predictions", 0)
    if predictions and unseen > 0.05 * predictions:
        logger.warning(f"{unseen} of {predictions} events in the normal data were never seen in training: "
                       f"is this checkpoint trained on this kind of data (vocab_size, event IDs)?")
    ne = results.get("next_event", {})
    warning = learned_little(ne.get("loss", 0.0), ne.get("classes_seen", 0), "loss on these sessions")
    if warning:
        logger.warning(warning)
    write_reports(results, histograms, Path(output_dir), tag, logger)
    for line in format_report(results).splitlines()[4:]:  # the report, without its title, into the log
        if line.strip():
            logger.info(line)
    return results


def log_rule(calibration: dict, rule: str, logger) -> None:
    """The decision rule and its expected false-positive rate, and a WARNING for what it cannot promise."""
    logger.info(cal.rule_summary(calibration, rule))
    for warning in cal.calibration_warnings(calibration, rule):
        logger.warning(warning[0].upper() + warning[1:])


def store_calibration(checkpoint_path, checkpoint: dict, calibration: dict, output_dir: Path) -> None:
    """Into the checkpoint (atomic rewrite) and calibration.json beside the outputs."""
    checkpoint["calibration"] = calibration
    save_checkpoint(checkpoint, checkpoint_path)
    cal.save_calibration(output_dir / "calibration.json", calibration)


def validation_sessions(config: Config, options: dict, chunk_size: int = CHUNK_SIZE,
                        logger=None) -> tuple[Iterator[list], Iterator[list], Iterator[list]]:
    """Chunks of the training data, each source one pass when iterated: the calibration and evaluation
    halves of its normal validation split (halved by another hash, so neither ever scores what the other
    fitted), and the sessions labelled abnormal. With validation_split 0 the halves come from all normal
    sessions. With lazy_loading.cache they come from the training run's token cache."""
    data, seed = config.data, config.training.seed
    if config.lazy_loading.cache:
        entries = cache_entries(data.preprocessed_dir, config, config.model.vocab_size, logger)
        return tuple(session_chunks(entries, wanted, chunk_size)
                     for wanted in ("calibration", "evaluation", "abnormal"))

    def normal_half(fitting: bool) -> Iterator[list[int]]:
        for r in iter_sessions(data.preprocessed_dir, None, **options):
            side = split_class(r.file, r.index, seed, data.validation_split, data.overlap)
            if not data.validation_split:   # the halves of every session (the cache's FLAG_CALIBRATION)
                half = split_class(r.file, r.index, seed, 1.0, data.overlap)
                side = CALIBRATION if half == CALIBRATION else EVALUATION
            if not r.label and side == (CALIBRATION if fitting else EVALUATION):
                yield r.event_ids

    return (chunked(normal_half(True), chunk_size), chunked(normal_half(False), chunk_size),
            file_chunks(data.preprocessed_dir, options, abnormal=True, chunk_size=chunk_size))


def training_sessions(config: Config, options: dict, logger=None) -> Iterator[list]:
    """Chunks of the normal sessions the model trained on (outside the validation split), one pass."""
    data, seed = config.data, config.training.seed
    if config.lazy_loading.cache:
        return session_chunks(cache_entries(data.preprocessed_dir, config, config.model.vocab_size, logger),
                              "train")
    return chunked(r.event_ids for r in iter_sessions(data.preprocessed_dir, None, **options)
                   if not r.label and split_class(r.file, r.index, seed, data.validation_split,
                                                  data.overlap) == TRAIN)


def record_count_vectors(checkpoint: dict, co_occurrence: CoOccurrence, config: Config, options: dict,
                         logger, swept: Sweep | None = None) -> None:
    """The event-count vectors of the training sessions, into the checkpoint ("count_vectors") and the record
    the rules use; None (not kept) beyond MAX_COUNT_VECTORS distinct ones. With a sweep: without the sessions
    it found suspicious, and without the count-vector outliers (which it then counts as suspicious)."""
    sessions = training_sessions(config, options, logger)
    counts = CountVectors.from_chunks(swept.kept(sessions) if swept else sessions, MAX_RECORD_SESSIONS)
    if counts is not None and swept is not None:
        counts = swept.trim_count_outliers(counts)
    co_occurrence.counts = counts
    checkpoint["count_vectors"] = count_vectors_state(counts)
    if counts is None:
        logger.info(f"Count-vector record: not kept (more than {MAX_COUNT_VECTORS} distinct event-count "
                    "vectors in the training sessions): the count-vector rule is off")
    else:
        capped = counts.sessions >= MAX_RECORD_SESSIONS
        first = f" (the first {MAX_RECORD_SESSIONS:,} of them)" if capped else ""
        logger.info(f"Count-vector record: {len(counts.weights)} distinct event-count vectors of "
                    f"{counts.sessions} normal training sessions{first}")


def sweep_training_data(model, checkpoint: dict, co_occurrence: CoOccurrence, config: Config, options: dict,
                        output_dir: Path, logger) -> tuple[Sweep, CoOccurrence]:
    """The sweep of the normal-labelled training sessions (sweep.py): logged, the suspicious ones written to
    output_dir/suspicious_sessions.jsonl, and the records (sets, pairs, count vectors) without them, into the
    checkpoint too."""
    data = config.data
    if config.lazy_loading.cache:
        normal = session_chunks(cache_entries(data.preprocessed_dir, config, config.model.vocab_size, logger),
                                "normal")
    else:
        normal = file_chunks(data.preprocessed_dir, options, abnormal=False)
    scorer = ChunkScorer(model, [1], config.evaluation.batch_size, desc="sweeping")
    found = sweep(scorer, normal, co_occurrence.sets is not None, int(model.seen_events.sum()))
    cleaned = found.cleaned(co_occurrence)
    if cleaned is not co_occurrence:
        checkpoint["event_sets"] = sorted(sorted(s) for s in cleaned.sets)
        checkpoint["event_pairs"] = pair_table(cleaned)
    record_count_vectors(checkpoint, cleaned, config, options, logger, found)
    path = output_dir / FILE_NAME
    records = (r for r in iter_sessions(data.preprocessed_dir, None, **options) if not r.label)
    listed = write_suspicious(found, records, path, data.preprocessed_dir) if found.suspicious else 0
    if not found.suspicious:
        utils.atomic_write_text(path, "")
    elif listed < MAX_LISTED:
        # the file's pass sees every normal-labelled session: exact where the sweep's own count is not
        # (a count-vector outlier of the training split may repeat in the validation split)
        found.suspicious = listed
    logger.info(f"Training-data sweep: {describe(found.summary(), path)}"
                + (f" (the first {listed:,})" if listed < found.suspicious else ""))
    if found.share > 2 * config.evaluation.target_fpr:
        logger.warning(
            f"{found.share:.2%} of the training sessions look abnormal, more than the target false-positive "
            f"rate allows ({cal.percent(config.evaluation.target_fpr)}): if they are anomalies, the "
            "records and thresholds were kept free of them; if they are normal, new sessions like them will "
            f"be flagged, up to {found.share:.2%} of normal sessions (added to the expected rates). Review "
            f"{path}: the lines of sessions that are normal can be fed back (train.py --update "
            "CHECKPOINT --feedback FILE), or, if all are, set data.assume_clean true and train again; if "
            "they are incidents, nothing to do")
    return found, cleaned


def after_training(checkpoint_path, config: Config, logger) -> dict:
    """Called by train.py: calibrate on half of the normal validation split, evaluate on the other half
    (plus abnormal sessions: labelled 1 in the training data, and data.abnormal_dir)."""
    output_dir, data, ev = Path(config.training.output_dir), config.data, config.evaluation
    plot_training_curve(output_dir, logger)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_trained(checkpoint_path, device)
    co_occurrence = co_occurrence_of(checkpoint)
    options = reader_options(config)
    if data.validation_split == 0:
        logger.warning("data.validation_split is 0: thresholds are fitted on sessions the model trained on")
    swept = None
    if data.assume_clean:
        record_count_vectors(checkpoint, co_occurrence, config, options, logger)
    else:
        swept, co_occurrence = sweep_training_data(model, checkpoint, co_occurrence, config, options,
                                                   output_dir, logger)
    calibration_set, source, normal, abnormal = calibration_sessions(config, options, logger)
    parameter = parameter_stage(checkpoint, config, logger, swept)   # stored with the calibration: one write
    top_k, top_g = ranks_within_reach(model, ev.top_k, ev.top_g, logger)
    calibration = fit_calibration(model, calibration_set, top_k, top_g, ev.target_fpr, source,
                                  ev.decision_rule, ev.batch_size, co_occurrence,
                                  training_sweep=swept.summary() if swept else None)
    store_calibration(checkpoint_path, checkpoint, calibration, output_dir)
    log_rule(calibration, ev.decision_rule, logger)
    if data.abnormal_dir:
        abnormal = itertools.chain(abnormal, data_chunks(data.abnormal_dir, config, "all", logger))
    paths = {"normal": f"{data.preprocessed_dir} (validation split, evaluation half)",
             "abnormal": ", ".join(filter(None, [data.abnormal_dir, f"label 1 in {data.preprocessed_dir}"]))}
    extra = {"parameter": values.evaluate_parameter_model(parameter, config)} if parameter else None
    return run_evaluation(model, checkpoint_path, calibration, normal, abnormal, paths, config, output_dir,
                          top_k, None, logger, co_occurrence, extra)


def calibration_sessions(config: Config, options: dict, logger, after: str = ""):
    """(sessions to fit the thresholds on, how the report names them, the evaluation half, the abnormal
    sessions): the calibration half of the normal validation split; where it holds none (tiny data), the
    evaluation half, named so, with a WARNING: the report then scores the sessions the thresholds were
    fitted on."""
    calibration_set, normal, abnormal = validation_sessions(config, options, logger=logger)
    where = f"validation split of {config.data.preprocessed_dir}"
    found = nonempty(calibration_set)
    if found is not None:
        return found, f"{where} (calibration half){after}", normal, abnormal
    logger.warning("The calibration half of the validation split holds no normal session (too little "
                   "data): the thresholds are fitted on the evaluation half, the very sessions the report "
                   "scores, so its false-positive figures are not held out; raise data.validation_split or "
                   "add data")
    return (validation_sessions(config, options, logger=logger)[1],
            f"{where} (the evaluation half, as the calibration half is empty: not held out){after}", normal,
            abnormal)


def parameter_stage(checkpoint: dict, config: Config, logger, swept: Sweep | None = None):
    """values.stage, without the training sessions the sweep found suspicious."""
    leave_out = (lambda events: bool(swept.flags([events])[0])) if swept is not None and swept.suspicious \
        else None
    return values.stage(checkpoint, config, logger, leave_out)


def ranks_within_reach(model, top_k: int, top_g: int, logger) -> tuple[int, int]:
    """top_k and top_g to fit thresholds at: the config's, unless they reach the number of classes the model
    saw in training (its event types and the end of session). At a k that high a trained model ranks every
    event it knows within the top-k, so the score and top_g rules can never fire. Then both are scaled to a
    third of those classes, with a warning."""
    classes = int(model.seen_events.sum())
    if top_k < classes and top_g < classes:
        return top_k, top_g
    reach = max(1, classes // 3)
    scaled = min(top_k, reach), min(top_g, reach)
    logger.warning(f"evaluation.top_k {top_k} and top_g {top_g} are not below the {classes} classes "
                   f"the model saw in training ({classes - 1} event types and the end of session): every "
                   "event it knows would be within them, so the score and top_g rules could never fire. "
                   f"Fitting at top_k {scaled[0]} and top_g {scaled[1]} (a third of them; set "
                   "evaluation.top_k and top_g below that number to choose)")
    return scaled


def plot_training_curve(output_dir: Path, logger) -> None:
    plt = pyplot_or_note("training_curve.png", logger)
    if plt is None:
        return
    history = json.loads((output_dir / "training_history.json").read_text())
    from matplotlib.ticker import MaxNLocator

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    loss_axis.plot(history["epoch"], history["val_loss"], "o-", label="validation loss")
    loss_axis.set(xlabel="epoch", ylabel="loss (cross-entropy per event)", title="training")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole, even in short runs
    lr_axis = loss_axis.twinx()
    lr_axis.plot(history["epoch"], history["learning_rate"], "k:", label="learning rate (right axis)")
    lr_axis.set_ylabel("learning rate at the epoch's end")
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "training_curve.png", dpi=100)
    plt.close(figure)
    logger.info(f"Training curve plot: {output_dir / 'training_curve.png'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--data-dir", help="sessions to evaluate: label 0 (or none) normal, label 1 abnormal "
                        "(default: the checkpoint config's validation split)")
    parser.add_argument("--abnormal-dir", help="sessions that are all abnormal, whatever their label")
    parser.add_argument("--output-dir", help="where reports go (default: the checkpoint's output_dir)")
    parser.add_argument("--top-k", type=int, help="k of the anomaly score (default: evaluation.top_k)")
    parser.add_argument("--rule", choices=RULES, help="decision rule (default: evaluation.decision_rule)")
    parser.add_argument("--calibrate-on", help="refit the thresholds on these normal sessions first "
                        "(saved as OUTPUT_DIR/calibration_CHECKPOINT_TIME.json; never the data being scored)")
    parser.add_argument("--calibration", help="use thresholds from this calibration.json")
    parser.add_argument("--detect", help="score these sessions without metrics: one JSON line per session")
    parser.add_argument("--output", help="with --detect: write the JSON lines here (default: stdout)")
    parser.add_argument("--parser-state", help="with --detect: the path holds raw log files, parsed and "
                                               "grouped "
                        "through this parser_state.json of preprocess.py (the same event IDs as training)")
    parser.add_argument("--tag", help="added to the report file names")
    parser.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records instead "
                                                                        "of "
                        "stopping (data.skip_bad_records)")
    args = parser.parse_args(argv)
    if args.parser_state and not args.detect:
        parser.error("--parser-state reads raw logs for --detect: give --detect PATH too")
    return args


def check_calibration_is_apart(args, config: Config) -> None:
    """Thresholds are never fitted on sessions that are then scored: the files of --calibrate-on may share
    none with the scored ones (the files under --data-dir, --abnormal-dir and --detect or, by default,
    the checkpoint's training data, whose evaluation half would be scored), compared as resolved paths."""
    scored = [p for p in (args.data_dir, args.abnormal_dir, args.detect) if p]
    if not args.data_dir and not args.detect:
        scored.append(config.data.preprocessed_dir)
    calibration_files = {f.resolve() for f in list_data_files(args.calibrate_on)}
    for path in scored:
        shared = sorted(str(f) for f in calibration_files & {f.resolve() for f in list_data_files(path)})
        if shared:
            raise utils.ConfigError(f"--calibrate-on {args.calibrate_on} shares {len(shared)} file(s) with "
                                    f"the sessions being scored ({path}), e.g. {shared[0]}: thresholds must "
                                    "be fitted on other normal sessions")


def check_stored_thresholds_are_apart(args, config: Config, calibration: dict) -> None:
    """Thresholds fitted on the calibration half of the checkpoint's training data (the default) must not be
    evaluated on that data: --data-dir or --abnormal-dir sharing a file with it would score the sessions the
    thresholds were fitted on. (Without --data-dir, evaluate.py scores the other half: that is apart.)"""
    if not calibration["source"].startswith("validation split of "):
        return
    try:
        training_files = {f.resolve() for f in list_data_files(config.data.preprocessed_dir)}
    except DataError:
        return  # the training data has moved: nothing of it can be scored by path
    for flag, path in (("--data-dir", args.data_dir), ("--abnormal-dir", args.abnormal_dir)):
        scored = {f.resolve() for f in list_data_files(path)} if path else set()
        shared = sorted(str(f) for f in training_files & scored)
        if shared:
            raise utils.ConfigError(f"{flag} {path} shares {len(shared)} file(s) with the training data "
                                    f"{config.data.preprocessed_dir}, e.g. {shared[0]}, whose validation "
                                    "split's calibration half fitted the thresholds applied: evaluate other "
                                    "data, omit --data-dir to score the split's other half, or refit with "
                                    "--calibrate-on DIR")


def main(argv=None):
    args = parse_args(argv)
    logger = logging.getLogger("deeplog")
    utils.StopSignal(raise_now=True)   # a stop signal ends the work at once, with one line saying so
    return utils.exit_on_user_error(lambda: run(args, logger), logger)


def run(args, logger):
    """evaluate.py: the thresholds to apply (stored, given or fitted now), then detection or the
    evaluation."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_trained(args.checkpoint, device)
    co_occurrence = co_occurrence_of(checkpoint)
    config = config_from_dict(checkpoint["config"])
    ev = config.evaluation
    if args.rule:
        ev.decision_rule = args.rule
    output_dir = Path(args.output_dir or config.training.output_dir)
    to_stdout = args.detect and not args.output
    utils.setup_logger(None if to_stdout else str(output_dir), log_file="evaluation.log", logger=logger)
    if to_stdout:  # keep stdout for the JSON lines
        logger.handlers[0].setStream(sys.stderr)
    config.data.skip_bad_records = config.data.skip_bad_records or args.skip_bad_records
    calibration = applied_calibration(args, model, checkpoint, co_occurrence, config, output_dir, logger)
    top_k = calibration["top_k"]   # --top-k, when given, is the calibration's (checked)
    if args.detect:   # detection is detect.py's; this flag stays for the commands written before it
        return detect.run_batch(args, model, calibration, co_occurrence, config, logger)
    normal, abnormal, paths = evaluation_sources(args, checkpoint, config, logger)
    run_evaluation(model, args.checkpoint, calibration, normal, abnormal, paths, config, output_dir, top_k,
                   args.tag, logger, co_occurrence)
    return 0


def applied_calibration(args, model, checkpoint: dict, co_occurrence, config: Config, output_dir: Path,
                        logger) -> dict:
    """The thresholds this run applies: fitted now on --calibrate-on (and saved), read from --calibration,
    or stored in the checkpoint; never fitted on the data being scored."""
    ev = config.evaluation
    calibration = checkpoint.get("calibration")
    if args.calibration:
        calibration = cal.load_calibration(args.calibration)
    if args.calibrate_on:
        check_calibration_is_apart(args, config)
        if "count_vectors" not in checkpoint and Path(config.data.preprocessed_dir).exists():
            # a checkpoint the evaluation after training never completed (epoch_N.pt, a stopped run):
            # the record of its training sessions, from the training data, for the rule plan
            record_count_vectors(checkpoint, co_occurrence, config, reader_options(config), logger)
        normal = data_chunks(args.calibrate_on, config, "normal", logger)
        top_k, top_g = (args.top_k, ev.top_g) if args.top_k else \
            ranks_within_reach(model, ev.top_k, ev.top_g, logger)   # a --top-k given is taken as it is
        # the records are the checkpoint's, so is what the sweep of its training data found
        stored_sweep = (checkpoint.get("calibration") or {}).get("training_sweep")
        calibration = fit_calibration(model, normal, top_k, top_g, ev.target_fpr, args.calibrate_on,
                                      ev.decision_rule, ev.batch_size, co_occurrence,
                                      training_sweep=stored_sweep)
        # beside the run's own calibration.json, never over it: named after the checkpoint and the time
        path = output_name(output_dir, "calibration", args.checkpoint, args.tag, ".json")
        cal.save_calibration(path, calibration)
        logger.info(f"Calibrated on {args.calibrate_on}: {path} (pass it to --calibration to reuse it)")
    if calibration is None:
        raise CheckpointError(f"{args.checkpoint}: holds no calibration (its training was stopped "
                                    "before the end, or ran with evaluate_after_training false); pass "
                                    "--calibrate-on DIR with normal sessions")
    cal.check_top_k(calibration, args.top_k or calibration["top_k"])
    if not args.calibrate_on:
        check_stored_thresholds_are_apart(args, config, calibration)
    origin = ("fitted now, --calibrate-on" if args.calibrate_on
              else f"from {args.calibration}" if args.calibration else f"stored in {args.checkpoint}")
    logger.info(f"Thresholds applied: {origin}; fitted on {calibration['source']} at "
                f"{calibration['fitted_at'] or 'an unknown time'}")
    log_rule(calibration, ev.decision_rule, logger)
    return calibration


def evaluation_sources(args, checkpoint: dict, config: Config,
                       logger) -> tuple[Iterator, Iterator, dict]:
    """The normal and abnormal chunks to evaluate, and where each came from: --data-dir (its labels) or the
    evaluation half of the checkpoint's validation split, plus --abnormal-dir (or the config's)."""
    if args.data_dir:
        normal = data_chunks(args.data_dir, config, "normal", logger)
        abnormal = data_chunks(args.data_dir, config, "abnormal", logger)
        normal_path = args.data_dir
    else:  # the evaluation half of the validation split, as after training
        if checkpoint.get("split_scheme") != SPLIT_SCHEME:
            raise CheckpointError(f"{args.checkpoint} was trained with an earlier assignment of "
                                        "sessions to the validation split, which this version cannot "
                                        "reproduce: pass --data-dir with sessions it never trained on")
        _, normal, abnormal = validation_sessions(config, reader_options(config), logger=logger)
        normal_path = f"{config.data.preprocessed_dir} (validation split, evaluation half)"
    abnormal_dir = args.abnormal_dir or (None if args.data_dir else config.data.abnormal_dir)
    if abnormal_dir:
        abnormal = itertools.chain(abnormal, data_chunks(abnormal_dir, config, "all", logger))
    # where the abnormal sessions come from: the labels of the scored data, and the abnormal directory
    labelled = f"label 1 in {args.data_dir or config.data.preprocessed_dir}"
    sources = ", ".join(filter(None, [abnormal_dir, labelled]))
    return normal, abnormal, {"normal": normal_path, "abnormal": sources}


if __name__ == "__main__":
    sys.exit(main())
