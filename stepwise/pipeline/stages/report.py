"""Stage `report`: `report.json` (every stage's summary) and `report.md` (tables a person reads)."""
from __future__ import annotations

import json

from stepwise.data.jsonl import atomic_write_json, atomic_write_text
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.machine import machine_facts, machine_lines
from stepwise.pipeline.plots import Plots, write_plots
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.dqo_train import table_lines as dqo_table_lines
from stepwise.pipeline.runner import label, stage_plan


def _markdown(ctx: StageContext, report: dict, plots: Plots) -> str:
    config = ctx.config
    lines = [f"# stepwise report: {config.run.name}", "",
             f"Run directory: `{ctx.run_dir}`; task `{config.task.name}`; layout TP={config.parallel.tp} "
             f"PP={config.parallel.pp} x {config.parallel.world_size} processes.", ""]
    evals = accuracy_rows(report)
    if evals:
        lines += [f"## Greedy accuracy on held-out problems ({config.eval.split} split)", "",
                  "| policy | problems | correct | accuracy |",
                  "|---|---|---|---|"]
        for name, row in evals.items():
            lines.append(f"| {name} | {row['problems']} | {row['correct']} | {row['accuracy']:.3f} |")
        lines.append("")
    lines += dqo_table_lines(report["stages"])
    grade = report["stages"].get("grade")
    if grade:
        lines += ["## Samples from the policy", "", f"- samples: {grade['samples']}",
                  f"- sample accuracy: {grade['sample_accuracy']:.3f}", f"- pass@n: {grade['pass_at_n']:.3f}",
                  f"- problems with no correct sample: {grade['all_wrong_problems']}", ""]
    sft = report["stages"].get("sft", {}).get("final")
    if sft:
        lines += ["## SFT", "", f"- steps: {sft.get('step')}, final loss {sft.get('loss', float('nan')):.4f}, "
                  f"{sft.get('tokens_per_s', 0):,.0f} tokens/s", ""]
    for iteration in range(1, ctx.config.skywork_dapo.iterations + 1):
        critic, advantage = (report["stages"].get(label(name, iteration), {}) for name in ("critic", "advantage"))
        lines += _critic_lines(critic, advantage, "" if iteration == 1 else f", iteration {iteration}")
    lines += plots.markdown()
    lines += ["## Stages", "", "| stage | seconds | tokens/s |", "|---|---|---|"]
    for name, seconds in report["seconds"].items():
        rate = tokens_per_second(name, report["stages"], seconds)
        lines.append(f"| {name} | {seconds:.1f} | {'-' if rate is None else f'{rate:,.0f}'} |")
    lines += ["", *machine_lines(report["machine"])]
    return "\n".join(lines) + "\n"


def tokens_per_second(name: str, stages: dict, seconds: float) -> float | None:
    """A stage's throughput: the tokens a sampling stage generated over its time (the `sample` stage's are
    counted by `grade`), or a training stage's last logged tokens/s; None when the stage reports neither."""
    summary = stages.get(name, {})
    if name.endswith("sample"):
        generated = stages.get(name[: -len("sample")] + "grade", {}).get("sampled_tokens")
    else:
        generated = summary.get("generated_tokens")
    if generated and seconds > 0:
        return generated / seconds
    return summary.get("final", {}).get("tokens_per_s")


def accuracy_rows(report: dict) -> dict[str, dict]:
    """Every greedy evaluation in the report (base, each iteration, ablations), in run order."""
    rows = {}
    for summary in report["stages"].values():
        rows.update({k: v for k, v in summary.items() if isinstance(v, dict) and "accuracy" in v and "problems" in v})
    return rows


def _critic_lines(critic: dict, advantage: dict, which: str) -> list[str]:
    if not critic:
        return []
    lines = [f"## Critic (V vs Monte-Carlo values{which})", "", "| states | corr | BCE | BCE of constant |", "|---|---|---|---|"]
    for split in ("train", "held_out"):
        row = critic.get(split)
        if row and row.get("states"):
            lines.append(f"| {split}: {row['states']} | {row['corr']:.3f} | {row['bce']:.4f} | {row['bce_constant']:.4f} |")
    held = critic.get("held_out") or critic.get("train") or {}
    if held.get("calibration"):
        lines += ["", "Calibration (held-out when available): mean predicted V vs mean MC per bin of V", "",
                  "| V bin | states | mean V | mean MC |", "|---|---|---|---|"]
        lines += [f"| {b['bin']} | {b['states']} | {b['mean_v']:.3f} | {b['mean_mc']:.3f} |" for b in held["calibration"]]
    if advantage:
        lines += ["", f"Advantage data: {advantage['actions']} unique actions from {advantage['states_kept']} of "
                      f"{advantage['states']} states (gap >= delta); mean gap {advantage['mean_gap']:.3f}; "
                      f"{advantage['positive_actions']} with positive advantage."]
    return lines + [""]


@stage("report", depends=("*",), config_keys=("run.name",))
def write_report(ctx: StageContext) -> dict:
    from stepwise.pipeline import manifest

    stages, seconds = {}, {}
    for name, iteration in stage_plan(ctx.config):
        if name == "report":
            continue
        found = manifest.read(ctx.at(iteration).path(name), ctx.run_dir) or {}
        stages[label(name, iteration)] = found.get("summary", {})
        seconds[label(name, iteration)] = found.get("seconds", 0.0)
    report = {"run": ctx.config.run.name, "run_dir": str(ctx.run_dir), "stages": stages, "seconds": seconds,
              "machine": machine_facts(ctx.config.parallel.nproc_per_node)}
    atomic_write_json(ctx.run_dir / "report.json", json.loads(json.dumps(report, default=str)))
    plots = write_plots(ctx.run_dir, report["stages"], accuracy_rows(report), ctx.config.task.name)
    atomic_write_text(ctx.run_dir / "report.md", _markdown(ctx, report, plots))
    return {"report": str(ctx.run_dir / "report.md")}
