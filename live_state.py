"""The state file of a live run (detect.py --follow --output FILE: FILE.state, or --state PATH), what makes it
restartable: the place in each input, the parser's counts and windows, the open sessions and the output's
length, saved atomically, loaded with weights_only and checked before a run goes on from it.

Example (what a stopped run saved):

    import torch

    state = torch.load("alerts.jsonl.state", weights_only=True)
    print(state["sources"], state["output_bytes"], len(state["detector"]["keys"]), "open sessions")
"""
from __future__ import annotations

from pathlib import Path

import torch

import utils
from live_sessions import LiveDetector
from live_sources import FollowedFile, LineParser
from utils import one_line

STATE_FORMAT = "deeplog-detect-state"
STATE_VERSION = 2   # 2: the open sessions as flat tensors
CHANGEABLE = ("idle_lines", "idle_seconds")   # identity keys a run may change on a restart: the open
                                              # sessions are kept and the new setting closes them from then on


# ----------------------------------------------------------------------------- live: the place, saved
class LiveState:
    """The state file's one owner: save() writes tensors and plain types atomically, load() checks it (a
    damaged one, or one another command wrote, is one clear error, never a run that starts elsewhere)."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity

    def save(self, detector: LiveDetector, sources: list[FollowedFile], parser: LineParser,
             output_bytes: int) -> None:
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "identity": self.identity,
                 "output_bytes": output_bytes, "sources": [source.place() for source in sources],
                 "parser": parser.state(), "detector": detector.state_dict()}
        utils.atomic_write(self.path, lambda handle: torch.save(state, handle))

    def load(self, columns, state_names=None) -> dict | None:
        """The saved state, checked (its sessions' score columns must be `columns`, their model state the
        tensors `state_names`: DeepLog.state_names), or None if none."""
        if not self.path.exists():
            return None
        again = f"remove {self.path} (and the output it belongs to) to start over"
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (any unreadable file: one message, never a traceback)
            raise utils.ConfigError(f"{self.path}: not a readable detect.py state ({one_line(error, 160)}); "
                                    f"{again}") from None
        problem = state_problem(state, self.identity, columns, state_names)
        if problem:
            raise utils.ConfigError(f"{self.path}: {problem}; {again}")
        return state

    def changed(self, state: dict) -> list[str]:
        """The CHANGEABLE settings this run gives otherwise than the run that saved `state`."""
        saved = state["identity"]
        return [key for key in CHANGEABLE if saved.get(key) != self.identity.get(key)]


def state_problem(state, identity: dict, columns, state_names=None) -> str | None:
    """What is wrong with a loaded state (None: nothing): its form, and whether this command wrote it."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return "not a detect.py state"
    if state.get("version") != STATE_VERSION:
        return f"state version {utils.short(state.get('version'))}, this detect.py reads {STATE_VERSION}"
    saved = state.get("identity")
    if not isinstance(saved, dict):
        return "no 'identity'"
    for key, value in identity.items():
        if saved.get(key) != value and key not in CHANGEABLE:
            return (f"written by a run with {key} {utils.short(saved.get(key))}, not {utils.short(value)} as "
                    f"now: give that run's command again")
    detector, sources = state.get("detector"), state.get("sources")
    checks = [("output_bytes", isinstance(state.get("output_bytes"), int) and state["output_bytes"] >= 0),
              ("sources", isinstance(sources, list) and len(sources) == len(identity["inputs"]) and all(
                  isinstance(s, dict) and all(isinstance(s.get(k), int) and s[k] >= 0
                                              for k in ("device", "inode", "offset", "line"))
                  for s in sources)),
              ("parser", isinstance(state.get("parser"), dict) and
               isinstance(state["parser"].get("counts"), dict)),
              ("detector", isinstance(detector, dict) and isinstance(detector.get("seq"), int) and
               isinstance(detector.get("totals"), dict))]
    for key, ok in checks:
        if not ok:
            return f"'{key}' is damaged"
    return sessions_problem(detector, columns, state_names)


def sessions_problem(detector: dict, columns, state_names=None) -> str | None:
    """What is wrong with a saved detector's open sessions (LiveDetector.state_dict, its score columns
    named `columns`), None if nothing."""
    keys = detector.get("keys")
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys) and
            len(set(keys)) == len(keys)):
        return "the open sessions' keys are damaged"
    count = len(keys)
    for name, dtype in (("first_seq", torch.long), ("last_seq", torch.long), ("last_time", torch.float64),
                        ("alerted", torch.bool), ("lengths", torch.long)):
        value = detector.get(name)
        if not (isinstance(value, torch.Tensor) and value.dtype == dtype and value.shape == (count,)):
            return f"the open sessions' {name!r} is damaged"
    lengths, events = detector["lengths"], detector.get("events")
    if not (isinstance(events, torch.Tensor) and events.dtype == torch.long and events.dim() == 1 and
            bool((lengths > 0).all()) and len(events) == int(lengths.sum()) and bool((events >= 0).all())):
        return "the open sessions' events are damaged"
    misses = detector.get("misses")
    if not (isinstance(misses, dict) and isinstance(misses.get("sessions"), list) and
            isinstance(misses.get("misses"), list) and len(misses["sessions"]) == len(misses["misses"]) and
            all(isinstance(i, int) and 0 <= i < count for i in misses["sessions"]) and
            all(isinstance(m, list) and all(isinstance(d, dict) for d in m) for m in misses["misses"])):
        return "the open sessions' misses are damaged"
    model = detector.get("model")   # the model's state tensors by name (DeepLog.state_names), "columns"
    if not (isinstance(model, dict) and len(model) > 1 and
            (state_names is None or set(model) == {*state_names, "columns"}) and
            all(isinstance(v, torch.Tensor) and v.dim() == 3 and v.size(1) == count
                for k, v in model.items() if k != "columns") and
            isinstance(model.get("columns"), dict) and set(model["columns"]) == set(columns) and
            all(isinstance(v, torch.Tensor) and v.shape == (count,) for v in model["columns"].values())):
        return "the open sessions' model state is damaged"
    return None
