"""The report's PNG plots: greedy accuracy per policy, critic calibration, the advantage histogram and the
training curves of every section, drawn from a finished run's files into `RUN_DIR/plots/` and embedded in
`report.md` by relative path.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no display). matplotlib is optional: without it
`write_plots` returns no plots and a one-line reason. A plot whose data the run does not have is not drawn,
and a file of that name left by an earlier report is removed, so `report.md` embeds exactly what is there.
Every PNG is written atomically (a temp file in `plots/`, then `os.replace`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stepwise.data.jsonl import atomic_output, iter_jsonl
from stepwise.evaluate.stats import wilson_interval

PLOTS_DIR = "plots"
ADVANTAGE_STAGES = ("advantage", "mc_ablation")  # stages whose actions.jsonl holds the advantages trained on
SAMPLED_BASE_STAGE = "dqo_base_eval"  # its `sampled` row is the base policy's
CRITIC_SPLITS = {"train": "tab:blue", "held_out": "tab:red"}


@dataclass
class Plots:
    """What `write_plots` produced: (title, path relative to the run directory) per PNG, or why none."""

    written: list[tuple[str, str]] = field(default_factory=list)
    skipped: str | None = None

    def markdown(self) -> list[str]:
        if self.skipped:
            return [f"Plots skipped: {self.skipped}.", ""]
        lines = ["## Plots", ""] if self.written else []
        for title, path in self.written:
            lines += [f"![{title}]({path})", ""]
        return lines


def stage_of(label: str) -> str:
    """`iteration_2/critic` -> `critic`."""
    return label.rsplit("/", 1)[-1]


def sampled_rows(stages: dict) -> dict[str, dict]:
    """Sampled accuracy (mean ± std over sampling seeds) per policy name, as the accuracy rows name them."""
    rows = {}
    for label, summary in stages.items():
        sampled = summary.get("sampled")
        if isinstance(sampled, dict) and "mean" in sampled and "std" in sampled:
            rows["base" if label == SAMPLED_BASE_STAGE else label] = sampled
    return rows


def critic_summaries(stages: dict) -> dict[str, dict]:
    """Each critic's summary that has calibration bins for at least one split, by stage label."""
    return {label: summary for label, summary in stages.items() if stage_of(label) == "critic"
            and any((summary.get(split) or {}).get("calibration") for split in CRITIC_SPLITS)}


def advantage_values(run_dir: Path, stages: dict) -> dict[str, list[float]]:
    """The `advantage` of every action trained on, per advantage-producing stage (each iteration, MC ablation)."""
    values = {}
    for label in stages:
        path = run_dir / label / "actions.jsonl"
        if stage_of(label) in ADVANTAGE_STAGES and path.is_file():
            found = [record["advantage"] for record in iter_jsonl(path, {"advantage": float})]
            if found:
                values[label] = found
    return values


def training_curves(run_dir: Path, stages: dict) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, losses) from `<stage>/checkpoints/metrics.jsonl` of every stage that trained."""
    curves = {}
    for label in stages:
        path = run_dir / label / "checkpoints" / "metrics.jsonl"
        if path.is_file():
            records = list(iter_jsonl(path, {"step": int, "loss": float}))
            if records:
                curves[label] = ([r["step"] for r in records], [r["loss"] for r in records])
    return curves


def draw_accuracy(figure, accuracy: dict[str, dict], sampled: dict[str, dict], benchmark: str) -> bool:
    if not accuracy:
        return False
    names = list(accuracy)
    axes = figure.add_subplot()
    width = 0.4 if sampled else 0.7
    greedy = [accuracy[n]["accuracy"] for n in names]
    intervals = [wilson_interval(accuracy[n]["correct"], accuracy[n]["problems"]) for n in names]
    errors = [[max(0.0, g - low) for g, (low, _) in zip(greedy, intervals)],
              [max(0.0, high - g) for g, (_, high) in zip(greedy, intervals)]]
    shift = -width / 2 if sampled else 0.0
    bars = axes.bar([i + shift for i in range(len(names))], greedy, width, yerr=errors, capsize=3,
                    color="tab:blue", label="greedy (95% Wilson interval)")
    axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    if sampled:
        at = [i for i, n in enumerate(names) if n in sampled]
        bars = axes.bar([i + width / 2 for i in at], [sampled[names[i]]["mean"] for i in at], width,
                        yerr=[sampled[names[i]]["std"] for i in at], capsize=3, color="tab:orange",
                        label="sampled (mean ± std over seeds)")
        axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylim(0, 1.2)
    axes.set_ylabel("accuracy")
    axes.set_title(f"{benchmark}: accuracy on held-out problems ({accuracy[names[0]]['problems']} problems)")
    axes.legend(fontsize=8, loc="upper center", ncols=2)
    return True


def draw_calibration(figure, critics: dict[str, dict]) -> bool:
    if not critics:
        return False
    figure.set_size_inches(5.5 * len(critics), 5.5)
    for index, (label, summary) in enumerate(critics.items(), 1):
        axes = figure.add_subplot(1, len(critics), index)
        axes.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
        for split, colour in CRITIC_SPLITS.items():
            row = summary.get(split) or {}
            bins = row.get("calibration") or []
            if not bins:
                continue
            axes.plot([b["mean_v"] for b in bins], [b["mean_mc"] for b in bins], "-", color=colour, alpha=0.6)
            axes.scatter([b["mean_v"] for b in bins], [b["mean_mc"] for b in bins], color=colour,
                         s=[20 + 180 * math.sqrt(b["states"] / max(c["states"] for c in bins)) for b in bins],
                         label=f"{split}: {row['states']} states, corr {row['corr']:.2f}, "
                               f"BCE {row['bce']:.3f} (constant {row['bce_constant']:.3f})")
        axes.set_xlim(-0.03, 1.03)
        axes.set_ylim(-0.03, 1.03)
        axes.set_aspect("equal")
        axes.set_xlabel("critic's predicted V (mean per bin of V)")
        axes.set_ylabel("Monte-Carlo value (mean per bin)")
        axes.set_title(f"{label}: calibration (marker area ~ states)", fontsize=10)
        axes.legend(fontsize=7, loc="upper left")
    return True


def draw_advantages(figure, values: dict[str, list[float]]) -> bool:
    if not values:
        return False
    import numpy as np

    edges = np.histogram_bin_edges(np.concatenate([np.asarray(v, dtype=float) for v in values.values()]), bins=30)
    axes = figure.add_subplot()
    axes.hist(list(values.values()), bins=edges, histtype="bar",  # side by side per bin: none hides another
              label=[f"{label} ({len(found)} actions)" for label, found in values.items()])
    axes.axvline(0.0, color="grey", linewidth=1)
    axes.set_xlabel("advantage")
    axes.set_ylabel("actions")
    axes.set_title("Advantages of the actions trained on")
    axes.legend(fontsize=8)
    return True


def draw_training(figure, curves: dict[str, tuple[list[int], list[float]]]) -> bool:
    if not curves:
        return False
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure.set_size_inches(4.5 * columns, 3.2 * rows)
    for index, (label, (steps, losses)) in enumerate(curves.items(), 1):
        axes = figure.add_subplot(rows, columns, index)
        axes.plot(steps, losses, marker="." if len(steps) <= 50 else None)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.ticklabel_format(axis="y", useOffset=False)
        axes.set_title(label, fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
    return True


def write_plots(run_dir: str | Path, stages: dict, accuracy: dict[str, dict], benchmark: str) -> Plots:
    """Draw every plot the run has data for into `run_dir/plots/`; `stages` is report.json's summaries by
    stage label, `accuracy` its greedy accuracy rows by policy name."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return Plots(skipped="matplotlib is not installed (pip install matplotlib)")
    run_dir = Path(run_dir)
    drawings: list[tuple[str, str, Callable]] = [
        ("accuracy", "Greedy accuracy per policy",
         lambda fig: draw_accuracy(fig, accuracy, sampled_rows(stages), benchmark)),
        ("calibration", "Critic calibration: predicted V vs Monte-Carlo value, train and held-out",
         lambda fig: draw_calibration(fig, critic_summaries(stages))),
        ("advantage", "Advantage histogram", lambda fig: draw_advantages(fig, advantage_values(run_dir, stages))),
        ("training", "Training loss per section", lambda fig: draw_training(fig, training_curves(run_dir, stages))),
    ]
    plots = Plots()
    for name, title, draw in drawings:
        path = run_dir / PLOTS_DIR / f"{name}.png"
        figure = Figure(figsize=(max(6.4, 0.9 * len(accuracy) + 2), 4.8) if name == "accuracy" else (7, 4.5))
        FigureCanvasAgg(figure)
        if not draw(figure):
            path.unlink(missing_ok=True)
            continue
        figure.tight_layout()
        with atomic_output(path) as handle:
            figure.savefig(handle, format="png", dpi=100)
        plots.written.append((title, f"{PLOTS_DIR}/{name}.png"))
    return plots
