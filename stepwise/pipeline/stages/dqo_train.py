"""DQO and its baselines (DQO paper §4.2, appendix B): one stage per method, each named after its
train section: `sft_baseline` (SFT on gold solutions), `rs_baseline` (rejection sampling), `dpo`,
`kto`, `dro` and `dqo`. Each trains from pi0 on its `dqo_datasets` file, exports the policy to HF and
evaluates it greedily on the held-out problems, and with `dqo_data.eval_seeds` = k > 0 also by
sampling (one response per problem per seed at `dqo_data.params`' temperature / top_p / top_k, seeds
params.seed .. params.seed + k - 1: the paper's "same parameters as the training corpus, 5 seeds").
`dqo_base_eval` gives pi0's sampled accuracy for the same table (its greedy one is the `eval` stage's).
A method whose data set is smaller than one global batch is skipped, saying so in its summary.
"""
from __future__ import annotations

import math
from dataclasses import replace

from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.dqo_data import DATASETS
from stepwise.pipeline.stages.model import base_policy, export_checkpoint, last_metrics, train_section
from stepwise.pipeline.step import in_step

METHODS = ("sft_baseline", "rs_baseline", "dpo", "kto", "dro", "dqo")  # the paper's table order
EVAL_KEYS = ("eval", "dqo_data.eval_seeds", "dqo_data.params", "sampling.backend", "task.name")
VALUE_KEYS = {method: ("dqo_data.value_model", "dqo_data.value_init") for method in ("dqo", "dro")}  # V_phi's structure


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def sampled_accuracy(ctx: StageContext, model_dir: str, name: str, stage_name: str) -> dict | None:
    """Accuracy of one sampled response per test problem, per seed; None when eval_seeds is 0."""
    if not ctx.config.dqo_data.eval_seeds:
        return None
    return in_step(ctx, evaluate_sampled, model_dir=model_dir, name=name, stage_name=stage_name)


def evaluate_sampled(ctx: StageContext, model_dir: str, name: str, stage_name: str) -> dict:
    """(In a launched step, one worker.) The per-seed sampled accuracies of `sampled_accuracy`."""
    from stepwise.data.jsonl import write_jsonl
    from stepwise.pipeline.stages.data import problems
    from stepwise.pipeline.stages.sampling import grade_records, make_replica
    from stepwise.sampling import read_shards, sample_to_shards

    config, data = ctx.config, ctx.config.dqo_data
    test = problems(ctx, ctx.config.eval.split)[: config.eval.n_problems]
    sampler = make_replica(ctx, model_dir, config.eval.batch_size)
    accuracies = []
    for k in range(data.eval_seeds):
        params = replace(data.params, n=1, max_tokens=config.eval.max_tokens, seed=data.params.seed + k)
        out = ctx.dir(stage_name) / f"{name}.sampled_{k}.generations"
        sample_to_shards(sampler, test, "problem", params, out, shard_size=max(1, len(test)), desc=f"sample {name} #{k}")
        graded = grade_records(config.task.name, read_shards(out))
        write_jsonl(ctx.dir(stage_name) / f"{name}.sampled_{k}.graded.jsonl", graded)
        accuracies.append(sum(r["correct"] for r in graded) / max(1, len(graded)))
    sampler.close()
    mean, std = mean_std(accuracies)
    return {"mean": mean, "std": std, "per_seed": accuracies, "n_problems": len(test)}


@stage("dqo_base_eval", depends=("export", "init", "data"), config_keys=EVAL_KEYS)
def dqo_base_eval(ctx: StageContext) -> dict:
    """pi0's sampled accuracy for the DQO table (nothing when dqo_data.eval_seeds is 0)."""
    sampled = sampled_accuracy(ctx, base_policy(ctx)[1], "base", "dqo_base_eval")
    return {"sampled": sampled} if sampled else {}


def train_method(ctx: StageContext, method: str) -> dict:
    """Train section `method` from pi0 on its data set, export, evaluate."""
    from stepwise.pipeline.stages.dapo_train import export_and_evaluate

    records = ctx.summary("dqo_datasets")["sizes"][method]
    train = getattr(ctx.config, method)
    if records < train.global_batch_size:
        print(f"[stepwise] {method}: {records} records, fewer than one global batch "
              f"({method}.global_batch_size={train.global_batch_size}): skipped", flush=True)
        return {"records": records, "skipped": f"{records} records < one global batch of {train.global_batch_size}"}
    checkpoints = train_section(ctx, method, ctx.path("dqo_datasets") / DATASETS[method], base_policy(ctx)[0])
    summary = {"records": records, "checkpoints": str(checkpoints), "final": last_metrics(checkpoints),
               **export_and_evaluate(ctx, method, str(checkpoints), method)}
    if method in VALUE_KEYS:  # which V_phi it trained (the report names it); a separate one is exported too
        summary["value_model"] = ctx.config.dqo_data.value_model
        if summary["value_model"] == "separate":
            value_dir = ctx.dir(method) / "value_network"
            export_checkpoint(ctx, checkpoints, value_dir, part="value_network", progress=False)
            summary["value_network"] = str(value_dir)
    sampled = sampled_accuracy(ctx, summary["policy"], method, method)
    return {**summary, "sampled": sampled} if sampled else summary


def _register(method: str) -> None:
    def run(ctx: StageContext) -> dict:
        return train_method(ctx, method)

    run.__doc__ = f"DQO paper baseline/method `{method}`: train section `{method}` on dqo_datasets/{DATASETS[method]}."
    stage(method, depends=("dqo_datasets", "sft", "init", "export", "data"),
          config_keys=(method, *EVAL_KEYS, "model", "parallel", "run.seed", *VALUE_KEYS.get(method, ())))(run)


for _method in METHODS:
    _register(_method)


def table_lines(stages: dict) -> list[str]:
    """The paper's Table 3/4 for this run's benchmark: greedy and sampled accuracy per method."""
    present = [m for m in METHODS if m in stages]
    if not present:
        return []

    def cells(greedy: dict | None, sampled: dict | None) -> str:
        first = f"{greedy['accuracy']:.3f} ({greedy['correct']}/{greedy['problems']})" if greedy else "-"
        second = (f"{sampled['mean']:.3f} ± {sampled['std']:.3f} ({len(sampled['per_seed'])} seeds)"
                  if sampled else "-")
        return f"{first} | {second}"

    lines = ["## DQO and baselines (DQO paper Tables 3/4)", "",
             "| method | greedy | sampled (mean ± std over seeds) | training records | steps |", "|---|---|---|---|---|"]
    base = stages.get("eval", {}).get("base")
    lines.append(f"| pi0 (base) | {cells(base, stages.get('dqo_base_eval', {}).get('sampled'))} | - | - |")
    for method in present:
        summary = stages[method]
        if summary.get("skipped"):
            lines.append(f"| {method} | skipped: {summary['skipped']} | | {summary.get('records', '-')} | 0 |")
            continue
        steps = summary.get("final", {}).get("step", "-")
        name = f"{method} (value {summary['value_model']})" if "value_model" in summary else method
        lines.append(f"| {name} | {cells(summary.get(method), summary.get('sampled'))} | "
                     f"{summary.get('records', '-')} | {steps} |")
    data = stages.get("dqo_datasets")
    if data:
        lines += ["", f"Data: {data['trajectories']} trajectories ({data['positives']} correct, {data['negatives']} "
                      f"wrong; {data['dropped_too_long']} too long dropped), {data['sizes']['dpo']} DPO pairs, "
                      f"{data['sizes']['sft_baseline']} gold solutions; process rewards: "
                      f"{'on' if data['process_rewards'] else 'off'}."]
    return lines + [""]
