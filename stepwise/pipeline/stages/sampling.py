"""Stages `sample` (n solutions per training problem from the policy), `grade`, and `eval` (greedy
accuracy on held-out problems)."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from pathlib import Path

from stepwise.data.jsonl import atomic_concat, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.data import problems
from stepwise.pipeline.stages.model import acting_policy, base_policy
from stepwise.pipeline.step import in_step, replicas


def make_replica(ctx: StageContext, model_dir: str, batch_size: int):
    """This worker's sampler replica (inside a launched step): vLLM on this worker's group of
    sampling.tensor_parallel_size GPUs, the HF sampler on its own GPU when there is one."""
    import torch

    from stepwise.sampling import make_sampler

    config = ctx.config.sampling
    if config.backend == "vllm":
        return make_sampler("vllm", model_dir, replica=ctx.local_rank, tensor_parallel_size=config.tensor_parallel_size,
                            gpu_memory_utilization=config.gpu_memory_utilization, max_num_seqs=config.max_num_seqs)
    device = f"cuda:{ctx.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return make_sampler(config.backend, model_dir, batch_size=batch_size, device=device)


def sample_shards(ctx: StageContext, model_dir: str, records: list[dict], prompt_key: str, params, out: Path,
                  shard_size: int, batch_size: int, desc: str) -> list[Path]:
    """(In a launched step.) This worker's share of the shards: those with index % world_size == rank.
    The seeding contract of `sampling.base` makes the shards independent of the number of replicas."""
    from stepwise.sampling import sample_to_shards

    sampler = make_replica(ctx, model_dir, batch_size)
    mine = sample_to_shards(sampler, records, prompt_key, params, out, shard_size=shard_size, desc=desc,
                            rank=ctx.rank, world_size=ctx.world_size)
    sampler.close()
    return mine


def solution_text(record: dict) -> str:
    """The text a sampled record is graded on: the whole solution. A rollout from a state (Skywork DAPO's
    completions, DQO's prefix rollouts) carries the solution's text before the state as `prefix` and
    continues it in `response`; a code solution's program is mostly written before the last steps, so
    the grader needs both. A sample from the prompt has no prefix."""
    return record.get("prefix", "") + record["response"]


def grade_records(task: str, records: list[dict]) -> list[dict]:
    from stepwise.tasks.grading import grade

    return [{**r, "correct": bool(grade(task, solution_text(r), r["answer"]))} for r in records]


def correct_as_sft(samples, eos_id: int):
    """Rejection sampling's data: each correct sample as an SFT record of its exact sampled ids."""
    from stepwise.tasks.steps import target_ids

    for r in samples:
        if r["correct"]:
            yield {"prompt": r["problem"], "response": r["response"], "response_ids": target_ids(r, eos_id)}


@stage("sample", depends=("export", "init", "data"), config_keys=("sampling", "run.seed", "skywork_dapo.generator"),
       iterative=True)
def sample(ctx: StageContext) -> dict:
    return in_step(ctx, sample_problems, replicas(ctx))


def sample_problems(ctx: StageContext) -> dict:
    config = ctx.config.sampling
    chosen = problems(ctx, "train")[: config.n_problems]
    out = ctx.dir("sample") / "shards"
    sample_shards(ctx, acting_policy(ctx, "generator")[1], chosen, "problem", config.params, out,
                  config.shard_size, config.batch_size, "sample")
    return {"problems": len(chosen), "samples_per_problem": config.params.n,
            "shards": -(-len(chosen) // config.shard_size)}


@stage("grade", depends=("sample",), config_keys=("task.name",), iterative=True)
def grade_samples(ctx: StageContext) -> dict:
    return in_step(ctx, grade_sample_shards, replicas(ctx))


def grade_sample_shards(ctx: StageContext) -> dict | None:
    """(In a step, on the replicas.) Each worker grades its shards (index % world_size == rank) on a
    process pool into grade/shards/, with per-shard counts (a problem's samples share one shard); rank
    0 streams them into grade/graded.jsonl and sums the counts."""
    source, out = ctx.path("sample") / "shards", ctx.dir("grade") / "shards"
    names = sorted(path.name for path in source.glob("shard_*.jsonl"))
    with grading_pool(ctx) as pool:
        for name in names[ctx.rank::ctx.world_size]:
            if not (out / name).exists():  # a requeued step redoes only what is missing
                grade_shard(ctx.config.task.name, source / name, out / name, pool)
    ctx.barrier()
    if ctx.rank != 0:
        return None
    atomic_concat([out / name for name in names], ctx.path("grade") / "graded.jsonl")
    totals = {key: sum(json.loads((out / f"{name}.counts.json").read_text()).get(key, 0) for name in names)
              for key in ("samples", "correct", "problems", "solved", "all_wrong", "tokens")}
    return {"samples": totals["samples"], "sample_accuracy": totals["correct"] / max(1, totals["samples"]),
            "pass_at_n": totals["solved"] / max(1, totals["problems"]), "all_wrong_problems": totals["all_wrong"],
            "sampled_tokens": totals["tokens"]}


@contextlib.contextmanager
def grading_pool(ctx: StageContext):
    """Worker processes for the graders (math-verify is CPU-bound): this node's cores shared by its ranks."""
    local_workers = max(1, min(ctx.world_size, ctx.config.parallel.nproc_per_node))
    processes = max(1, (os.cpu_count() or 1) // local_workers)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield pool


def _grade_one(task_and_record: tuple[str, dict]) -> bool:
    from stepwise.tasks.grading import grade

    task, record = task_and_record
    return bool(grade(task, solution_text(record), record["answer"]))


def grade_shard(task: str, source: Path, out: Path, pool) -> None:
    """Grade one shard of samples into `out` (records + "correct") and `out`.counts.json."""
    from stepwise.data.jsonl import atomic_write_json, read_jsonl

    records = read_jsonl(source)
    verdicts = pool.map(_grade_one, [(task, record) for record in records], chunksize=16)
    graded = [{**record, "correct": verdict} for record, verdict in zip(records, verdicts)]
    by_problem: dict[str, list[bool]] = {}
    for record in graded:
        by_problem.setdefault(record["id"], []).append(record["correct"])
    atomic_write_json(f"{out}.counts.json", {
        "samples": len(graded), "correct": sum(verdicts), "problems": len(by_problem),
        "tokens": sum(record["num_tokens"] for record in records),
        "solved": sum(any(v) for v in by_problem.values()), "all_wrong": sum(not any(v) for v in by_problem.values())})
    write_jsonl(out, graded)


def greedy_accuracy(ctx: StageContext, model_dir: str, name: str, stage_name: str = "eval") -> dict:
    """Greedy (temperature 0) accuracy of `model_dir` on the first eval.n_problems problems of eval.split, on
    the sampling replicas; the generations go to the directory of `stage_name` (the calling stage)."""
    return in_step(ctx, evaluate_greedily, replicas(ctx), model_dir=model_dir, name=name, stage_name=stage_name)


def evaluate_greedily(ctx: StageContext, model_dir: str, name: str, stage_name: str) -> dict | None:
    from stepwise.sampling import SamplingParams, read_shards

    config = ctx.config.eval
    test = problems(ctx, ctx.config.eval.split)[: config.n_problems]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=config.max_tokens, seed=0)
    out = ctx.dir(stage_name) / f"{name}.generations"
    sample_shards(ctx, model_dir, test, "problem", params, out, ctx.config.sampling.shard_size, config.batch_size,
                  f"eval {name}")
    ctx.barrier()
    if ctx.rank != 0:
        return None
    graded = grade_records(ctx.config.task.name, read_shards(out))
    write_jsonl(ctx.dir(stage_name) / f"{name}.graded.jsonl", graded)
    correct = sum(r["correct"] for r in graded)
    return {"problems": len(graded), "correct": correct, "accuracy": correct / max(1, len(graded)),
            "split": ctx.config.eval.split}


@stage("eval", depends=("export", "init", "data"), config_keys=("eval",))
def evaluate(ctx: StageContext) -> dict:
    return {"base": greedy_accuracy(ctx, base_policy(ctx)[1], "base")}
