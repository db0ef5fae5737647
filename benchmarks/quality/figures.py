"""The quality benchmark's pictures (matplotlib, written as PNG).

Every function takes the ``summary`` of `run.py` (per condition, per budget,
per arm: ``acc_mean``/``acc_std`` in % held-out exact match, ``acc`` per seed,
``curve`` points with ``step``, ``tokens``, ``acc`` and ``cost``).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # arm: (colour, line style, marker)
    "full": ("#000000", "-", "o"),
    "random_25": ("#8c8c8c", "--", "s"),
    "qtuning_25x70": ("#1f77b4", "-", "D"),
    "qtuning_12.5x50": ("#2ca02c", "-", "v"),
    "reversed_25x70": ("#d62728", "-.", "^"),
    "triage_only_25": ("#9467bd", "-.", "P"),
    "oracle_clean": ("#555555", ":", "*"),
    "oracle_25": ("#ff7f0e", ":", "X"),
    # the real-model track (real.py)
    "qtuning_25x50": ("#08306b", "-", "d"),
    "reversed_25x50": ("#d62728", "-.", "^"),
}


def _style(arm: str) -> tuple[str, str, str]:
    return STYLE.get(arm, ("#bcbd22", "-", "."))


def _width(arm: str) -> float:
    """Line width: the two arms the comparison is about stand out."""
    return 2.5 if arm in ("full", "qtuning_25x70", "qtuning_25x50") else 1.5


def _save_with_legend_below(fig, ax, ncol: int, legend_height: float, out_path) -> None:
    """One legend for the figure (the entries of ``ax``) under the panels; write the PNG and close."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def _accuracy_bars(ax, cond_summary: dict, arms: list[str]) -> None:
    """Per arm, a bar at equal steps and a lighter one at equal time (mean ± std, seeds as dots);
    the oracles hatched. ``cond_summary``: budget -> arm -> ``acc_mean``, ``acc_std``, ``acc``."""
    width = 0.4
    for budget, offset, alpha in (("equal_steps", -width / 2, 1.0), ("equal_time", width / 2, 0.45)):
        by_arm = cond_summary.get(budget, {})
        xs = [i + offset for i, arm in enumerate(arms) if arm in by_arm]
        present = [arm for arm in arms if arm in by_arm]
        if not present:
            continue
        bars = ax.bar(xs, [by_arm[a]["acc_mean"] for a in present], width, yerr=[by_arm[a]["acc_std"] for a in present],
               capsize=3, color=[_style(a)[0] for a in present], alpha=alpha, edgecolor="k",
               label=budget.replace("_", " ") + ("" if budget == "equal_steps" else " (lighter)"))
        for bar, arm in zip(bars, present):
            if arm.startswith("oracle"):
                bar.set_hatch("//")
        for x, arm in zip(xs, present):
            ax.plot([x] * len(by_arm[arm]["acc"]), by_arm[arm]["acc"], "k.", ms=4)


def plot_arms(cond_summary: dict, arms: list[str], plane, pre_acc: float, title: str, out_path) -> None:
    """Left: accuracy per arm at equal steps and at equal training time. Right: the EU plane of the SFT set before SFT."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    _accuracy_bars(ax, cond_summary, arms)
    ax.axhline(pre_acc, ls="--", c="k", lw=0.8, label="before SFT")
    ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"{title}: mean ± std over seeds (dots); hatched: oracles that use the ground truth", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    ppl, ent, kinds = plane
    for kind, c in (("fresh", "#1f77b4"), ("redundant", "#ff7f0e"), ("corrupted", "#d62728")):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        ax.scatter([math.log(ppl[i]) for i in sel], [ent[i] for i in sel], s=5, alpha=0.5, c=c, label=kind)
    ax.set_xlabel("log PPL (error)")
    ax.set_ylabel("mean entropy, nats (uncertainty)")
    ax.set_title(f"EU plane of the SFT set ({title}, seed 0) under the pre-trained model", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_compute(summaries: dict, arms: list[str], pre_acc: float, out_path) -> None:
    """Accuracy along training against its cost (top: time, bottom: tokens with gradient), one column per condition.

    Lines: full-data SFT's run and each pruned arm's equal-time run, evaluated at
    evenly spaced steps (the first point is the pre-trained model). Hollow
    markers: each pruned arm's equal-step run, at its final cost.
    """
    conds = list(summaries)
    fig, axes = plt.subplots(2, len(conds), figsize=(7 * len(conds), 10.5), squeeze=False)
    for col, cond in enumerate(conds):
        eq, et = summaries[cond]["equal_steps"], summaries[cond].get("equal_time", {})
        for row, (key, scale, label) in enumerate((
                ("cost", 1.0, "training time, as a fraction of full-data SFT's run (measured step times)"),
                ("tokens", 1e-3, "tokens with gradient (thousands)"))):
            ax = axes[row][col]
            for arm in arms:
                run = eq[arm] if arm == "full" else et.get(arm)
                if run is None:
                    continue
                colour, line, marker = _style(arm)
                xs = [0.0] + [p[key] * scale for p in run["curve"]]
                ys = [pre_acc] + [p["acc"] for p in run["curve"]]
                ax.plot(xs, ys, line, color=colour, marker=marker, ms=5, lw=_width(arm),
                        label=f"{arm} ({run['steps']:.0f} steps)")
                if arm != "full":
                    last = eq[arm]["curve"][-1]
                    ax.plot(last[key] * scale, last["acc"], marker, ms=9, mfc="none", mec=colour, mew=1.5)
            if key == "cost":
                ax.axvline(1.0, c="k", lw=0.6, ls=":")
            ax.axhline(pre_acc, c="k", lw=0.6, ls="--", label="before SFT")
            ax.set_xlabel(label, fontsize=9)
            ax.set_ylabel("held-out exact match (%)")
            ax.set_title(f"{cond.replace('_', ' ')}% corrupted: lines = equal-time runs; "
                         "hollow = the same arm at equal steps", fontsize=9)
            ax.grid(alpha=0.3)
    _save_with_legend_below(fig, axes[0][0], 4, 0.06, out_path)


def plot_noise(summary: dict, grid: dict, arms: list[str], pre_acc: float, out_path) -> None:
    """Accuracy at equal steps against the share of corrupted answers, one panel per noise kind.

    ``grid``: kind -> {level in %: condition name}. oracle_clean (drops exactly
    the corrupted samples) is drawn as the ceiling of any noise filter.
    """
    fig, axes = plt.subplots(1, len(grid), figsize=(7 * len(grid), 5.5), squeeze=False)
    for ax, (kind, levels) in zip(axes[0], grid.items()):
        xs = sorted(lv for lv, cond in levels.items() if cond in summary)
        for arm in arms:
            colour, line, marker = _style(arm)
            runs = [summary[levels[lv]]["equal_steps"][arm] for lv in xs]
            ceiling = arm == "oracle_clean"
            ax.errorbar(xs, [r["acc_mean"] for r in runs], yerr=[r["acc_std"] for r in runs], fmt=line, marker=marker,
                        color=colour, lw=3 if ceiling else _width(arm),
                        capsize=3, ms=5, label="oracle_clean (ceiling: drops exactly the corrupted)" if ceiling else arm)
        ax.axhline(pre_acc, c="k", lw=0.6, ls="--", label="before SFT")
        ax.set_xticks(xs, [f"{lv}%" for lv in xs])
        ax.set_xlabel(f"corrupted answers ({kind}: " + ("1-2 digits replaced)" if kind == "digits" else "whole answer redrawn)"))
        ax.set_ylabel("held-out exact match (%), equal steps")
        ax.set_title(f"noise kind '{kind}': mean ± std over seeds", fontsize=9)
        ax.grid(alpha=0.3)
    _save_with_legend_below(fig, axes[0][0], 5, 0.1, out_path)


def _curve_loss(point: dict, n: int) -> float:
    """The held-out loss of a graded point on its first ``n`` problems (from the per-problem sums)."""
    return sum(point["nll"][:n]) / sum(point["tokens"][:n])


def plot_real(summary: dict, runs: list[dict], title: str, out_path) -> None:
    """The real-model track (real.py), at equal cost. (a) held-out loss on the first curve problems
    against the share of the budget spent where it was graded (mean over seeds; 0 is the untrained model); (b) final
    held-out loss and (c) exact match per arm, seeds as dots; (d) the paired loss differences with
    their t 95% intervals."""
    arms = [a for a in summary["arms"] if a != "base"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    n = len(next(r for r in runs if r["arm"] != "base")["points"]["25%"]["nll"])
    base = {r["seed"]: _curve_loss(r["points"]["final"], n) for r in runs if r["arm"] == "base"}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        marks = list(mine[0]["points"])  # the curve's shares, then "final"
        shares = [0.0] + [sum(r["points"][k]["cost"] / r["budget"] for r in mine) / len(mine) for k in marks]
        ys = [sum(base[r["seed"]] for r in mine) / len(mine)]
        ys += [sum(r["points"][k]["loss"] for r in mine) / len(mine) for k in marks[:-1]]
        ys.append(sum(_curve_loss(r["points"]["final"], n) for r in mine) / len(mine))
        colour, line, marker = _style(arm)
        ax.plot(shares, ys, line, color=colour, marker=marker, lw=_width(arm), label=arm)
    ax.set_yscale("log")
    ax.set_xlabel("share of the cost budget spent")
    ax.set_ylabel(f"held-out loss, first {n} problems (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[0][1], "loss", "held-out loss (nats/token)"), (axes[1][0], "acc", "held-out exact match (%)")):
        for x, arm in enumerate(arms):
            values = summary["arms"][arm][key]
            ax.bar(x, sum(values) / len(values), 0.6, color=_style(arm)[0], alpha=0.5, edgecolor="k",
                   hatch="//" if arm.startswith("oracle") else None)
            ax.plot([x] * len(values), values, "k.", ms=6)
        ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title("at the budget: mean (bar) and seeds (dots); hatched: the oracle", fontsize=9)
    ax = axes[1][1]
    names = list(summary["comparisons"])
    for y, name in enumerate(names):
        c = summary["comparisons"][name]["loss"]
        if c["t_ci"] is not None:
            ax.plot(c["t_ci"], [y, y], "-", color="#08306b", lw=2)
        ax.plot([c["mean"]], [y], "o", color="#08306b")
        ax.plot(c["per_seed"], [y] * len(c["per_seed"]), "k.", ms=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("paired held-out loss difference (negative: the first arm is better)")
    ax.set_title("per-seed differences (dots), mean and t 95% interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_selection(cells: dict, sizes, base_rate: float, n_items: int, path, windows: dict) -> None:
    """`selection.py`'s kept-noise share against group size, in two panels.

    Left: one line per sample budget and scoring checkpoint with its bootstrap 95% band, the whole
    set triaged at once as a point at ``n_items``, and the base rate;
    ``cells[checkpoint]["30%"][budget][size]["kept_corrupted_share"]`` holds ``value`` and ``ci``
    (shares in [0, 1]). 25% x 50% and 25% x 70% keep the same samples: one line.
    Right: at 25%, one line per triage window arm and checkpoint against the step's samples,
    ``windows[checkpoint]["25x50"][size][arm]["kept_corrupted_share"]``, and the whole set at once."""
    colours = {"25x50": "#08306b", "12.5x50": "#2ca02c"}
    styles = {"base": ("-", "o"), "sft": ("--", "s")}
    fig, (ax, right) = plt.subplots(1, 2, figsize=(14, 7))
    for ckpt, by_level in cells.items():
        for budget, colour in colours.items():
            rows = [by_level["30%"][budget][str(g)]["kept_corrupted_share"] for g in sizes]
            y = [100 * r["value"] for r in rows]
            line, marker = styles.get(ckpt, ("-.", "^"))
            label = f"{'25% (x 50% and x 70%)' if budget == '25x50' else '12.5% x 50%'}, scored by {ckpt}"
            ax.plot(sizes, y, line, marker=marker, color=colour, label=label)
            ax.fill_between(sizes, [100 * r["ci"][0] for r in rows], [100 * r["ci"][1] for r in rows], color=colour, alpha=0.15)
            whole = by_level["30%"][budget]["all"]["kept_corrupted_share"]["value"]
            ax.plot([n_items], [100 * whole], marker=marker, color=colour, fillstyle="none", linestyle="none")
    ax.set_xlabel("samples triaged together (group size)")
    ax.set_title("Each group triaged on its own")
    arm_colours = {"1": "#08306b", "1 held": "#6baed6", "4": "#ff7f0e", "16": "#d62728"}
    arm_names = {"1": "W = 1 (the paper's rule)", "1 held": "W = 1, budget held", "4": "W = 4", "16": "W = 16"}
    steps = sorted(int(g) for g in next(iter(windows.values()))["25x50"])
    for ckpt, by_budget in windows.items():
        line, marker = styles.get(ckpt, ("-.", "^"))
        for arm, colour in arm_colours.items():
            rows = [by_budget["25x50"][str(g)][arm]["kept_corrupted_share"] for g in steps]
            label = f"{arm_names[arm]}, scored by {ckpt}"
            right.plot(steps, [100 * r["value"] for r in rows], line, marker=marker, color=colour, label=label)
            right.fill_between(steps, [100 * r["ci"][0] for r in rows], [100 * r["ci"][1] for r in rows],
                               color=colour, alpha=0.15)
        whole = cells[ckpt]["30%"]["25x50"]["all"]["kept_corrupted_share"]["value"]
        right.axhline(100 * whole, color="#555555", linestyle=line, linewidth=1,
                      label=f"whole set at once ({n_items}), scored by {ckpt}")
    right.set_xlabel("samples of one step")
    right.set_title("25%: thresholds from a window of W steps")
    for axis, ticks, names in ((ax, [*sizes, n_items], [*map(str, sizes), f"all {n_items}"]),
                               (right, steps, list(map(str, steps)))):
        axis.axhline(100 * base_rate, color="#d62728", linestyle=":", label=f"base rate ({100 * base_rate:.1f}%)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, names)
        axis.set_ylabel("corrupted share of kept samples (%)")
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        axis.grid(alpha=0.3)
    fig.suptitle("Q-Tuning's triage replayed on SmolLM2-135M-Instruct's scores, 30% corrupted data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
