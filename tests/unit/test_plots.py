"""The report's plots: a small synthetic run (the manifests, actions.jsonl and metrics.jsonl a run writes)
gets valid, non-blank PNGs that report.md embeds exactly; missing data skips a plot; no matplotlib skips
them all with one line; the calibration plot puts both critic splits beside the diagonal."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from stepwise.config import load_recipe
from stepwise.data.jsonl import DataError, write_jsonl
from stepwise.pipeline import manifest
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.plots import critic_summaries, draw_calibration, write_plots
from stepwise.pipeline.stages.report import write_report

matplotlib = pytest.importorskip("matplotlib")
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "smoke.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGES = "[eval,critic,advantage,policy,dapo_eval,mc_ablation,report]"


def _split(states: int, corr: float, bins: list[tuple[float, float, int]]) -> dict:
    return {"states": states, "corr": corr, "bce": 0.6, "bce_constant": 0.5,
            "calibration": [{"bin": f"{v:.1f}", "mean_v": v, "mean_mc": mc, "states": n} for v, mc, n in bins]}


CRITIC = {"train": _split(40, 0.7, [(0.1, 0.15, 10), (0.5, 0.45, 20), (0.9, 0.85, 10)]),
          "held_out": _split(12, 0.1, [(0.1, 0.6, 4), (0.5, 0.3, 4), (0.9, 0.35, 4)])}
ADVANTAGE = {"actions": 4, "states_kept": 2, "states": 3, "mean_gap": 0.4, "positive_actions": 2}


def _finish(run_dir: Path, stage_dir: str, summary: dict) -> None:
    manifest.write(run_dir / stage_dir, run_dir, stage_dir.rsplit("/", 1)[-1], "key", summary, 1.0)


def _actions(path: Path, advantages: list[float]) -> None:
    write_jsonl(path, [{"state_id": str(i), "action": "=1\n", "advantage": a} for i, a in enumerate(advantages)])


def _metrics(path: Path, losses: list[float]) -> None:
    write_jsonl(path, [{"step": step, "loss": loss, "lr": 1e-3} for step, loss in enumerate(losses, 1)])


def _synthetic_run(run_dir: Path) -> StageContext:
    """Two Skywork DAPO iterations and the MC ablation, as their stages leave them."""
    config = load_recipe(RECIPE, [f"run.dir={run_dir}", f"run.stages={STAGES}", "skywork_dapo.iterations=2"])
    _finish(run_dir, "eval", {"base": {"accuracy": 0.25, "correct": 16, "problems": 64}})
    for prefix, accuracy in (("", 0.375), ("iteration_2/", 0.5)):
        _finish(run_dir, f"{prefix}critic", CRITIC)
        _finish(run_dir, f"{prefix}advantage", ADVANTAGE)
        _actions(run_dir / f"{prefix}advantage" / "actions.jsonl", [-0.4, -0.1, 0.2, 0.5])
        _finish(run_dir, f"{prefix}policy", {})
        _metrics(run_dir / f"{prefix}policy" / "checkpoints" / "metrics.jsonl", [0.9, 0.7, 0.6])
        name = "iteration_1" if not prefix else "iteration_2"
        _finish(run_dir, f"{prefix}dapo_eval", {name: {"accuracy": accuracy, "correct": int(64 * accuracy), "problems": 64}})
    _finish(run_dir, "mc_ablation", {"mc_same_steps": {"accuracy": 0.3125, "correct": 20, "problems": 64}})
    _actions(run_dir / "mc_ablation" / "actions.jsonl", [-0.3, 0.0, 0.3])
    _metrics(run_dir / "mc_ablation" / "checkpoints" / "metrics.jsonl", [0.8, 0.75])
    return StageContext(config, run_dir)


def _embedded(report_md: str) -> list[str]:
    return re.findall(r"!\[[^\]]+\]\(([^)]+)\)", report_md)


def test_report_renders_every_plot_as_a_png_and_embeds_exactly_those(tmp_path):
    from matplotlib.image import imread

    write_report(_synthetic_run(tmp_path))
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "plots").iterdir())
    assert written == ["plots/accuracy.png", "plots/advantage.png", "plots/calibration.png", "plots/training.png"]
    assert sorted(_embedded((tmp_path / "report.md").read_text())) == written
    for path in written:
        assert (tmp_path / path).read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(tmp_path / path)
        colours = {tuple(pixel) for pixel in pixels[::4, ::4].reshape(-1, pixels.shape[-1]).tolist()}
        assert len(colours) >= 5, f"{path} looks blank ({len(colours)} colours)"


def test_a_plot_without_data_is_skipped_and_its_stale_file_removed(tmp_path):
    stale = tmp_path / "plots" / "calibration.png"
    stale.parent.mkdir()
    stale.write_bytes(PNG_SIGNATURE)
    accuracy = {"base": {"accuracy": 0.5, "correct": 2, "problems": 4}}
    plots = write_plots(tmp_path, {"eval": {"base": accuracy["base"]}}, accuracy, "arith")
    assert [path for _, path in plots.written] == ["plots/accuracy.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png"]
    assert _embedded("\n".join(plots.markdown())) == ["plots/accuracy.png"]
    nothing = write_plots(tmp_path, {}, {}, "arith")
    assert nothing.written == [] and nothing.markdown() == [] and not any((tmp_path / "plots").iterdir())


def test_without_matplotlib_the_report_says_plots_were_skipped(tmp_path, monkeypatch):
    ctx = _synthetic_run(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    write_report(ctx)
    report_md = (tmp_path / "report.md").read_text()
    assert [line for line in report_md.splitlines() if line.startswith(("Plots", "## Plots"))] == [
        "Plots skipped: matplotlib is not installed (pip install matplotlib)."]
    assert _embedded(report_md) == [] and not (tmp_path / "plots").exists()
    assert json.loads((tmp_path / "report.json").read_text())["stages"]["critic"] == CRITIC


def test_calibration_puts_train_and_held_out_beside_the_diagonal():
    from matplotlib.figure import Figure

    figure = Figure()
    assert draw_calibration(figure, critic_summaries({"critic": CRITIC, "iteration_2/critic": CRITIC, "eval": {}}))
    assert len(figure.axes) == 2
    axes = figure.axes[0]
    diagonal = axes.lines[0]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    points = [collection.get_offsets().tolist() for collection in axes.collections]
    assert points == [[[b["mean_v"], b["mean_mc"]] for b in CRITIC[split]["calibration"]] for split in ("train", "held_out")]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend[1:] == ["train: 40 states, corr 0.70, BCE 0.600 (constant 0.500)",
                          "held_out: 12 states, corr 0.10, BCE 0.600 (constant 0.500)"]


def test_a_bad_metrics_line_is_reported_with_its_file_and_line(tmp_path):
    metrics = tmp_path / "sft" / "checkpoints" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 1, "loss": 1.0}\n{"step": 2}\n')
    with pytest.raises(DataError, match=re.escape(f"{metrics}:2: missing key 'loss'")):
        write_plots(tmp_path, {"sft": {}}, {}, "arith")
