"""Skywork DAPO data stages (paper §4.1): `select` balanced solutions, `segment` them into states,
`complete` every unique state with m rollouts of the completer to get its MC value."""
from __future__ import annotations

import itertools
import random
from dataclasses import replace
from operator import itemgetter

from stepwise.data.jsonl import atomic_concat, iter_jsonl, jsonl_output, read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.model import acting_policy
from stepwise.pipeline.stages.sampling import grade_shard, grading_pool, sample_shards
from stepwise.pipeline.step import in_step, replicas


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
    """(In a step.) Streams the graded samples problem by problem (a problem's samples are contiguous: they
    share a shard) and keeps only the chosen ones, written in problem-id order."""
    chosen: list[dict] = []
    problems = 0
    for problem_id, group in itertools.groupby(iter_jsonl(ctx.path("grade") / "graded.jsonl"), key=itemgetter("id")):
        records = list(group)
        rng = random.Random(f"select-{ctx.config.run.seed}-{problem_id}")
        correct = [r for r in records if r["correct"]]
        wrong = [r for r in records if not r["correct"]]
        chosen += balanced_pick(correct, wrong, ctx.config.skywork_dapo.select_k, rng)
        problems += 1
    chosen.sort(key=itemgetter("id"))  # stable: each problem's picks keep their order
    write_jsonl(ctx.dir("select") / "selected.jsonl", chosen)
    return {"problems": problems, "selected": len(chosen), "correct": sum(r["correct"] for r in chosen)}


@stage("segment", depends=("select", "tokenizer"), config_keys=("skywork_dapo.separator",), iterative=True)
def segment(ctx: StageContext) -> dict:
    return in_step(ctx, segment_solutions)


def segment_solutions(ctx: StageContext) -> dict:
    """(In a step.) Streams the selected solutions problem by problem (states of different problems never
    coincide: a state starts with its problem) into states.jsonl and solutions.jsonl.

    Steps are slices of the sampled token ids (`tasks.steps.step_ends`): state t is the prompt's ids
    followed by the ids of the first t steps, exactly as the policy produced them; each state record
    carries them (`prompt_ids`) with their text (`prompt`) and the response text before the state
    (`prefix`: a completion is graded on prefix + completion, the whole solution); the completer
    continues from the ids."""
    from stepwise.pipeline.stages.data import tokenizer_dir
    from stepwise.tasks.steps import decode_ids, encode_text, ids_key, step_slices, text_ids
    from stepwise.tasks.tokenizer import load_tokenizer

    tokenizer, separator = load_tokenizer(tokenizer_dir(ctx)), ctx.config.skywork_dapo.separator
    counts = {"solutions": 0, "unique_states": 0, "states": 0}
    out = ctx.dir("segment")
    with jsonl_output(out / "states.jsonl") as write_state, jsonl_output(out / "solutions.jsonl") as write_solution:
        for _, group in itertools.groupby(iter_jsonl(ctx.path("select") / "selected.jsonl"), key=itemgetter("id")):
            states: dict[str, dict] = {}
            for record in group:
                prompt_ids, response_ids = encode_text(tokenizer, record["problem"]), text_ids(record)
                slices = step_slices(response_ids, tokenizer, separator)
                ids = []
                for t, (start, _) in enumerate(slices):
                    state, prefix = prompt_ids + response_ids[:start], decode_ids(tokenizer, response_ids[:start])
                    ids.append(ids_key(state))
                    states.setdefault(ids[-1], {"state_id": ids[-1], "id": record["id"], "answer": record["answer"],
                                                "t": t, "prompt": record["problem"] + prefix, "prefix": prefix,
                                                "prompt_ids": state})
                write_solution({"id": record["id"], "prompt": record["problem"], "answer": record["answer"],
                                "prompt_ids": prompt_ids, "response_ids": response_ids,
                                "step_ends": [end for _, end in slices], "state_ids": ids, "correct": record["correct"],
                                "steps": [decode_ids(tokenizer, response_ids[a:b]) for a, b in slices]})
                counts["solutions"] += 1
                counts["states"] += len(ids)
            for state in states.values():
                write_state(state)
            counts["unique_states"] += len(states)
    return counts


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
    mine = sample_shards(ctx, acting_policy(ctx, "completer")[1], states, "prompt_ids", params,
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
    tokens = 0
    for record in iter_jsonl(ctx.path("complete") / "completions.jsonl"):
        outcomes.setdefault(record["state_id"], []).append(record["correct"])
        tokens += record["num_tokens"]
    values = [{"state_id": k, "mc": sum(v) / len(v), "n": len(v)} for k, v in outcomes.items()]
    write_jsonl(ctx.dir("complete") / "mc.jsonl", values)
    return {"states": len(values), "completions": sum(len(v) for v in outcomes.values()),
            "mean_mc": sum(v["mc"] for v in values) / max(1, len(values)), "generated_tokens": tokens}
