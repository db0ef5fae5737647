"""`QTuningHistory`: everything Q-Tuning remembers across training steps, in one place.

The trainer mixin owns one (``trainer.qtuning_history``). It holds

* the statistics of the triages since the last logging step (one per optimizer
  step in ``triage_scope: step``, one per micro-batch in ``micro_batch``),
  averaged into the ``qtuning/`` metrics at the next one,
* the running token totals behind ``qtuning/tokens_saved_frac_cumulative``,
* a bounded reservoir of the most recent per-sample points (`EUPoint`) and the
  last mini-batch's thresholds, for the EU-plane plot,
* the triage window (`TriageWindow`, the engine's: the earlier steps' samples that
  ``triage_window`` > 1 pools for the thresholds).

The logged metrics themselves live in the trainer's ``state.log_history``
(checkpointed by transformers); `quadrant_fractions` reads the quadrant plot's
data from there. The history is saved as ``qtuning_state.json`` in every
checkpoint and read back on resume, so that a resumed run logs and plots as
the uninterrupted one would.
Token totals are this process's (the main process's when it logs); sample
counts are over the global mini-batch in data-parallel training.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

from qtuning_plugin.atomic_files import write_json
from qtuning_plugin._logging import LOG
from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS, Triage
from qtuning_plugin.core.window import TriageWindow
from qtuning_plugin.rules import QTuningSettingsError

if TYPE_CHECKING:
    from qtuning_plugin.engine import SelectionEvent

STATE_NAME = "qtuning_state.json"
# Version 1 also held a copy of the logged metrics ("steps"), read now from the trainer's log history;
# version 3 added the triage window ("window").
STATE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
STATE_KEYS = ("pending", "tokens", "points", "thresholds")
WINDOW_SINCE = 3
# Per-sample points kept for the EU-plane plot (the most recent ones).
MAX_POINTS = 2000
THRESHOLDS = ("ppl_hi", "ppl_lo", "ent_lo", "ent_hi")


def triage_thresholds(triage: Triage) -> dict[str, float]:
    """The last bisection iterate's thresholds of a triage, by name."""
    return {name: float(getattr(triage, name)) for name in THRESHOLDS}


class EUPoint(NamedTuple):
    """One sample on the EU plane, as the plot draws it (stored as a JSON list in the state file)."""

    ppl: float
    ent: float
    quadrant: str  # one of QUADRANTS
    filled: bool  # kept by the fill-up rather than by the thresholds
    step: int  # the optimizer step (1-based) whose triage placed it; 0 before training (analyze)


def quadrant_fractions(log_history: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """``{"step": [...], "Q1": [...], ..., "middle": [...]}``: the fraction of samples per quadrant
    at each logged step (averaged over its triages), from the trainer's ``state.log_history``;
    steps without quadrant counts (warm-up, evaluation) are left out."""
    out: dict[str, list[float]] = {"step": [], **{name: [] for name in QUADRANTS}}
    keys = {name: f"qtuning/samples_{name.lower()}" for name in QUADRANTS}
    for entry in log_history:
        counts = {name: entry.get(key) for name, key in keys.items()}
        if any(value is None for value in counts.values()):
            continue
        total = sum(counts.values())
        if total <= 0:
            continue
        out["step"].append(entry["step"])
        for name in QUADRANTS:
            out[name].append(counts[name] / total)
    return out


# What deleting a state file loses, for `QTuningStateError`.
RESET_BY_DELETING = (
    "the running totals behind qtuning/tokens_saved_frac_cumulative restart from zero, the statistics "
    "waiting for the next logging step are dropped, the EU-plane plot shows only the samples of the "
    "steps after the resume, and a triage window (triage_window > 1) starts empty; the model, optimizer, scheduler, step count and the logged metrics (the "
    "quadrant plot) resume from the checkpoint as usual"
)


class QTuningStateError(QTuningSettingsError):
    """A checkpoint's ``qtuning_state.json`` that cannot be read: which file, what is wrong with
    it, and the ways out (stops the run before training resumes)."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        checkpoint = os.path.dirname(os.path.abspath(path))
        super().__init__(
            f"qtuning: cannot resume from {checkpoint}: its {STATE_NAME} {problem}.\n"
            f"Ways out:\n"
            f"  - resume from another checkpoint (an earlier checkpoint-N folder of "
            f"{os.path.dirname(checkpoint)}), or\n"
            f"  - delete {path} and resume from this checkpoint with Q-Tuning's history reset: "
            f"{RESET_BY_DELETING}."
        )


# What is left of a literal or a number that the end of the text cut.
_CUT_TOKEN = re.compile(r"t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?|[-+0-9.eE]*")


def _ends_inside_the_document(text: str, error: json.JSONDecodeError) -> bool:
    """Whether the parser failed only because the text ended: at its end, inside a string, or in a
    literal or number that the end cut."""
    rest = text[error.pos :].rstrip()
    return not rest or error.msg.startswith("Unterminated string") or bool(_CUT_TOKEN.fullmatch(rest))


def _state_problem(text: str) -> Optional[str]:
    """What is wrong with a state file's text, or None where it holds a state this release reads."""
    if not text.strip():
        return "is empty (cut short: the run was probably killed while writing it)"
    try:
        state = json.loads(text)
    except json.JSONDecodeError as error:
        if _ends_inside_the_document(text, error):
            return (
                f"is cut short after {len(text.encode('utf-8'))} bytes (the run was probably killed while "
                f"writing it)"
            )
        return f"is not JSON ({error})"
    if not isinstance(state, dict):
        return f"is not a Q-Tuning state (a JSON {type(state).__name__}, not an object)"
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        if version is None:
            return f"has no format version, which this release cannot read (it reads versions {readable})"
        return (
            f"has format version {version!r}, which this release cannot read (it reads versions {readable}; "
            f"a newer qtuning-plugin may have written it: pip install -U qtuning-plugin)"
        )
    required = STATE_KEYS + (("window",) if version >= WINDOW_SINCE else ())
    missing = [key for key in required if key not in state]
    if missing:
        return f"is not a Q-Tuning state (version {version} without {', '.join(missing)})"
    return None


class QTuningHistory:
    """The per-step state of Q-Tuning training (see the module docstring)."""

    def __init__(self, max_points: int = MAX_POINTS, window: Optional[TriageWindow] = None):
        self.max_points = max_points
        self.window = window if window is not None else TriageWindow(1)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new training run)."""
        self.pending: dict[str, list[float]] = defaultdict(list)
        self.tokens = {"trainable": 0.0, "kept": 0.0}
        self.points: deque[EUPoint] = deque(maxlen=self.max_points)
        self.thresholds: Optional[dict[str, float]] = None
        self.window.clear()

    # ---------------------------------------------------------------- record
    def record(self, stats: dict[str, float], trainable_tokens: float, kept_tokens: float) -> None:
        """One triage's ``qtuning/`` statistics (or a warm-up micro-batch's), with its trainable and
        trained token counts."""
        for key, value in stats.items():
            self.pending[key].append(float(value))
        self.tokens["trainable"] += float(trainable_tokens)
        self.tokens["kept"] += float(kept_tokens)

    def record_samples(self, selection: Any, step: int) -> None:
        """The samples of one `Selection` (this rank's) into the EU-plane reservoir."""
        for ppl, ent, quadrant, filled in zip(
            selection.ppl.tolist(), selection.ent.tolist(), selection.quadrant.tolist(), selection.filled.tolist()
        ):
            if quadrant != NO_TARGET:
                self.points.append(EUPoint(ppl, ent, QUADRANTS[quadrant], filled, step))
        if not math.isnan(selection.triage.alpha):
            self.thresholds = {**triage_thresholds(selection.triage), "step": step}

    def record_event(self, event: "SelectionEvent") -> None:
        """One triage (`qtuning_plugin.engine.SelectionEvent`): its metrics, token counts and samples."""
        self.record(event.stats, event.trainable_tokens, event.kept_tokens)
        if event.selection is not None:
            self.record_samples(event.selection, event.step)

    def flush(self) -> dict[str, float]:
        """The metrics of a logging step: the mean of each statistic since the last one, plus running totals."""
        metrics = {key: sum(values) / len(values) for key, values in self.pending.items() if values}
        self.pending.clear()
        if self.tokens["trainable"]:
            metrics["qtuning/tokens_saved_frac_cumulative"] = 1.0 - self.tokens["kept"] / self.tokens["trainable"]
        return metrics

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "pending": {key: list(values) for key, values in self.pending.items()},
            "tokens": dict(self.tokens),
            "points": [list(point) for point in self.points],
            "thresholds": self.thresholds,
            "window": self.window.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for key, values in state["pending"].items():
            self.pending[key].extend(values)
        self.tokens.update(state["tokens"])
        self.points.extend(EUPoint(*point) for point in state["points"])
        self.thresholds = state["thresholds"]
        self.window.load_state_dict(state.get("window", []))

    def save(self, directory: str) -> str:
        """Write ``directory/qtuning_state.json``; returns its path."""
        return write_json(os.path.join(directory, STATE_NAME), self.state_dict())

    def load(self, directory: str) -> bool:
        """Read ``directory/qtuning_state.json`` if there is one; whether it was found.

        Raises:
            QTuningStateError: the file is there but cannot be read (cut short, not JSON, a
                version this release cannot read).
        """
        path = os.path.join(directory, STATE_NAME)
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise QTuningStateError(path, f"is not JSON (not UTF-8 text: {error})") from None
        problem = _state_problem(text)
        if problem is not None:
            raise QTuningStateError(path, problem)
        state = json.loads(text)
        self.load_state_dict(state)
        if "window" not in state and self.window.steps > 1:
            LOG.warning(
                "qtuning: %s was written by a qtuning-plugin without triage windows; the window of "
                "triage_window=%d starts empty", path, self.window.steps,
            )
        return True
