"""DeepLog's parameter-value model (Du et al. 2017, section 3.2): is each event's timing, and are its values,
what they should be here? The log-key model asks which event comes next; this one asks, for the event that
came, whether the time since the session's previous event and its numeric parameters fit the session so far.

Examples:

    python train.py --config outputs/openstack/config.yaml   # sessions with "times"/"values": trains it too
    python -c "import values; print(values.event_vectors([0.0, 2.5, None], [[200], [], [1, 2]]))"

Each event becomes a vector of SLOTS numbers: slot 0 the time since the session's previous event, slots
1..MAX_VALUES its numeric parameters (preprocess.py's "times" and "values"), NaN where absent. Each number is
put on a log scale (sign(x) log(1 + |x|): durations and sizes spread over orders of magnitude) and then
normalised per event type and slot by the median and spread of the training sessions (robust_spread: a few
anomalies among them move neither). One small network serves every event type (10,000 types cost a table
of 10,000 x SLOTS medians and scales, not 10,000 LSTMs as in the paper): an LSTM reads the session's events
(type embedding and normalised vector) and, given the next event's type, predicts its normalised vector.
The `parameter` rule has two tests, the target false-positive rate split between them: a value's error
against the prediction, in spreads of the model's own errors for that type and slot (error_spread), above
a threshold (the larger of the calibration quantile and the paper's Gaussian); or a value beyond its
type's 0.5-99.5% training range by more than a threshold (at least RANGE_FLOOR scales). A session's score
(ParameterModel.score) is its worst value's share of its threshold: above 1 it is flagged. The per-type
baseline (no model) scores |normalised value| alone.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import utils
from calibration import FEW_TO_MEASURE
from config import reader_options
from dataset import CALIBRATION, EVALUATION, MAX_VALUES, TRAIN, iter_sessions, split_class

SLOTS = 1 + MAX_VALUES     # the gap since the previous event, then the event's numeric parameters
SLOT_NAMES = ("time since the previous event", *(f"value {i}" for i in range(1, MAX_VALUES + 1)))
MIN_SCALE = 0.05           # a floor on each scale (log units, ~5%): a value constant in training is not
                           # infinitely surprising when it moves a little
RANGE_FLOOR = 1.0          # a value must lie at least one scale beyond its type's training range to count
ERROR_FLOOR = 0.25         # the model may predict a slot at most 4 times tighter than its type's spread
RESERVOIR = 512            # values kept per (event type, slot) to fit its median and MAD, uniformly sampled
MAX_SESSION_EVENTS = 256   # a longer session is read in consecutive pieces of this many events


# ----------------------------------------------------------------------------- vectors
def log_scale(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def from_log_scale(y: np.ndarray) -> np.ndarray:
    return np.sign(y) * np.expm1(np.abs(y))


def event_vectors(times, values) -> np.ndarray:
    """[events, SLOTS] on the log scale, NaN where absent: the gap to the previous event's time (none for
    the first event, or where either time is unknown), then the event's values."""
    count = len(times) if times is not None else len(values)
    vectors = np.full((count, SLOTS), np.nan)
    if times is not None:
        known = np.array([np.nan if t is None else t for t in times], dtype=np.float64)
        vectors[1:, 0] = np.diff(known)
    if values is not None:
        for row, numbers in enumerate(values):
            vectors[row, 1:1 + len(numbers)] = numbers
    return log_scale(vectors)


def has_parameters(record) -> bool:
    return record.times is not None or record.values is not None


# ----------------------------------------------------------------------------- the normaliser
def robust_spread(values: np.ndarray) -> tuple[float, float]:
    """(median, spread): the spread is 1.4826 x MAD (a normal's sigma), or, where more than half the values
    are equal (whole-second gaps of 0, a status code), the 5%-95% range / 3.29 (also sigma for a normal),
    at least MIN_SCALE. Either way a few percent of wild values move neither."""
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    low, high = np.percentile(values, [5, 95])
    return median, max(mad, float(high - low) / 3.29, MIN_SCALE)


def error_spread(errors: np.ndarray) -> tuple[float, float]:
    """(0, scale) of the model's errors for one type and slot: their 99th percentile of |error| / 2.576 (a
    normal's sigma), at least ERROR_FLOOR. A percentile, not the MAD: where a normal value is now and then
    far off the usual (a step that sometimes waits), the errors have a second mode that the scale must
    cover, or every such normal session would look extreme."""
    return 0.0, max(float(np.percentile(np.abs(errors), 99)) / 2.576, ERROR_FLOOR)
class Normaliser:
    """Per event type and slot: the median and scale (1.4826 x MAD, at least MIN_SCALE) of the training
    sessions' log-scale values; rows vocab_size.. (unknown types) have none (NaN)."""

    def __init__(self, median: np.ndarray, scale: np.ndarray, low: np.ndarray | None = None,
                 high: np.ndarray | None = None, count: np.ndarray | None = None):
        self.median, self.scale = median, scale
        self.count = count   # (fit) values seen per type and slot
        # the 0.5% and 99.5% quantiles of training (log scale): the range a value is expected in
        self.low = low if low is not None else np.full_like(median, np.nan)
        self.high = high if high is not None else np.full_like(median, np.nan)

    @classmethod
    def fit(cls, sessions, vocab_size: int, seed: int = 0, spread=None) -> "Normaliser":
        """From (event_ids, vectors) pairs, one pass: a uniform reservoir of RESERVOIR values per (type,
        slot), summarised by `spread` (values -> (centre, scale); default robust_spread)."""
        spread = spread or robust_spread
        rng = np.random.default_rng(seed)
        kept: dict[tuple[int, int], list] = {}
        seen: dict[tuple[int, int], int] = {}
        for events, vectors in sessions:
            for event, row in zip(events, vectors):
                if event >= vocab_size:
                    continue
                for slot in np.flatnonzero(~np.isnan(row)).tolist():
                    key = (event, slot)
                    n = seen[key] = seen.get(key, 0) + 1
                    sample = kept.setdefault(key, [])
                    if len(sample) < RESERVOIR:
                        sample.append(row[slot])
                    elif (j := int(rng.integers(n))) < RESERVOIR:
                        sample[j] = row[slot]
        median, scale, low, high = (np.full((vocab_size, SLOTS), np.nan) for _ in range(4))
        count = np.zeros((vocab_size, SLOTS), dtype=np.int64)
        for (event, slot), sample in kept.items():
            median[event, slot], scale[event, slot] = spread(np.asarray(sample))
            low[event, slot], high[event, slot] = np.percentile(sample, [0.5, 99.5])
            count[event, slot] = seen[(event, slot)]
        return cls(median, scale, low, high, count)

    def range_excess(self, events: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """[events, SLOTS]: how far each value lies outside its type's training range, in that type's
        scales (0 inside; NaN where absent or never seen)."""
        inside = events < len(self.median)
        rows = np.where(inside, events, 0)
        excess = np.maximum(vectors - self.high[rows], self.low[rows] - vectors).clip(min=0)
        excess = excess / self.scale[rows]
        excess[~inside] = np.nan
        return excess

    def normalise(self, events: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """[events, SLOTS] in scales from each type's median; NaN where absent or never seen in training."""
        inside = events < len(self.median)
        rows = np.where(inside, events, 0)
        z = (vectors - self.median[rows]) / self.scale[rows]
        z[~inside] = np.nan
        return z

    def value_range(self, event: int, slot: int, low_z: float, high_z: float) -> tuple[float, float]:
        """The values (on their own scale: seconds, bytes, ...) between two normalised values."""
        m, s = self.median[event, slot], self.scale[event, slot]
        return tuple(float(from_log_scale(np.array(m + z * s))) for z in (low_z, high_z))


# ----------------------------------------------------------------------------- the network
class ParameterNet(nn.Module):
    """Reads a session's events (type embedding, normalised vector, which slots are present) with an LSTM;
    from its state before each event and that event's type, predicts the event's normalised vector. The
    type conditions the prediction, the state the history: "slow after A" and "normal after B" differ."""

    def __init__(self, vocab_size: int, embedding_dim: int = 32, hidden_size: int = 64):
        super().__init__()
        self.args = dict(vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size + 2, embedding_dim)   # + unknown type, + session start
        self.lstm = nn.LSTM(embedding_dim + 2 * SLOTS, hidden_size, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden_size + embedding_dim, hidden_size), nn.ReLU(),
                                  nn.Linear(hidden_size, SLOTS))

    def forward(self, events: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """events [B, T] (IDs; >= vocab_size read as unknown), z [B, T, SLOTS] (NaN: absent) -> the
        predicted z of every event [B, T, SLOTS], each from the events before it and its own type."""
        types = torch.where(events >= self.vocab_size, self.vocab_size, events)
        present = ~torch.isnan(z)
        step = torch.cat([self.embedding(types), torch.nan_to_num(z).clamp(-20, 20), present.float()], -1)
        start = torch.zeros_like(step[:, :1])
        start[..., :self.embedding.embedding_dim] = self.embedding.weight[self.vocab_size + 1]
        history, _ = self.lstm(torch.cat([start, step[:, :-1]], 1))   # the state before each event
        return self.head(torch.cat([history, self.embedding(types)], -1))


def masked_loss(predicted: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the Huber losses over present slots, their count): robust to the odd outlier in training."""
    present = ~torch.isnan(z)
    if not present.any():
        return predicted.sum() * 0, present.sum()
    loss = nn.functional.huber_loss(predicted[present], z[present].clamp(-20, 20), reduction="sum")
    return loss, present.sum()


# ----------------------------------------------------------------------------- batches of sessions
def pieces(events: np.ndarray, z: np.ndarray):
    """A session in consecutive pieces of at most MAX_SESSION_EVENTS events."""
    for begin in range(0, len(events), MAX_SESSION_EVENTS):
        yield events[begin:begin + MAX_SESSION_EVENTS], z[begin:begin + MAX_SESSION_EVENTS]


def batch_of(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(events [B, T], z [B, T, SLOTS]) padded at the end (padding: event 0, z NaN, so never scored)."""
    longest = max(len(e) for e, _ in items)
    events = np.zeros((len(items), longest), dtype=np.int64)
    z = np.full((len(items), longest, SLOTS), np.nan, dtype=np.float32)
    for row, (e, v) in enumerate(items):
        events[row, :len(e)], z[row, :len(e)] = e, v
    return torch.from_numpy(events), torch.from_numpy(z)


def batches(sessions, batch_size: int):
    """Batches of pieces of (events, z) sessions, in the order given."""
    pending = []
    for events, z in sessions:
        for piece in pieces(events, z):
            pending.append(piece)
            if len(pending) == batch_size:
                yield batch_of(pending)
                pending = []
    if pending:
        yield batch_of(pending)


# ----------------------------------------------------------------------------- the model and its scores
@dataclass
class ParameterModel:
    net: ParameterNet
    normaliser: Normaliser
    threshold: float | None = None   # on the model's errors, fitted on normal validation sessions
    error_scale: np.ndarray | None = None   # [vocab, SLOTS]: the spread of the model's errors there
    range_threshold: float | None = None    # on the values beyond their type's training range (scales)
    history: list | None = None      # (training) the losses of each epoch
    calibration_sessions: int = 0    # (training) the sessions the threshold was fitted on

    def residuals(self, events: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised actual z, predicted z) of one session's events, [events, SLOTS] each."""
        z = self.normaliser.normalise(events, vectors).astype(np.float32)
        predicted = []
        self.net.eval()
        with torch.no_grad():
            for piece_events, piece_z in pieces(events, z):
                e, v = batch_of([(piece_events, piece_z)])
                predicted.append(self.net(e, v)[0].numpy())
        return z, np.concatenate(predicted)

    def errors(self, events: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(|actual - predicted| in spreads of the model's errors for that type and slot, z, predicted)."""
        z, predicted = self.residuals(events, vectors)
        error = np.abs(z - predicted)
        if self.error_scale is not None:
            error = error / self.error_scale[np.minimum(events, len(self.error_scale) - 1)]
        return error, z, predicted

    def score(self, events, vectors) -> dict | None:
        """The session's worst value and where: its error against the model's prediction (errors()) or its
        excess beyond its type's training range, whichever is the larger share of its threshold ("score":
        that share; the parameter rule flags a score above 1). None without any value it can judge. Before
        the thresholds are fitted: the largest error ("score") and range excess ("range")."""
        events = np.asarray(events, dtype=np.int64)
        error, z, predicted = self.errors(events, vectors)
        if np.isnan(error).all():
            return None
        excess = self.normaliser.range_excess(events, vectors)
        fitted = self.threshold is not None and self.range_threshold is not None
        ratios = np.fmax(error / self.threshold, excess / self.range_threshold) if fitted else error
        position, slot = np.unravel_index(np.nanargmax(ratios), ratios.shape)
        beyond = fitted and \
            excess[position, slot] / self.range_threshold > error[position, slot] / self.threshold
        return {"score": float(ratios[position, slot]), "position": int(position), "slot": int(slot),
                "z": float(z[position, slot]), "predicted_z": float(predicted[position, slot]),
                "range": float(np.nanmax(excess)) if not np.isnan(excess).all() else 0.0,
                "kind": "range" if beyond else "prediction"}

    def odd(self, events, times, values) -> dict | None:
        """What an alert says of a session whose times or values the parameter rule flags (finding); None
        when it does not, or the session has neither. One function for batch and live detection."""
        if times is None and values is None:
            return None
        worst = self.score(events, event_vectors(times, values))
        flagged = worst is not None and worst["score"] > 1
        return self.finding(events, times, values, worst) if flagged else None

    def finding(self, events, times, values, found: dict) -> dict:
        """What an alert says: which event, which slot (the time since the previous event, or a value), its
        value, and the range expected there (the prediction +- the threshold, on the value's own scale)."""
        position, slot = found["position"], found["slot"]
        event = int(events[position])
        actual = (times[position] - times[position - 1]) if slot == 0 else values[position][slot - 1]
        if found.get("kind") == "range":   # beyond its type's training range (widened by the threshold)
            n = self.normaliser
            margin = self.range_threshold * n.scale[event, slot]
            low, high = (float(from_log_scale(np.array(b))) for b in (n.low[event, slot] - margin,
                                                                     n.high[event, slot] + margin))
        else:   # the model's prediction +- its threshold
            margin = self.threshold * float(self.error_scale[event, slot])
            low, high = self.normaliser.value_range(event, slot, found["predicted_z"] - margin,
                                                    found["predicted_z"] + margin)
        low = max(low, 0.0) if slot == 0 else low   # a gap below 0 is no expectation
        return {"position": position, "event": event, "what": SLOT_NAMES[slot], "actual": actual,
                "expected_range": [round(low, 6), round(high, 6)], "score": round(found["score"], 3)}


def baseline_score(normaliser: Normaliser, events, vectors) -> float | None:
    """The per-type baseline (no model, no history): the session's largest |normalised value|."""
    z = np.abs(normaliser.normalise(np.asarray(events, dtype=np.int64), vectors))
    return None if np.isnan(z).all() else float(np.nanmax(z))


def fit_threshold(scores: list[float], target_fpr: float) -> float:
    """The smallest score above all but target_fpr of the normal sessions' scores (at least their largest
    when there are fewer than 1 / target_fpr of them)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    allowed = int(math.floor(len(ordered) * target_fpr))
    return float(ordered[len(ordered) - 1 - allowed]) if len(ordered) else math.inf


def gaussian_threshold(judged_per_session: float, target_fpr: float) -> float:
    """The paper's rule (Du et al. 2017, 3.2: a Gaussian fitted to the prediction errors on normal data), on
    errors in spreads of their own type and slot: the |error| that one value exceeds with probability
    target_fpr / (values judged per session), so that a session is flagged at about target_fpr.
    Extrapolates where a few hundred calibration sessions cannot show a 0.05% tail."""
    tail = min(target_fpr / max(judged_per_session, 1.0), 0.5)
    return statistics.NormalDist().inv_cdf(1 - tail / 2)


def train_net(model: ParameterModel, train_sessions, val_sessions, epochs: int, learning_rate: float,
              batch_size: int, patience: int, seed: int, log) -> list[dict]:
    """Epochs over the training sessions ((events, z) pairs; a callable giving a fresh iterable each epoch),
    keeping the weights of the epoch with the least validation loss (early stopping after `patience`
    epochs without improvement). The history of losses."""
    torch.manual_seed(seed)
    net = model.net
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    best, best_state, history, waited = math.inf, None, [], 0
    for epoch in range(1, epochs + 1):
        net.train()
        total = count = 0.0
        for events, z in batches(train_sessions(), batch_size):
            loss, n = masked_loss(net(events, z), z)
            if n == 0:
                continue
            optimizer.zero_grad()
            (loss / n).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)   # an odd value never throws the weights far
            optimizer.step()
            total, count = total + loss.item(), count + int(n)
        train_loss = total / max(count, 1)
        val_loss = evaluate_loss(net, val_sessions(), batch_size)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        watched = val_loss if val_loss is not None else train_loss
        log(f"Parameter model epoch {epoch}/{epochs} | train loss {train_loss:.4f} | val loss "
            f"{'n/a' if val_loss is None else f'{val_loss:.4f}'}")
        if watched < best - 1e-4:
            best, waited = watched, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history


def evaluate_loss(net: ParameterNet, sessions, batch_size: int) -> float | None:
    net.eval()
    total = count = 0.0
    with torch.no_grad():
        for events, z in batches(sessions, batch_size):
            loss, n = masked_loss(net(events, z), z)
            total, count = total + loss.item(), count + int(n)
    return total / count if count else None


# ----------------------------------------------------------------------------- checkpoint form
def model_state(model: ParameterModel) -> dict:
    """The model as tensors and plain types (a checkpoint's "parameter_model")."""
    normaliser = model.normaliser
    return {"args": dict(model.net.args), "state_dict": model.net.state_dict(),
            "median": torch.from_numpy(normaliser.median), "scale": torch.from_numpy(normaliser.scale),
            "low": torch.from_numpy(normaliser.low), "high": torch.from_numpy(normaliser.high),
            "range_threshold": model.range_threshold,
            "error_scale": torch.from_numpy(model.error_scale), "threshold": model.threshold,
            "calibration_sessions": model.calibration_sessions}


def model_from_state(state: dict) -> ParameterModel:
    net = ParameterNet(**state["args"])
    net.load_state_dict(state["state_dict"])
    normaliser = Normaliser(state["median"].numpy(), state["scale"].numpy(), state["low"].numpy(),
                            state["high"].numpy())
    return ParameterModel(net.eval(), normaliser, state["threshold"], state["error_scale"].numpy(),
                          state["range_threshold"], calibration_sessions=state["calibration_sessions"])


# ----------------------------------------------------------------------------- the stage after training
def side_of(record, config) -> int:
    """The split side of a training-data record (dataset.split_classes); with no validation split, the halves
    of every session, as the key model's calibration takes them."""
    data, seed = config.data, config.training.seed
    if not data.validation_split:
        return split_class(record.file, record.index, seed, 1.0, data.overlap)
    return split_class(record.file, record.index, seed, data.validation_split, data.overlap)


def records_of(config, sides: tuple, label: int = 0, leave_out=None):
    """The records of the training data with times or values, labelled `label`, on these split sides
    (every side for label 1: abnormal sessions are never trained on), streamed; at most
    parameter.max_sessions of them (the first). `leave_out(event_ids)`: True for a session to leave out
    (those the training-data sweep found suspicious)."""
    records = (r for r in iter_sessions(config.data.preprocessed_dir, None, **reader_options(config))
               if r.label == label and has_parameters(r) and (label or side_of(r, config) in sides)
               and not (leave_out and leave_out(r.event_ids)))
    return itertools.islice(records, config.parameter.max_sessions)


def data_has_parameters(config, look_at: int = 1000) -> bool:
    """Whether the first sessions of the training data carry times or values."""
    records = iter_sessions(config.data.preprocessed_dir, None, **reader_options(config))
    return any(has_parameters(r) for r in itertools.islice(records, look_at))


def train_parameter_model(config, vocab_size: int, log, leave_out=None) -> ParameterModel:
    """The normaliser fitted and the network trained on the training side (without the sessions
    `leave_out` names: the sweep's suspicious ones), the threshold fitted on the calibration half of the
    normal validation split at evaluation.target_fpr."""
    pc = config.parameter

    def arrays(sides):
        return ((np.asarray(r.event_ids, dtype=np.int64), event_vectors(r.times, r.values))
                for r in records_of(config, sides, leave_out=leave_out if TRAIN in sides else None))
    normaliser = Normaliser.fit(arrays((TRAIN,)), vocab_size, config.training.seed)
    model = ParameterModel(ParameterNet(vocab_size, pc.embedding_dim, pc.hidden_size), normaliser)

    def normalised(sides):
        return lambda: ((e, normaliser.normalise(e, v).astype(np.float32)) for e, v in arrays(sides))
    history = train_net(model, normalised((TRAIN,)), normalised((CALIBRATION,)), pc.epochs, pc.learning_rate,
                        pc.batch_size, pc.patience, config.training.seed, log)
    # the spread of the model's errors per type and slot, then the threshold: the larger of the sessions'
    # own quantile and the paper's Gaussian, both on the calibration half (tiny data: the other half)
    sides = (CALIBRATION,) if next(arrays((CALIBRATION,)), None) is not None else (EVALUATION,)

    def spread_of(of_sides):
        differences = ((e, np.subtract(*model.residuals(e, v))) for e, v in arrays(of_sides))
        return Normaliser.fit(differences, vocab_size, config.training.seed, error_spread)
    # held-out errors where a type and slot has 100 of them for its 99th percentile; else the training
    # side's too (on small data; a small network hardly overfits its errors)
    held_out = spread_of(sides)
    pooled = spread_of((TRAIN, *sides))
    scale = np.where(held_out.count >= 100, held_out.scale, pooled.scale)
    model.error_scale = np.where(np.isnan(scale), 1.0, scale)
    scores, ranges, judged = [], [], []
    for events, vectors in arrays(sides):
        error = model.errors(events, vectors)[0]
        if (~np.isnan(error)).any():
            scores.append(float(np.nanmax(error)))
            ranges.append(float(np.nanmax(model.normaliser.range_excess(events, vectors))))
            judged.append(int((~np.isnan(error)).sum()))
    # the two tests share the target false-positive rate, half each (as the probability rule's bounds)
    target = config.evaluation.target_fpr / 2
    model.threshold = max(fit_threshold(scores, target),
                          gaussian_threshold(float(np.mean(judged)) if judged else 1.0, target))
    model.range_threshold = max(fit_threshold(ranges, target), RANGE_FLOOR)
    model.history, model.calibration_sessions = history, len(scores)
    return model


def stage(checkpoint: dict, config, logger, leave_out=None) -> ParameterModel | None:
    """The stage after training (evaluate.after_training): the model trained where the data has times or
    values and parameter.enabled, into the checkpoint ("parameter_model"), without the training sessions
    `leave_out` names; None otherwise."""
    if not config.parameter.enabled or not data_has_parameters(config):
        return None
    started = time.time()
    model = train_parameter_model(config, checkpoint["model_args"]["vocab_size"], logger.info, leave_out)
    checkpoint["parameter_model"] = model_state(model)
    logger.info(f"Parameter model: trained in {utils.format_duration(time.time() - started)}; the "
                f"parameter rule flags a session with a time or value farther than {model.threshold:.3g} "
                f"spreads from what the model expects there, or {model.range_threshold:.3g} scales beyond "
                f"its event type's training range (fitted on {model.calibration_sessions} normal "
                f"calibration sessions at target FPR {config.evaluation.target_fpr:.2%})")
    if model.calibration_sessions < FEW_TO_MEASURE:
        logger.warning(f"The parameter rule's thresholds rest on {model.calibration_sessions} calibration "
                       f"session(s) with times or values, too few to promise its target false-positive rate: "
                       f"on such data it has flagged 2-9% of normal sessions (benchmarks/README.md); train "
                       f"on more sessions, or raise data.validation_split")
    return model


def evaluate_parameter_model(model: ParameterModel, config) -> dict:
    """The parameter rule (and the per-type baseline, at a threshold fitted the same way) on the evaluation
    half of the normal validation split and on the sessions labelled abnormal: flagged counts, and the
    findings of the first abnormal sessions flagged."""
    calibration = (baseline_score(model.normaliser, r.event_ids, event_vectors(r.times, r.values))
                   for r in records_of(config, (CALIBRATION,)))
    target = config.evaluation.target_fpr
    baseline_threshold = fit_threshold([s for s in calibration if s is not None], target)
    result = {"threshold": model.threshold, "range_threshold": model.range_threshold,
              "baseline_threshold": baseline_threshold, "examples": []}
    sides = (("normal", records_of(config, (EVALUATION,))), ("abnormal", records_of(config, (), 1)))
    for side, records in sides:
        count = flagged = baseline_flagged = 0
        for record in records:
            vectors = event_vectors(record.times, record.values)
            found = model.score(record.event_ids, vectors)
            base = baseline_score(model.normaliser, record.event_ids, vectors)
            count += 1
            flagged += found is not None and found["score"] > 1
            baseline_flagged += base is not None and base > baseline_threshold
            if side == "abnormal" and found is not None and found["score"] > 1 \
                    and len(result["examples"]) < 3:
                result["examples"].append({"session_id": record.session_id, **model.finding(
                    record.event_ids, record.times, record.values, found)})
        result[side] = {"sessions": count, "flagged": flagged, "baseline_flagged": baseline_flagged}
    return result


def report_lines(p: dict) -> list[str]:
    """The PARAMETER MODEL section: its rule and the per-type baseline, flagged normal and abnormal."""
    lines = ["PARAMETER MODEL (times and values of each event, values.py)", "-" * 72,
             f"  Thresholds: {p['threshold']:.3g} spreads from the model's prediction, or "
             f"{p['range_threshold']:.3g} scales beyond the type's training range (the per-type baseline, "
             f"|value| alone: {p['baseline_threshold']:.3g})"]
    for side, what in (("normal", "FPR"), ("abnormal", "recall")):
        s = p[side]
        if s["sessions"]:
            lines.append(f"  {side:<9} sessions {s['sessions']:>7}: parameter rule {what} "
                         f"{s['flagged'] / s['sessions']:.4f} ({s['flagged']}), per-type baseline "
                         f"{s['baseline_flagged'] / s['sessions']:.4f} ({s['baseline_flagged']})")
    for example in p["examples"]:
        low, high = example["expected_range"]
        lines.append(f"  e.g. {example['session_id']}: event {example['event']} at position "
                     f"{example['position']}, {example['what']} {example['actual']:.6g}, expected "
                     f"{low:.6g} .. {high:.6g}")
    return lines + [""]
