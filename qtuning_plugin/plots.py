"""PNG pictures of Q-Tuning: the EU plane and the quadrant fractions over training.

matplotlib is imported on first use only, and drawn off-screen (Agg canvas,
no pyplot state), so that it works on headless training machines. Install it
with ``pip install qtuning-plugin[plots]``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

from qtuning_plugin.atomic_files import atomic_write
from qtuning_plugin.core.triage import QUADRANTS
from qtuning_plugin.history import EUPoint, QTuningHistory, quadrant_fractions

EU_PLANE_PNG = "qtuning_eu_plane.png"
QUADRANTS_PNG = "qtuning_quadrant_fractions.png"
# Up to this many logged steps the quadrant plot draws bars, beyond it stacked areas.
MAX_BARS = 100

COLOURS = {"Q1": "#d62728", "Q2": "#ff7f0e", "Q3": "#1f77b4", "Q4": "#2ca02c", "middle": "#b0b0b0"}
NAMES = {
    "Q1": "Q1 harmful noise (dropped)",
    "Q2": "Q2 misconception (kept, tokens pruned)",
    "Q3": "Q3 redundant (dropped)",
    "Q4": "Q4 calibration (kept whole)",
    "middle": "middle band (dropped)",
}


def _figure(width: float = 7.0, height: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str) -> None:
    """``figure`` as a PNG at ``path``, written atomically (`qtuning_plugin.atomic_files`)."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png")


def plot_eu_plane(
    points: Sequence[EUPoint],
    thresholds: Optional[dict[str, float]],
    path: str,
    *,
    title: str = "Q-Tuning EU plane",
) -> str:
    """Scatter of samples on the Error-Uncertainty plane, coloured by quadrant.

    Args:
        points: the samples (`QTuningHistory.points`); those the fill-up added are drawn
            with a black edge.
        thresholds: ``ppl_hi, ppl_lo, ent_lo, ent_hi`` to draw as lines, or None.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    figure = _figure(9.0, 5.0)
    axes = figure.add_subplot()
    for name in QUADRANTS:
        for filled in (False, True):
            rows = [p for p in points if p.quadrant == name and bool(p.filled) == filled]
            if not rows:
                continue
            axes.scatter(
                [math.log(p.ppl) for p in rows],
                [p.ent for p in rows],
                s=14,
                c=COLOURS[name],
                edgecolors="black" if filled else "none",
                linewidths=0.8,
                alpha=0.75,
                label=f"{NAMES[name]}: {len(rows)}" + (" (fill-up)" if filled else ""),
            )
    if thresholds:
        style = {"color": "black", "linewidth": 0.9}
        axes.axvline(math.log(thresholds["ppl_hi"]), linestyle="--", label="PPL hi / Ent lo", **style)
        axes.axhline(thresholds["ent_lo"], linestyle="--", **style)
        axes.axvline(math.log(thresholds["ppl_lo"]), linestyle=":", label="PPL lo / Ent hi", **style)
        axes.axhline(thresholds["ent_hi"], linestyle=":", **style)
    axes.set_xlabel("log PPL  (sample mean NLL, nats)   error \u2192")
    axes.set_ylabel("Ent  (mean predictive entropy, nats)   uncertainty \u2192")
    axes.set_title(f"{title}\n{len(points)} samples", fontsize=10)
    axes.grid(alpha=0.3)
    if points or thresholds:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save_figure(figure, path)
    return path


def plot_quadrant_fractions(fractions: dict[str, list[float]], path: str) -> str:
    """Stacked fractions of each mini-batch's samples per quadrant, over training steps.

    Args:
        fractions: `qtuning_plugin.history.quadrant_fractions` (``step`` plus one list per quadrant).
        path: the PNG to write.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _figure(9.0, 4.0)
    axes = figure.add_subplot()
    steps = fractions["step"]
    if len(steps) > MAX_BARS:  # a long run: stacked areas
        axes.stackplot(
            steps,
            *[fractions[name] for name in QUADRANTS],
            labels=[NAMES[name] for name in QUADRANTS],
            colors=[COLOURS[name] for name in QUADRANTS],
            alpha=0.85,
        )
    elif steps:  # a short one: one stacked bar per logged step
        bottom = [0.0] * len(steps)
        for name in QUADRANTS:
            axes.bar(steps, fractions[name], bottom=bottom, width=0.8, color=COLOURS[name], label=NAMES[name])
            bottom = [b + f for b, f in zip(bottom, fractions[name])]
    else:
        axes.text(0.5, 0.5, "no pruned step logged yet", ha="center", va="center", transform=axes.transAxes)
    axes.set_ylim(0, 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("fraction of samples")
    axes.set_title("Q-Tuning quadrants per mini-batch")
    if steps:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save_figure(figure, path)
    return path


def write_training_plots(
    history: QTuningHistory, log_history: Sequence[dict[str, Any]], output_dir: str, step: Optional[int] = None
) -> list[str]:
    """Both pictures of a training run into ``output_dir`` (overwritten at each call).

    Args:
        history: the run's `QTuningHistory` (EU-plane points and thresholds).
        log_history: the trainer's ``state.log_history`` (the logged quadrant counts).
    """
    os.makedirs(output_dir, exist_ok=True)
    suffix = f" at step {step}" if step is not None else ""
    return [
        plot_eu_plane(
            list(history.points),
            history.thresholds,
            os.path.join(output_dir, EU_PLANE_PNG),
            title=f"Q-Tuning EU plane: most recent samples{suffix}\n(lines: thresholds of the last mini-batch)",
        ),
        plot_quadrant_fractions(quadrant_fractions(log_history), os.path.join(output_dir, QUADRANTS_PNG)),
    ]
