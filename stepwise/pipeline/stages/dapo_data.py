"""Skywork DAPO data stages (paper §4.1): `select` balanced solutions, `segment` them into states,
`complete` every unique state with m rollouts of the completer to get its MC value."""
from __future__ import annotations

import hashlib
import random
from dataclasses import replace

from stepwise.data.jsonl import atomic_concat, iter_jsonl, read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.model import acting_policy
from stepwise.pipeline.stages.sampling import grade_shard, grading_pool, sample_shards
from stepwise.pipeline.step import in_step, replicas


def state_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def balanced_pick(correct: list, wrong: list, k: int, rng: random.Random) -> list:
    """k items, half correct and half wrong where the pool allows, the rest from the other side."""
    correct, wrong = rng.sample(correct, len(correct)), rng.sample(wrong, len(wrong))
    take_correct = min(len(correct), max(k // 2, k - len(wrong)))
    take_wrong = min(len(wrong), k - take_correct)
    return correct[:take_correct] + wrong[:take_wrong]


@stage("select", depends=("grade",), config_keys=("skywork_dapo.select_k", "run.seed"), iterative=True)
def select(ctx: StageContext) -> dict:
    return in_step(ctx, select_balanced)


def select_balanced(ctx: StageContext) -> dict:
    by_problem: dict[str, list[dict]] = {}
    for record in read_jsonl(ctx.path("grade") / "graded.jsonl"):
        by_problem.setdefault(record["id"], []).append(record)
    chosen = []
    for problem_id, records in sorted(by_problem.items()):
        rng = random.Random(f"select-{ctx.config.run.seed}-{problem_id}")
        correct = [r for r in records if r["correct"]]
        wrong = [r for r in records if not r["correct"]]
        chosen += balanced_pick(correct, wrong, ctx.config.skywork_dapo.select_k, rng)
    write_jsonl(ctx.dir("select") / "selected.jsonl", chosen)
    return {"problems": len(by_problem), "selected": len(chosen), "correct": sum(r["correct"] for r in chosen)}


def split_steps(response: str, separator: str) -> list[str]:
    return [step for step in response.split(separator) if step.strip()]


@stage("segment", depends=("select",), config_keys=("skywork_dapo.separator",), iterative=True)
def segment(ctx: StageContext) -> dict:
    return in_step(ctx, segment_solutions)


def segment_solutions(ctx: StageContext) -> dict:
    separator = ctx.config.skywork_dapo.separator
    states: dict[str, dict] = {}
    solutions = []
    for record in read_jsonl(ctx.path("select") / "selected.jsonl"):
        steps = split_steps(record["response"], separator)
        ids = []
        for t in range(len(steps)):
            text = record["problem"] + "".join(step + separator for step in steps[:t])
            ids.append(state_id(text))
            states.setdefault(ids[-1], {"state_id": ids[-1], "prompt": text, "id": record["id"],
                                        "answer": record["answer"], "t": t})
        solutions.append({"id": record["id"], "prompt": record["problem"], "answer": record["answer"],
                          "steps": steps, "state_ids": ids, "correct": record["correct"]})
    write_jsonl(ctx.dir("segment") / "states.jsonl", list(states.values()))
    write_jsonl(ctx.dir("segment") / "solutions.jsonl", solutions)
    return {"solutions": len(solutions), "unique_states": len(states),
            "states": sum(len(s["state_ids"]) for s in solutions)}


@stage("complete", depends=("segment", "export", "init"),
       config_keys=("skywork_dapo.completions", "skywork_dapo.completion_temperature", "skywork_dapo.completer",
                    "sampling", "task.name"), iterative=True)
def complete(ctx: StageContext) -> dict:
    return in_step(ctx, complete_states, replicas(ctx))


def complete_states(ctx: StageContext) -> dict | None:
    """(In a launched step.) Every replica rolls out its share of the states' shards; rank 0 grades."""
    config, dapo = ctx.config, ctx.config.skywork_dapo
    states = read_jsonl(ctx.path("segment") / "states.jsonl")
    params = replace(config.sampling.params, n=dapo.completions, temperature=dapo.completion_temperature)
    mine = sample_shards(ctx, acting_policy(ctx, "completer")[1], states, "prompt", params,
                         ctx.dir("complete") / "shards", config.sampling.shard_size, config.sampling.batch_size,
                         "complete")
    graded_dir = ctx.dir("complete") / "graded"
    with grading_pool(ctx) as pool:
        for shard in mine:
            if not (graded_dir / shard.name).exists():
                grade_shard(config.task.name, shard, graded_dir / shard.name, pool)
    ctx.barrier()
    if ctx.rank != 0:
        return None
    shards = sorted(graded_dir.glob("shard_*.jsonl"))
    atomic_concat(shards, ctx.path("complete") / "completions.jsonl")
    outcomes: dict[str, list[bool]] = {}
    for record in iter_jsonl(ctx.path("complete") / "completions.jsonl"):
        outcomes.setdefault(record["state_id"], []).append(record["correct"])
    values = [{"state_id": k, "mc": sum(v) / len(v), "n": len(v)} for k, v in outcomes.items()]
    write_jsonl(ctx.dir("complete") / "mc.jsonl", values)
    return {"states": len(values), "completions": sum(len(v) for v in outcomes.values()),
            "mean_mc": sum(v["mc"] for v in values) / max(1, len(values))}
