"""Calibration: the thresholds fitted for the decision rules on normal sessions, and the file that holds them.

Examples:

    import calibration
    fitted = calibration.load_calibration("outputs/calibration.json")     # validated, older forms upgraded
    print(calibration.rule_summary(fitted, "combined"))

    python evaluate.py --checkpoint outputs/checkpoints/best_model.pt --calibrate-on /data/quiet_day \\
        --data-dir /data/today                                            # refit, then evaluate

The rules themselves (what each tests) are rules.py's. Each is fitted here (`fit`) on normal sessions only:
its threshold, the share of calibration sessions it flagged, and the false-positive rate to expect from it
(`expected_rates`), side by side with the rule that applies it.

The file. A calibration is a dict of plain types, saved in the checkpoint ("calibration") and as
calibration.json; `save_calibration` writes it (validated, atomically), `validate` checks a loaded one: every
key's type and range, with one CalibrationError naming the file and the key. Forms written by earlier
versions (no "version", "probability_bound" for "log_probability_bound", no end-of-session bound, no
"combined_rules") are upgraded to this one by `upgrade`, the one place that knows them.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from datetime import datetime

import numpy as np
import torch

import utils
from model import DeepLog
from rules import COMBINABLE, PERCENTILES, RULES, CoOccurrence, anomaly_scores, verdicts
from tokens import IGNORE_INDEX

VERSION = 3                    # 3: "version" itself and the checks of validate(); 2 and earlier: no field
MAX_EXACT_SCORES = 200_000     # distinct anomaly-score values kept exactly for the percentiles
SKETCH_BINS = 2 ** 16          # beyond them: histogram bins over [0, 1]


class CalibrationError(utils.UserError):
    """A calibration that is damaged, of an unknown form, or does not fit the model; the message names it."""


def check_top_k(calibration: dict, top_k: int) -> None:
    if top_k != calibration["top_k"]:
        raise CalibrationError(f"the stored thresholds were fitted at top_k={calibration['top_k']}; "
                               f"refit them with --calibrate-on DIR to use --top-k {top_k}")


# ----------------------------------------------------------------------------- the file
def _rate(value) -> bool:
    return 0 <= value <= 1


def _log_bound(value) -> bool:
    return value <= 0  # a NaN fails every comparison, so it fails here too


def _rules_of(value, allowed) -> bool:
    return set(value) <= set(allowed)


# sweep.Sweep.summary: what the sweep of the training data found (the last three: two bools, a file name)
SWEEP_KEYS = ("sessions", "suspicious_sessions", "share", "cut", "median", "mad", "spread", "removed_sets",
              "count_outliers", "by_sets", "informed", "file")
NOVELTY = ("event_type", "event_set", "event_pair")     # what a training session may bring that no other has
# key: (types, check of the value, the check in words); None among the types: the key may be null
SCHEMA = {
    "version": ((int,), lambda v: v == VERSION, f"{VERSION}"),
    "top_k": ((int,), lambda v: v >= 1, ">= 1"),
    "top_g": ((int,), lambda v: v >= 1, ">= 1"),
    "default_rule": ((str,), lambda v: v in RULES, f"one of {', '.join(RULES)}"),
    "source": ((str,), None, ""),
    "fitted_at": ((str, None), None, ""),
    "sessions": ((int,), lambda v: v >= 1, ">= 1"),
    "distinct_sessions": ((int, None), lambda v: v >= 0, ">= 0"),
    "scored_sessions": ((int,), lambda v: v >= 0, ">= 0"),
    "score_thresholds": ((dict,), lambda v: set(v) == {f"p{q}" for q in PERCENTILES}, "p90, p95 and p99"),
    "percentile_method": ((str,), None, ""),
    "least_likely_normal_log_prob": ((float,), _log_bound, "<= 0"),
    "target_fpr": ((float, None), lambda v: 0 < v < 0.5, "in (0, 0.5)"),
    "log_probability_bound": ((float,), _log_bound, "<= 0 (a natural log)"),
    "probability_bound_method": ((str,), None, ""),
    "log_end_probability_bound": ((float, None), _log_bound, "<= 0 (a natural log)"),
    "end_probability_bound_method": ((str, None), None, ""),
    "event_set_rule": ((bool,), None, ""),
    "event_pair_rule": ((bool,), None, ""),
    "flagged_on_calibration": ((dict,), lambda v: _rules_of(v, RULES), "keyed by rules"),
    "combined_rules": ((list,), lambda v: all(isinstance(r, str) for r in v) and 0 < len(v) == len(set(v))
                       and _rules_of(v, COMBINABLE),
                       f"distinct rules among {', '.join(COMBINABLE)}"),
    "unseen_events_flag": ((bool,), None, ""),
    "count_vector_distance": ((float, None), lambda v: v >= 0, ">= 0"),
    "training_sessions": ((int, None), lambda v: v >= 1, ">= 1"),
    "novelty_on_training": ((dict, None), lambda v: set(v) == set(NOVELTY), f"keyed by {', '.join(NOVELTY)}"),
    "novelty_is_normal": ((dict, None), lambda v: set(v) == set(NOVELTY), f"keyed by {', '.join(NOVELTY)}"),
    "expected_fpr": ((dict, None), lambda v: _rules_of(v, RULES), "keyed by rules"),
    "training_sweep": ((dict, None), lambda v: set(v) == set(SWEEP_KEYS) and all(
        isinstance(v[k], (int, float)) and not isinstance(v[k], bool) and v[k] >= 0 for k in SWEEP_KEYS[:-3])
        and isinstance(v["by_sets"], bool) and isinstance(v["informed"], bool) and isinstance(v["file"], str)
        and v["share"] <= 1,
        "the sweep's figures (sweep.Sweep.summary)"),
}
# inside the mappings: (key of the mapping, types of its values, check, in words)
VALUES = {"score_thresholds": ((float,), _rate, "in [0, 1]"),
          "flagged_on_calibration": ((float,), _rate, "in [0, 1]"),
          "expected_fpr": ((float,), _rate, "in [0, 1]"),
          "novelty_on_training": ((int,), lambda v: v >= 0, ">= 0"),
          "novelty_is_normal": ((bool,), None, ""), "combined_rules": ((str,), None, "")}


def _type_ok(value, types: tuple) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True   # JSON writes 2.0 as 2.0, but a hand-edited file may say 2
    return any(t is not None and isinstance(value, t) for t in types)


INT_RANGE = 2 ** 63   # ints (also where a number goes) must fit 64 bits: torch, numpy and floats take them


def _out_of_range(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and not -INT_RANGE <= value < INT_RANGE


def _type_words(types: tuple) -> str:
    return " or ".join("null" if t is None else {float: "a number"}.get(t, t.__name__) for t in types)


def validate(calibration, source: str) -> dict:
    """The calibration (in the current form: upgrade() first), with ints of number keys made floats, or one
    CalibrationError naming `source` and the first key that is missing, unknown, mistyped or out of range."""
    if not isinstance(calibration, dict):
        raise CalibrationError(f"{source}: not a calibration (a {type(calibration).__name__}, not a mapping)")
    unknown = sorted((key for key in calibration if key not in SCHEMA), key=repr)   # a checkpoint's: any type
    if unknown:
        raise CalibrationError(f"{source}: unknown key {_excerpt(unknown[0])} "
                               f"(not a calibration of this version?)")
    missing = [key for key in SCHEMA if key not in calibration]
    if missing:
        raise CalibrationError(f"{source}: not a calibration (missing {', '.join(missing)})")
    checked = {}
    for key, (types, check, words) in SCHEMA.items():
        value = calibration[key]
        if not _type_ok(value, types):
            raise CalibrationError(f"{source}: '{key}' must be {_type_words(types)}, "
                                   f"got {type(value).__name__}")
        if _out_of_range(value):
            raise CalibrationError(f"{source}: '{key}' is out of range (an int of {value.bit_length()} bits)")
        if value is not None and check is not None and not check(value):
            raise CalibrationError(f"{source}: '{key}' must be {words}, got {_excerpt(value)}")
        if key in VALUES and value is not None:
            inner_types, inner_check, inner_words = VALUES[key]
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for name, inner in items:
                if not _type_ok(inner, inner_types) or _out_of_range(inner) or (
                        inner_check is not None and not inner_check(inner)):
                    raise CalibrationError(f"{source}: '{key}' [{name!r}] must be {_type_words(inner_types)} "
                                           f"{inner_words}, got {_excerpt(inner)}".replace("  ", " "))
            value = {k: float(v) if float in inner_types else v for k, v in value.items()} \
                if isinstance(value, dict) else list(value)
        checked[key] = float(value) if float in types and isinstance(value, int) else value
    thresholds = [checked["score_thresholds"][f"p{q}"] for q in PERCENTILES]
    if thresholds != sorted(thresholds):
        raise CalibrationError(f"{source}: 'score_thresholds' must not decrease from p90 to p99, "
                               f"got {thresholds}")
    if checked["expected_fpr"] is not None and checked["target_fpr"] is None:
        raise CalibrationError(f"{source}: 'expected_fpr' is given, but 'target_fpr' it rests on is null")
    if checked["count_vector_distance"] is None and "count_vector" in checked["combined_rules"]:
        raise CalibrationError(f"{source}: 'combined_rules' takes count_vector, "
                               f"but 'count_vector_distance' is null")
    return checked


def _excerpt(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def upgrade(calibration, source: str) -> dict:
    """A calibration of any form this toolkit ever wrote, in the current form (validate() still to do)."""
    if not isinstance(calibration, dict):
        return calibration   # validate names it
    version = calibration.get("version", 2)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise CalibrationError(f"{source}: calibration version {_excerpt(version)} is not one this toolkit "
                               f"knows (it writes {VERSION}): written by a newer version?")
    if version == VERSION:
        if "training_sweep" not in calibration:   # written before the sweep (same version otherwise)
            calibration = {**calibration, "training_sweep": None}
        return calibration
    old = dict(calibration)
    if "probability_bound" in old and "log_probability_bound" not in old:   # renamed: the same natural log
        old["log_probability_bound"] = old.pop("probability_bound")
    if "probability_margin" in old:   # before target_fpr: the bound was a margin below the least likely event
        margin = old.pop("probability_margin")
        old.setdefault("probability_bound_method", f"{margin} x least likely normal event")
    defaults = {"version": VERSION, "default_rule": "combined", "source": "unknown", "fitted_at": None,
                "distinct_sessions": None, "scored_sessions": old.get("sessions", 0),
                "percentile_method": "exact",
                "target_fpr": None, "probability_bound_method": "unknown", "log_end_probability_bound": None,
                "end_probability_bound_method": None, "event_pair_rule": False,
                # before the plan, combined was these three (a rule without its record flags nothing)
                "combined_rules": ["probability", "event_set", "event_pair"], "unseen_events_flag": True,
                "count_vector_distance": None, "training_sessions": None, "novelty_on_training": None,
                "novelty_is_normal": None, "expected_fpr": None, "training_sweep": None}
    for key, value in defaults.items():
        old.setdefault(key, value)
    old["version"] = VERSION
    if old["target_fpr"] is None:
        old["expected_fpr"] = None   # expected rates rest on the probability rule's target
    elif old["expected_fpr"] is None:
        try:   # from the checked values only: a damaged one must not reach the arithmetic
            old["expected_fpr"] = expected_rates(validate(old, source))
        except CalibrationError:
            pass   # checked() validates it again and names what is wrong
    return old


def checked(calibration, source: str) -> dict:
    """A calibration as stored anywhere (a checkpoint, a calibration.json), upgraded and validated."""
    return validate(upgrade(calibration, source), source)


def load_calibration(path) -> dict:
    """calibration.json, upgraded and validated: a damaged or foreign file is one CalibrationError naming
    it."""
    try:
        with utils.open_regular(path) as handle:
            text = handle.read().decode("utf-8")   # what save_calibration writes (JSON is UTF-8)
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise CalibrationError(f"{path}: unreadable calibration file ({reason})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:   # JSONDecodeError is a ValueError
        raise CalibrationError(f"{path}: not a calibration.json (invalid JSON: {str(error)[:80]})") from None
    return checked(data, str(path))


def save_calibration(path, calibration: dict) -> None:
    """calibration.json, validated before it is written (atomically): what load_calibration reads back."""
    utils.save_json(path, validate(calibration, str(path)))


# ----------------------------------------------------------------------------- fitting
def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value v with at least q% of the total weight at or below v (duplicates count)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, q / 100 * cumulative[-1] - 1e-9))
    return float(values[order][min(index, len(order) - 1)])


class ScoreQuantiles:
    """Weighted anomaly scores (in [0, 1]) for percentiles, in bounded memory.

    Exact while at most `max_exact` distinct values occurred: a dict value -> total weight (the values are
    fractions misses / predictions, so there are rarely many). Beyond that, a histogram of SKETCH_BINS bins
    (b/n, (b+1)/n] (bin 0 also holds 0) where each value stands for its bin's upper edge: a percentile is
    then the upper edge of the bin that holds the exact one, at most 1/65536 (1.53e-05) above it, never
    below, and weight_above() such an edge is exact.
    """

    def __init__(self, max_exact: int = MAX_EXACT_SCORES):
        self.max_exact = max_exact
        self.exact: dict[float, float] | None = {}
        self.bins: np.ndarray | None = None

    @property
    def method(self) -> str:
        if self.bins is None:
            return "exact"
        return f"histogram of {SKETCH_BINS} bins, error <= {1 / SKETCH_BINS:.3g}"

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        if self.bins is None:
            for value, weight in zip(values.tolist(), weights.tolist()):
                self.exact[value] = self.exact.get(value, 0.0) + weight
            if len(self.exact) <= self.max_exact:
                return
            values, weights = self.table()
            self.exact, self.bins = None, np.zeros(SKETCH_BINS)
        upper_edge_index = np.ceil(values * SKETCH_BINS).astype(np.int64)  # exact: SKETCH_BINS a power of 2
        self.bins += np.bincount(np.maximum(upper_edge_index - 1, 0), weights, minlength=SKETCH_BINS)

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, weights): the distinct values, or the upper edges of the bins."""
        if self.bins is None:
            return np.array(list(self.exact)), np.array(list(self.exact.values()))
        return np.arange(1, SKETCH_BINS + 1) / SKETCH_BINS, self.bins

    def percentile(self, q: float) -> float:
        return weighted_percentile(*self.table(), q)

    def weight_above(self, threshold: float) -> float:
        values, weights = self.table()
        return float(weights[values > threshold].sum())


MIN_BEYOND = 10        # calibration sessions beyond an empirical quantile for it to be trusted
SURPRISAL_BIN = 0.01   # nats: the resolution of the model-implied tail (1% in probability)
MAX_SURPRISAL = 60.0   # nats: the last bin holds everything less likely (p < 1e-26) and events never seen


class CalibrationTail:
    """Per calibration session (a row): the surprisal (-log p) of its least likely event and of its end,
    whether the event-set or event-pair rule flags it, and its weight. Memory stays bounded: beyond 2 x
    max_kept rows, only those among the max_kept largest of either surprisal are kept (the others' weight
    still counts in `total`), so every threshold and flagged weight above those is exact: at target_fpr
    0.0005 and 200,000 kept rows, for up to ~800 million calibration sessions."""

    def __init__(self, max_kept: int = MAX_EXACT_SCORES):
        self.max_kept, self.total = max_kept, 0.0
        self.rows = np.empty((0, 4))

    def add(self, event: np.ndarray, end: np.ndarray, novel: np.ndarray, weights: np.ndarray) -> None:
        self.total += float(weights.sum())
        self.rows = np.concatenate([self.rows, np.column_stack([event, end, novel, weights])])
        if len(self.rows) > 2 * self.max_kept:
            keep = np.zeros(len(self.rows), dtype=bool)
            for column in (0, 1):
                largest = np.partition(self.rows[:, column], -self.max_kept)[-self.max_kept]
                keep |= self.rows[:, column] >= largest
            self.rows = self.rows[keep]

    @property
    def event(self) -> np.ndarray:
        return self.rows[:, 0]

    @property
    def end(self) -> np.ndarray:
        return self.rows[:, 1]

    @property
    def novel(self) -> np.ndarray:
        return self.rows[:, 2] > 0

    @property
    def weights(self) -> np.ndarray:
        return self.rows[:, 3]


class ImpliedTail:
    """What the LSTM itself expects of normal sessions. At every position of every calibration session
    (weighted by its count), the model gives each event and the end of session a probability; summed over
    positions, the mass it puts below p = b is the number of positions per session at which it expects an
    actual event (or end) less likely than b: an upper bound on the chance that a normal session gets
    flagged, from every position rather than one value per session. Kept as mass per surprisal bin
    (SURPRISAL_BIN wide), for events and for the end separately."""

    def __init__(self):
        self.bins = int(MAX_SURPRISAL / SURPRISAL_BIN) + 1
        self.event, self.end = np.zeros(self.bins), np.zeros(self.bins)

    @torch.no_grad()
    def add(self, model: DeepLog, sessions: list, weights: np.ndarray, max_tokens: int | None = None) -> None:
        """The mass of these sessions (each weighted), scored in batches of at most max_tokens positions."""
        weights = torch.as_tensor(weights, dtype=torch.float64)
        with model._evaluating():
            for batch in model.windows(sessions, max_tokens):
                log_probs = torch.log_softmax(batch.logits.float(), dim=-1)
                valid = batch.targets != IGNORE_INDEX      # each prediction once: context, padding left out
                owner_weights = weights.to(log_probs.device)[batch.owners]
                position_weights = owner_weights.unsqueeze(1).expand_as(valid)[valid]
                log_probs = log_probs[valid]                                        # [positions, classes]
                # classes never seen in training are left out: their probability is whatever the softmax
                # left them (they were never a target), and calibration sessions that hold one count as
                # flagged anyway
                mass = log_probs.double().exp() * position_weights.unsqueeze(1) * model.seen_events
                bins = (-log_probs).clamp(max=MAX_SURPRISAL).div(SURPRISAL_BIN).long()
                for histogram, columns in ((self.event, slice(0, model.end_id)),
                                           (self.end, slice(model.end_id, None))):
                    histogram += torch.bincount(bins[:, columns].flatten(), mass[:, columns].flatten(),
                                                minlength=self.bins).cpu().numpy()

    def threshold(self, which: str, target: float, sessions: float) -> float:
        """The lowest surprisal t (a bin edge) at which the mass above t is at most `target` per session."""
        histogram = self.event if which == "event" else self.end
        at_or_above = np.cumsum(histogram[::-1])[::-1]
        within = np.flatnonzero(at_or_above <= target * sessions)
        return float(within[0]) * SURPRISAL_BIN if len(within) else MAX_SURPRISAL


def target_fpr_threshold(values: np.ndarray, weights: np.ndarray, total: float, target: float,
                         implied: float | None = None) -> tuple[float, str]:
    """The threshold t on a score (higher = more anomalous) that flags at most `target` of `total` normal
    sessions (score > t), from the table of the largest scores; infinite scores are flagged whatever t is and
    count against the target. With at least MIN_BEYOND sessions' worth of weight beyond it, t is the
    empirical quantile. Fewer, and the quantile would be the last few sessions' noise (with n sessions, a rate
    below 1/n is not even observable): then t is `implied`, the model's own estimate (ImpliedTail), which sees
    every position of every calibration session, but never below a score that would flag more than the
    target of the calibration sessions (the empirical bound: where the model is overconfident, the data
    wins). Without `implied`, the empirical bound."""
    finite = np.isfinite(values)
    infinite_weight = float(weights[~finite].sum())
    allowed = target * total - infinite_weight
    values, where = np.unique(values[finite], return_inverse=True)  # equal scores: one value, weights summed
    weights = np.bincount(where, weights[finite], minlength=len(values))
    if not len(values):
        return (implied if implied is not None else math.inf), "no finite scores"
    above = np.cumsum(weights[::-1])[::-1] - weights  # weight strictly above each value
    empirical = float(values[np.argmax(above <= max(allowed, 0.0))])  # flags at most the target, observed
    if target * total >= MIN_BEYOND:
        return empirical, f"empirical quantile {1 - target:.6g}"
    if implied is None:
        return empirical, f"largest calibration score allowed ({total:.0f} sessions)"
    if implied < empirical:
        return empirical, (f"the calibration sessions' bound: the model's own estimate would flag more than "
                           f"{percent(target)} of the {total:.0f} calibration sessions")
    return implied, (f"model-implied at {percent(target)} over every position of {total:.0f} calibration "
                     "sessions")


CONFIDENCE = 0.95               # of the bounds stated on false-positive rates
MIN_CALIBRATION_SESSIONS = 100  # fewer calibration sessions cannot promise the probability rule's target


def binomial_bounds(flagged: float, sessions: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds on a rate from `flagged` of `sessions`: (lower, upper), each holding
    with probability `confidence` (with 0 flagged the upper bound is 1 - (1 - confidence)^(1/n), ~3/n)."""
    k, n = int(round(flagged)), int(round(sessions))
    if n <= 0:
        return 0.0, 1.0
    alpha = 1 - confidence
    exact = n <= 100_000   # beyond, a normal approximation: no arrays of n + 1 terms
    i = np.arange(n + 1) if exact else None
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in
                           range(n + 1)]) if exact else None

    def at_most(count: int, p: float) -> float:   # P(X <= count) for X ~ Binomial(n, p)
        if count < 0:
            return 0.0
        if p <= 0:
            return 1.0
        if p >= 1:
            return 1.0 if count >= n else 0.0
        if log_choose is None:  # normal approximation, with continuity correction, for huge n
            return 0.5 * math.erfc(-(count + 0.5 - n * p) / math.sqrt(2 * n * p * (1 - p)))
        terms = log_choose[:count + 1] + i[:count + 1] * math.log(p) + (n - i[:count + 1]) * math.log1p(-p)
        return float(np.exp(terms).sum())

    def solve(decreasing_in_p) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if decreasing_in_p(middle) > alpha else (low, middle)
        return (low + high) / 2

    upper = 1.0 if k >= n else solve(lambda p: at_most(k, p))
    lower = 0.0 if k <= 0 else 1 - solve(lambda q: 1 - at_most(k - 1, 1 - q))
    return lower, upper


def plan_rules(co_occurrence: CoOccurrence | None, target_fpr: float, vocab_size: int) -> dict:
    """Which rules `combined` takes, decided from the normal training sessions themselves (their event-count
    vectors, when that record is kept): each training session is compared with all the others (leave one out).
    - If significantly more of them than target_fpr bring an event type, a set of types or a pair of types
      that no other training session has (the lower confidence bound above the target), new normal sessions
      will bring such novelty as often: that novelty is normal here, and the rule that flags it is left out of
      `combined` (a never-seen event type then no longer flags by itself in the probability rule either).
    - The count-vector rule flags a session farther (L1 distance of event counts) from every training session
      than any training session is from its nearest other one: with n exchangeable normal sessions, a new one
      is the farthest with probability at most 1/(n + 1) (a conformal bound). It joins `combined` where some
      novelty is normal (a rule was left out): it tolerates what the left-out rule could not, a new type or
      set of types close to a normal session, and still flags sessions unlike any. Where novelty is rare, the
      set and pair rules are the finer test and the count-vector rule would only add false positives (on HDFS
      it flags normal sessions with many more reads than any training session: benchmarks/README.md).
    Without the record (checkpoints of older versions, or too many distinct vectors): the earlier combination,
    probability, event_set and event_pair, and no statement from the training data."""
    with_sets = co_occurrence is not None and co_occurrence.sets is not None
    with_pairs = co_occurrence is not None and co_occurrence.pairs is not None
    plan = {"combined_rules": ["probability"] + ["event_set"] * with_sets + ["event_pair"] * with_pairs,
            "unseen_events_flag": True, "count_vector_distance": None, "training_sessions": None,
            "novelty_on_training": None, "novelty_is_normal": None}
    counts = co_occurrence.counts if co_occurrence is not None else None
    if counts is None:
        return plan
    sessions, novelty = counts.with_held_out().sessions, counts.novelty(vocab_size)
    is_normal = {name: binomial_bounds(k, sessions)[0] > target_fpr for name, k in novelty.items()}
    leave_one_out = counts.leave_one_out()
    finite = np.isfinite(leave_one_out)
    distance = float(leave_one_out[finite].max()) if finite.any() else None
    kept = [rule for rule, recorded in (("event_set", with_sets), ("event_pair", with_pairs))
            if recorded and not is_normal[rule]]
    with_counts = distance is not None and any(is_normal.values())
    plan.update(combined_rules=["probability", *kept] + ["count_vector"] * with_counts,
                unseen_events_flag=not is_normal["event_type"], count_vector_distance=distance,
                training_sessions=sessions, novelty_on_training=novelty, novelty_is_normal=is_normal)
    return plan


FEW_TO_MEASURE = 100   # calibration sessions below which the share flagged there tells no rate


def expected_rates(calibration: dict) -> dict:
    """What each rule is expected to flag of new normal sessions, at most (95% bounds): the probability rule
    its target; the event-set and event-pair rules the upper bound from the training sessions that brought a
    novelty of that kind (without that record, from the calibration sessions they flagged); the count-vector
    rule 1/(n + 1); `combined` the sum of its rules (a new pair is a new set: the two together count once)."""
    sessions, novelty = calibration.get("training_sessions"), calibration.get("novelty_on_training")
    rates = {"probability": calibration["target_fpr"]}
    if novelty is not None:
        for rule in ("event_set", "event_pair"):
            rates[rule] = binomial_bounds(novelty[rule], sessions)[1]
        if calibration.get("count_vector_distance") is not None:
            rates["count_vector"] = 1 / (sessions + 1)
    else:  # no record of the training sessions' counts: bounds from the calibration sessions flagged
        calibrated = calibration["sessions"]
        for rule in ("event_set", "event_pair"):
            flagged = calibration["flagged_on_calibration"].get(rule, 0.0) * calibrated
            rates[rule] = binomial_bounds(flagged, calibrated)[1]
    parts = [rule for rule in calibration["combined_rules"] if rule in rates]
    records = [rates[rule] for rule in ("event_set", "event_pair") if rule in parts]
    rates["combined"] = rates["probability"] + (max(records) if records else 0.0) + rates.get(
        "count_vector", 0.0) * ("count_vector" in parts)
    # the sessions the sweep of the training data kept out of the records: were they normal, new sessions
    # like them are flagged by the record rules, at their share
    swept = (calibration.get("training_sweep") or {}).get("share", 0.0)
    for rule in ("event_set", "event_pair", "count_vector"):
        if rule in rates:
            rates[rule] += swept
    if any(rule in parts for rule in ("event_set", "event_pair", "count_vector")):
        rates["combined"] += swept
    return {rule: min(rate, 1.0) for rule, rate in rates.items()}


def calibration_warnings(calibration: dict, rule: str) -> list[str]:
    """What the expected false-positive rate of `rule` cannot promise, in words, with what to do."""
    warnings = []
    sessions, flagged = calibration["sessions"], calibration["flagged_on_calibration"].get("probability", 0.0)
    if rule in ("combined", "probability") and sessions < MIN_CALIBRATION_SESSIONS \
            and calibration["target_fpr"]:
        upper = binomial_bounds(flagged * sessions, sessions)[1]
        warnings.append(
            f"the probability rule's bounds rest on {sessions} calibration session(s), too few to promise "
            f"its target false-positive rate {percent(calibration['target_fpr'])}: from what was seen ("
            f"{flagged * sessions:.0f} flagged) its rate could be up to {upper:.1%} ({CONFIDENCE:.0%} upper "
            f"bound). Train on more normal sessions, or refit on at least {MIN_CALIBRATION_SESSIONS * 10} "
            f"other normal sessions with evaluate.py --calibrate-on DIR")
    expected = (calibration["expected_fpr"] or {}).get(rule)
    if expected is not None and expected > 0.01:
        training = calibration["training_sessions"]
        basis = (f"{training} normal training sessions" if training else
                 f"the {sessions} calibration sessions (no record of the training sessions)")
        warnings.append(f"the '{rule}' rule is expected to flag up to {expected:.2%} of normal sessions: "
                        f"{basis} bound it no tighter; more normal training data tightens it")
    return warnings


Scorer = Callable[[list], tuple[list, dict, np.ndarray]]  # chunk -> distinct sessions, score columns, counts


def fit(model: DeepLog, scorer: Scorer, normal: Iterable[list], top_k: int, top_g: int, target_fpr: float,
        source: str, default_rule: str, co_occurrence: CoOccurrence | None = None,
        max_tokens: int | None = None, max_exact_scores: int = MAX_EXACT_SCORES,
        training_sweep: dict | None = None) -> dict:
    """Thresholds from normal sessions only (chunks, read once, scored by `scorer`: scoring.ChunkScorer):
    score percentiles, and the two bounds of the LSTM's probability rule, one on the least likely event of a
    session and one on its end, each set so that at most half of `target_fpr` of normal sessions fall below it
    (see target_fpr_threshold): together at most the target. Records how often each rule fires on these
    normal sessions, and what to expect of it on new ones (expected_rates).
    Why two bounds: an event less likely than p is common in normal sessions (interleavings the training data
    did not have), an end that unlikely is not, and a session cut short is the anomaly it reveals.
    """
    if not 0 < target_fpr < 0.5:
        raise CalibrationError(f"target false-positive rate {target_fpr}: must be in (0, 0.5)")
    plan = plan_rules(co_occurrence, target_fpr, model.vocab_size)
    event_column = "min_event_log_prob" if plan["unseen_events_flag"] else "min_seen_event_log_prob"
    others = [rule for rule in plan["combined_rules"] if rule != "probability"]
    quantiles = ScoreQuantiles(max_exact_scores)
    tail, implied = CalibrationTail(max_exact_scores), ImpliedTail()
    sessions, least_likely, novel = 0.0, math.inf, 0.0
    flagged = dict.fromkeys(("event_set", "event_pair", "count_vector", "top_g"), 0.0)
    for chunk in normal:
        distinct, scores, weights = scorer(chunk)
        implied.add(model, distinct, weights, max_tokens)
        sessions += float(weights.sum())
        min_log_prob = scores["min_log_prob"]
        finite = np.isfinite(min_log_prob)
        if finite.any():
            least_likely = min(least_likely, float(min_log_prob[finite].min()))
        quantiles.add(anomaly_scores(scores, top_k), weights)
        # the sessions that combined's other rules flag whatever the probability bounds will be
        is_novel = np.zeros(len(weights), dtype=bool)
        for rule in others:
            is_novel |= verdicts(scores, plan, rule)
        novel += float(weights[is_novel].sum())
        tail.add(-scores[event_column], -scores["end_log_prob"], is_novel, weights)
        for rule in ("event_set", "event_pair", "count_vector", "top_g"):
            flagged[rule] += float(weights[verdicts(scores, {**plan, "top_g": top_g}, rule)].sum())
    if not sessions:
        raise CalibrationError(f"{source}: no normal sessions to calibrate on")
    half = target_fpr / 2
    event_threshold, event_method = target_fpr_threshold(tail.event, tail.weights, sessions, half,
                                                         implied.threshold("event", half, sessions))
    end_threshold, end_method = target_fpr_threshold(tail.end, tail.weights, sessions, half,
                                                     implied.threshold("end", half, sessions))
    by_probability = (tail.event > event_threshold) | (tail.end > end_threshold)
    flagged["probability"] = float(tail.weights[by_probability].sum())
    # combined = probability OR its other rules: the sessions of any, counted once
    # (every session the probability rule flags is among the rows the tail keeps; novel ones counted apart)
    flagged["combined"] = novel + float(tail.weights[by_probability & ~tail.novel].sum())
    thresholds = {f"p{q}": quantiles.percentile(q) for q in PERCENTILES}
    flagged.update({f"score_{p}": quantiles.weight_above(value) for p, value in thresholds.items()})
    calibration = {
        "version": VERSION, "top_k": top_k, "top_g": top_g, "default_rule": default_rule, "source": source,
        "sessions": int(sessions), "distinct_sessions": scorer.distinct, "scored_sessions": scorer.scored,
        "score_thresholds": thresholds, "percentile_method": quantiles.method,
        "least_likely_normal_log_prob": least_likely if least_likely < math.inf else 0.0,
        "target_fpr": target_fpr,
        # natural logs, like least_likely_normal_log_prob (the report shows the probabilities, exp of them)
        "log_probability_bound": -event_threshold, "probability_bound_method": event_method,
        "log_end_probability_bound": -end_threshold, "end_probability_bound_method": end_method,
        "event_set_rule": co_occurrence is not None and co_occurrence.sets is not None,
        "event_pair_rule": co_occurrence is not None and co_occurrence.pairs is not None,
        "fitted_at": datetime.now().isoformat(timespec="seconds"),
        "flagged_on_calibration": {rule: flagged[rule] / sessions for rule in RULES},
        "training_sweep": training_sweep, **plan}
    calibration["expected_fpr"] = expected_rates(calibration)
    return calibration


def percent(rate: float) -> str:
    """A rate as every report and log line writes it: 0.0005 -> '0.05%'."""
    return f"{rate * 100:.3g}%"


def probability_bound_origin(calibration: dict) -> str:
    """How the probability bounds were set, for reports and logs."""
    if calibration["target_fpr"] is None:   # calibrations of the oldest versions
        return calibration["probability_bound_method"]
    if calibration["end_probability_bound_method"] is not None:
        return (f"target FPR {percent(calibration['target_fpr'])}, half for each bound; events: "
                f"{calibration['probability_bound_method']}; "
                f"end: {calibration['end_probability_bound_method']}")
    return f"target FPR {percent(calibration['target_fpr'])}: {calibration['probability_bound_method']}"


def probability_rule_text(calibration: dict) -> str:
    """The probability rule in words, with its bounds."""
    text = f"an actual event less likely than p={math.exp(calibration['log_probability_bound']):.3g}"
    if calibration["log_end_probability_bound"] is not None:
        end = math.exp(calibration["log_end_probability_bound"])
        text += f" or an end of session less likely than p={end:.3g}"
    return text


RULE_WORDS = {"event_set": "a set of event types never seen together in training",
              "event_pair": "two event types that never shared a training session",
              "count_vector": "event counts farther from every normal training session than any of those is "
                              "from its nearest other one (L1 distance > {distance:g})"}


def rule_summary(calibration: dict, rule: str) -> str:
    """What the decision rule does with these thresholds, and the false-positive rate to expect from it."""
    bound = probability_rule_text(calibration)
    if not calibration["unseen_events_flag"]:
        bound += " (an event type never seen in training does not count by itself: see below)"
    parts = calibration["combined_rules"]
    words = {"probability": bound, **{name: text.format(distance=calibration["count_vector_distance"] or 0)
                                      for name, text in RULE_WORDS.items()}}
    with_sets, with_pairs = calibration["event_set_rule"], calibration["event_pair_rule"]
    if rule == "combined" and not (with_sets or with_pairs) and parts == ["probability"]:
        text = (f"'combined' is the LSTM's probability rule alone ({bound}), as no record of which event "
                f"types occur together was kept (evaluation.event_set_rule and event_pair_rule false, or too "
                f"many)")
    elif rule == "combined":
        text = "'combined': " + ", or ".join(words[part] for part in parts)
        if not with_sets:
            text += " (no record of event-type sets: more than 10,000, or evaluation.event_set_rule false)"
        left_out = [name for name, normal in (calibration["novelty_is_normal"] or {}).items() if normal]
        if left_out:
            novelty = calibration["novelty_on_training"]
            brought = ", ".join(f"a new {name.replace('_', ' ')} ({novelty[name]})" for name in left_out)
            text += (f" (left out: {brought} of the {calibration['training_sessions']} normal training "
                     f"sessions bring one that no other has: such novelty is normal here)")
    elif rule in words:
        text = f"'{rule}': {words[rule]}"
    else:
        text = f"'{rule}'"
    flagged = calibration["flagged_on_calibration"].get(rule, 0.0)
    expectation = f"{flagged:.3%} of the {calibration['sessions']} calibration sessions flagged" + (
        " (too few to measure a rate)" if calibration["sessions"] < FEW_TO_MEASURE else "")
    rates = calibration["expected_fpr"] or {}
    if rule in rates:
        training = calibration["training_sessions"]
        others = (f", plus {CONFIDENCE:.0%} bounds from the {training} normal training sessions for the "
                  f"other rules" if rule != "probability" and training else "")
        expectation = (f"expected false-positive rate at most {rates[rule]:.3%} (the probability rule's "
                       f"target {percent(calibration['target_fpr'])}{others}); {expectation}")
    return f"Decision rule {text}; {expectation}"
