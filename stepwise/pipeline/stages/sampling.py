"""Stages `sample` (n solutions per training problem from the policy), `grade`, and `eval` (greedy
accuracy on held-out problems)."""
from __future__ import annotations

from stepwise.data.jsonl import write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.data import problems
from stepwise.pipeline.stages.model import acting_policy, base_policy


def _sampler(ctx: StageContext, model_dir: str, batch_size: int):
    from stepwise.sampling import make_sampler

    return make_sampler(ctx.config.sampling.backend, model_dir, batch_size=batch_size)


def grade_records(task: str, records: list[dict]) -> list[dict]:
    from stepwise.tasks.grading import grade

    return [{**r, "correct": bool(grade(task, r["response"], r["answer"]))} for r in records]


@stage("sample", depends=("export", "init", "data"), config_keys=("sampling", "run.seed", "skywork_dapo.generator"),
       iterative=True)
def sample(ctx: StageContext) -> dict:
    from stepwise.sampling import sample_to_shards

    config = ctx.config.sampling
    chosen = problems(ctx, "train")[: config.n_problems]
    params = config.params
    sampler = _sampler(ctx, acting_policy(ctx, "generator")[1], config.batch_size)
    shards = sample_to_shards(sampler, chosen, "problem", params, ctx.dir("sample") / "shards",
                              shard_size=config.shard_size, desc="sample")
    sampler.close()
    return {"problems": len(chosen), "samples_per_problem": params.n, "shards": len(shards)}


@stage("grade", depends=("sample",), config_keys=("task.name",), iterative=True)
def grade_samples(ctx: StageContext) -> dict:
    from stepwise.sampling import read_shards

    graded = grade_records(ctx.config.task.name, read_shards(ctx.path("sample") / "shards"))
    write_jsonl(ctx.dir("grade") / "graded.jsonl", graded)
    by_problem: dict[str, list[bool]] = {}
    for record in graded:
        by_problem.setdefault(record["id"], []).append(record["correct"])
    return {
        "samples": len(graded),
        "sample_accuracy": sum(r["correct"] for r in graded) / max(1, len(graded)),
        "pass_at_n": sum(any(v) for v in by_problem.values()) / max(1, len(by_problem)),
        "all_wrong_problems": sum(not any(v) for v in by_problem.values()),
    }


def greedy_accuracy(ctx: StageContext, model_dir: str, name: str, stage_name: str = "eval") -> dict:
    """Greedy (temperature 0) accuracy of `model_dir` on the first eval.n_problems test problems; the
    generations go to the directory of `stage_name` (the calling stage)."""
    from stepwise.sampling import SamplingParams, read_shards, sample_to_shards

    config = ctx.config.eval
    test = problems(ctx, "test")[: config.n_problems]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=config.max_tokens, seed=0)
    sampler = _sampler(ctx, model_dir, config.batch_size)
    out = ctx.dir(stage_name) / f"{name}.generations"
    sample_to_shards(sampler, test, "problem", params, out, shard_size=len(test), desc=f"eval {name}")
    sampler.close()
    graded = grade_records(ctx.config.task.name, read_shards(out))
    write_jsonl(ctx.dir(stage_name) / f"{name}.graded.jsonl", graded)
    correct = sum(r["correct"] for r in graded)
    return {"problems": len(graded), "correct": correct, "accuracy": correct / max(1, len(graded))}


@stage("eval", depends=("export", "init", "data"), config_keys=("eval",))
def evaluate(ctx: StageContext) -> dict:
    return {"base": greedy_accuracy(ctx, base_policy(ctx)[1], "base")}
