"""DQO data stages (DQO paper §4.1, appendix A): `dqo_sample` draws `dqo_data.params.n` responses per
training problem from pi0 and grades them; `dqo_datasets` scores every response's tokens under
pi_ref = pi0 with the scoring workers and writes each method's training set:

    trajectories.jsonl  dqo, dro   every graded response: reward 1 (correct) / 0, per-token log-probs,
                                   process rewards per token when `dqo_data.process_scores` (dqo_process.py)
    labelled.jsonl      kto        every graded response, desirable = correct, sequence ref log-prob
    pairs.jsonl         dpo        (correct, wrong) responses of one prompt; all such pairs are pooled and
                                   ~ dpo_pair_ratio x len(trajectories) drawn at random (appendix A: half)
    rs.jsonl            rs_baseline  the correct responses (SFT records; rejection sampling)
    gold.jsonl          sft_baseline the dataset's solution of each sampled problem (arith: the correct chain)

Every method sees the same token sequences: the prompt's ids + the response's exact sampled ids ending
in eos (`tasks.steps.target_ids`: every record carries them, `response_ids` / `chosen_ids` /
`rejected_ids`), so one scoring pass serves all: a trajectory's `ref_logp` is the per-token list, a
pair's or labelled record's the list's sum.

Behaviour log-probs (mu in DQO's importance weight, eq. 16): we store pi0's log-probs at temperature
1, the same numbers as `ref_logp`, so w(tau) = exp(min(1, sum log pi_theta/pi0)) starts at 1. The true
sampling distribution differs when `dqo_data.params` truncates (top_k 16, top_p 0.9) or changes the
temperature: mu(a) = pi0(a)/Z on the kept tokens (Z <= 1 the kept mass), so log pi0/mu = log Z <= 0 per
token and the exact weight of a long response would be vanishingly small; using pi0 treats the data as
on-policy for pi0, which is what a forward pass of the sampling model gives (the sampler's own
`token_logprobs`, the truncated mu, stay in `dqo_sample/shards` for anyone who wants them).
Responses that do not fit `model.max_seq_len` with their prompt are dropped (counted in the summary).
"""
from __future__ import annotations

import bisect
import random

from stepwise.data.jsonl import DataError, read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.data import tokenizer_dir
from stepwise.pipeline.stages.dqo_process import sample_key, segment_token_rewards
from stepwise.pipeline.stages.model import base_policy
from stepwise.pipeline.stages.sampling import correct_as_sft, grade_records, sample_shards
from stepwise.pipeline.step import in_step, replicas
from stepwise.tasks.steps import target_ids

SHARD_ONLY = ("token_logprobs", "solution")
DATASETS = {"dqo": "trajectories.jsonl", "dro": "trajectories.jsonl", "kto": "labelled.jsonl",
            "dpo": "pairs.jsonl", "rs_baseline": "rs.jsonl", "sft_baseline": "gold.jsonl"}


@stage("dqo_sample", depends=("export", "init", "data"),
       config_keys=("dqo_data.n_problems", "dqo_data.params", "sampling.backend", "sampling.batch_size",
                    "sampling.shard_size", "task.name"))
def dqo_sample(ctx: StageContext) -> dict:
    return in_step(ctx, sample_and_grade, replicas(ctx))


def sample_and_grade(ctx: StageContext) -> dict | None:
    """(In a launched step.) The replicas sample their shares of the shards; rank 0 grades them all."""
    from stepwise.sampling.shards import shard_path

    config, data = ctx.config, ctx.config.dqo_data
    chosen = read_jsonl(ctx.path("data") / "train.jsonl")[: data.n_problems or None]
    out = ctx.dir("dqo_sample") / "shards"
    sample_shards(ctx, base_policy(ctx)[1], chosen, "problem", data.params, out, config.sampling.shard_size,
                  config.sampling.batch_size, "dqo_sample")
    ctx.barrier()
    if ctx.rank != 0:
        return None
    shards = [shard_path(out, index) for index in range(-(-len(chosen) // config.sampling.shard_size))]
    graded = []  # without the sampler's log-probs (they stay in the shards) or the gold solution
    for shard in shards:
        rows = [{k: v for k, v in r.items() if k not in SHARD_ONLY} for r in read_jsonl(shard)]
        graded += grade_records(config.task.name, rows)
    write_jsonl(ctx.dir("dqo_sample") / "graded.jsonl", graded)
    outcomes: dict[str, list[bool]] = {}
    for record in graded:
        outcomes.setdefault(record["id"], []).append(record["correct"])
    positives = sum(r["correct"] for r in graded)
    return {"problems": len(chosen), "samples": len(graded), "positives": positives,
            "negatives": len(graded) - positives, "sample_accuracy": positives / max(1, len(graded)),
            "pass_at_n": sum(any(v) for v in outcomes.values()) / max(1, len(outcomes)),
            "all_wrong_problems": sum(not any(v) for v in outcomes.values()),
            "all_right_problems": sum(all(v) for v in outcomes.values())}


def gold_records(train: list[dict], ids: set[str], source: str) -> list[dict]:
    """SFT on the dataset's solutions of the problems `ids` (records of the data stage's train split)."""
    out = []
    for index, problem in enumerate(train, start=1):
        if problem["id"] not in ids:
            continue
        if not isinstance(problem.get("solution"), str) or not problem["solution"].strip():
            raise DataError(f"{source}:{index}: problem {problem['id']!r} has no 'solution' for the SFT baseline "
                            f"(re-run the data stage: `stepwise stage data RECIPE`)")
        out.append({"prompt": problem["problem"], "response": problem["solution"]})
    return out


def pair_indices(groups: list[tuple[list[int], list[int]]], count: int, rng: random.Random) -> list[tuple[int, int]]:
    """`count` distinct (positive, negative) pairs drawn uniformly from the pool of every pairing of a
    group's positives with its negatives (all of the pool when it is smaller), in pool order."""
    sizes = [len(pos) * len(neg) for pos, neg in groups]
    ends = [sum(sizes[: g + 1]) for g in range(len(sizes))]
    total = ends[-1] if ends else 0
    chosen = sorted(rng.sample(range(total), min(count, total)))
    pairs = []
    for number in chosen:
        g = bisect.bisect_right(ends, number)
        offset = number - (ends[g] - sizes[g])
        pos, neg = groups[g]
        pairs.append((pos[offset // len(neg)], neg[offset % len(neg)]))
    return pairs


def dpo_pairs(graded: list[dict], count: int, seed: int) -> list[tuple[dict, dict]]:
    """(chosen, rejected) responses to one problem, `count` of them (see `pair_indices`)."""
    by_problem: dict[str, tuple[list[int], list[int]]] = {}
    for index, record in enumerate(graded):
        by_problem.setdefault(record["id"], ([], []))[0 if record["correct"] else 1].append(index)
    groups = [by_problem[key] for key in sorted(by_problem)]
    return [(graded[p], graded[n]) for p, n in pair_indices(groups, count, random.Random(f"dpo-pairs-{seed}"))]


def fitting(tokenizer, records: list[dict], max_seq_len: int) -> list[dict]:
    """The records whose prompt + sampled response + eos fit max_seq_len + 1 tokens (what the builders accept)."""
    if not records:
        return []
    prompts = tokenizer([r["problem"] for r in records], add_special_tokens=False)["input_ids"]
    return [r for r, p in zip(records, prompts)
            if len(p) + len(target_ids(r, tokenizer.eos_token_id)) <= max_seq_len + 1]


def _process_rows(ctx: StageContext) -> dict[str, dict]:
    """`dqo_process` rows by sample key ({} when process scores are off)."""
    if not ctx.config.dqo_data.process_scores:
        return {}
    return {row["key"]: row for row in read_jsonl(ctx.path("dqo_process") / "process.jsonl")}


@stage("dqo_datasets", depends=("dqo_sample", "dqo_process", "data", "tokenizer", "sft", "init"),
       config_keys=("dqo_data.process_scores", "dqo_data.dpo_pair_ratio", "model.max_seq_len", "parallel",
                    "run.seed"))
def dqo_datasets(ctx: StageContext) -> dict:
    """pi0's per-token log-probs of every unique response (one scoring launch between two steps), then
    every method's data set."""
    from stepwise.pipeline.stages.scoring import score_files

    if in_step(ctx, write_unique_responses)["unique_responses"]:
        score_files(ctx, base_policy(ctx)[0], "tokens", [ctx.path("dqo_datasets") / "reference.jsonl"])
    return in_step(ctx, write_datasets)


def _fitting_samples(ctx: StageContext):
    """(tokenizer, every graded sample, those that fit model.max_seq_len, their sample keys)."""
    from stepwise.tasks.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(ctx))
    all_graded = read_jsonl(ctx.path("dqo_sample") / "graded.jsonl")
    graded = fitting(tokenizer, all_graded, ctx.config.model.max_seq_len)
    return tokenizer, all_graded, graded, [sample_key(r["problem"], r["token_ids"]) for r in graded]


def write_unique_responses(ctx: StageContext) -> dict:
    """(In a step.) dqo_datasets/reference.jsonl: each unique (prompt, response) that fits, to be scored."""
    tokenizer, _, graded, keys = _fitting_samples(ctx)
    unique = {k: {"prompt": r["problem"], "response": r["response"],
                  "response_ids": target_ids(r, tokenizer.eos_token_id)} for k, r in zip(keys, graded)}
    write_jsonl(ctx.dir("dqo_datasets") / "reference.jsonl", list(unique.values()))
    return {"unique_responses": len(unique)}


def write_datasets(ctx: StageContext) -> dict:
    """(In a step.) The trajectories, labelled samples, pairs, RS and gold sets with pi0's log-probs."""
    from stepwise.pipeline.stages.scoring import scores_of

    tokenizer, all_graded, graded, keys = _fitting_samples(ctx)
    out = ctx.dir("dqo_datasets")
    unique = dict.fromkeys(keys)
    scores = scores_of(out / "reference.jsonl") if unique else []
    logp = {k: row["logprobs"] for k, row in zip(unique, scores)}
    process = _process_rows(ctx)
    eos = tokenizer.eos_token_id
    response_ids = {key: target_ids(r, eos) for key, r in zip(keys, graded)}
    trajectories = []
    for key, r in zip(keys, graded):
        record = {"id": r["id"], "prompt": r["problem"], "response": r["response"], "response_ids": response_ids[key],
                  "reward": 1.0 if r["correct"] else 0.0, "ref_logp": logp[key], "behaviour_logp": logp[key]}
        if process:
            row = process[key]
            record["process_rewards"] = (segment_token_rewards(len(logp[key]), row["ends"], row["step_rewards"])
                                         if row["ends"] else [0.0] * len(logp[key]))
        trajectories.append(record)
    labelled = [{"prompt": r["problem"], "response": r["response"], "response_ids": response_ids[k],
                 "desirable": bool(r["correct"]), "ref_logp": sum(logp[k])} for k, r in zip(keys, graded)]
    count = round(ctx.config.dqo_data.dpo_pair_ratio * len(trajectories))
    pairs = []
    for chosen, rejected in dpo_pairs(graded, count, ctx.config.run.seed):
        c, w = sample_key(chosen["problem"], chosen["token_ids"]), sample_key(rejected["problem"], rejected["token_ids"])
        pairs.append({"prompt": chosen["problem"], "chosen": chosen["response"], "rejected": rejected["response"],
                      "chosen_ids": response_ids[c], "rejected_ids": response_ids[w],
                      "ref_chosen_logp": sum(logp[c]), "ref_rejected_logp": sum(logp[w])})
    ids = {r["id"] for r in all_graded}
    sets = {"trajectories.jsonl": trajectories, "labelled.jsonl": labelled, "pairs.jsonl": pairs,
            "rs.jsonl": list(correct_as_sft(graded, eos)),
            "gold.jsonl": gold_records(read_jsonl(ctx.path("data") / "train.jsonl"), ids, str(ctx.path("data") / "train.jsonl"))}
    for name, records in sets.items():
        write_jsonl(out / name, records)
    positives = sum(r["correct"] for r in graded)
    return {"sizes": {method: len(sets[name]) for method, name in DATASETS.items()},
            "trajectories": len(trajectories), "positives": positives, "negatives": len(graded) - positives,
            "dropped_too_long": len(all_graded) - len(graded), "unique_responses": len(unique),
            "process_rewards": bool(process),
            "mean_ref_logp": sum(sum(v) for v in logp.values()) / max(1, len(logp))}
