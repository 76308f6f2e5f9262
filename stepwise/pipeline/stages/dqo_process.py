"""DQO with process scores (DQO paper §4.4, Figure 1): stage `dqo_process` and its pure rules.

Each graded response y of `dqo_sample` is cut into n segments at token positions of its sampled ids:
the steps of `tasks.steps.step_ends` with `dqo_data.separator` (a step ends after a run of separators,
so the segments concatenate back to y and a blank line is never a segment); `dqo_data.max_segments`
> 0 merges consecutive steps into at most that many segments of near-equal step counts. y[0:i] is the
first i segments' token ids: a rollout continues the prompt's ids and those, never re-tokenised text.

The rule, exactly as implemented (`step_rewards`, `PrefixSearch`):
- a FAILED response: for i = n-1, n-2, ..., 1 in turn, sample m = `dqo_data.process_completions`
  completions of prompt + y[0:i] from pi0 (the `dqo_data.params` sampling parameters) and grade
  y[0:i] + completion; the first (longest) i with at least one correct completion is i*; i* = 0 when
  none is (and for n = 1, where no proper prefix exists). Segments 1..i* get process reward 1/n each,
  segments i*+1..n get 0.
- a CORRECT response: every segment gets 1/n (Figure 1: "for correct responses we assign all process
  reward to one", with the text's per-step value 1/n).
The process rewards are added to the outcome reward (1 correct, 0 failed; see `dqo_data`), so a
correct response's total is 2 and a failed one's i*/n. `dqo_datasets` puts each segment's reward on
the segment's last token (`segment_token_rewards`).

The search runs in rounds over all pending responses at once (round r tests prefix length n_y - r of
every response still pending); identical prefixes are sampled once; each round's samples are shards
under `dqo_process/round_XXX/`, so a killed stage resumes. Cost: up to (n - 1) x m completions per
failed response; cap n with `max_segments` on long solutions.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

from stepwise.data.jsonl import read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.model import base_policy
from stepwise.pipeline.step import in_step, replicas


def sample_key(prompt: str, token_ids: list[int]) -> str:
    """The id of a (prompt, sampled response ids) pair across the DQO data files."""
    return hashlib.sha1(f"{prompt}\x00{token_ids}".encode()).hexdigest()[:20]


def merge_steps(ends: list[int], max_segments: int = 0) -> list[int]:
    """The segment ends of steps ending at `ends`: every step, or (max_segments > 0) at most that many
    segments of consecutive steps with near-equal step counts."""
    if not max_segments or len(ends) <= max_segments:
        return list(ends)
    n = len(ends)
    return [ends[round(j * n / max_segments) - 1] for j in range(1, max_segments + 1)]


def step_rewards(n: int, correct: bool, good_prefix: int) -> list[float]:
    """Per-segment process rewards: 1/n on every segment of a correct response, on segments
    1..good_prefix (= i*) of a failed one, 0 elsewhere."""
    if not 0 <= good_prefix <= n:
        raise ValueError(f"good_prefix={good_prefix} is outside [0, {n}]")
    good = n if correct else good_prefix
    return [1.0 / n if j < good else 0.0 for j in range(n)]


class PrefixSearch:
    """The longest prefix y[0:i] (i from n-1 down to 1) with a correct completion, for many responses
    at once: `pending()` gives the prefix length each unresolved response tests next, `update(ok)` takes
    whether that prefix had a correct completion; `result[key]` is i* (0 when none)."""

    def __init__(self, segment_counts: dict[str, int]):
        self.result = {key: 0 for key in segment_counts}
        self._next = {key: n - 1 for key, n in segment_counts.items() if n >= 2}

    def pending(self) -> dict[str, int]:
        return dict(self._next)

    def update(self, ok: dict[str, bool]) -> None:
        for key, i in list(self._next.items()):
            if ok[key]:
                self.result[key] = i
                del self._next[key]
            elif i > 1:
                self._next[key] = i - 1
            else:
                del self._next[key]


def segment_token_rewards(num_tokens: int, ends: list[int], rewards: list[float]) -> list[float]:
    """Per response token (the sampled ids ending in eos, `num_tokens` of them): each segment's reward on
    its last token."""
    if len(ends) != len(rewards) or any(not 0 < end <= num_tokens for end in ends):
        raise ValueError(f"segment ends {ends} do not fit {num_tokens} tokens with {len(rewards)} rewards")
    out = [0.0] * num_tokens
    for end, reward in zip(ends, rewards):
        out[end - 1] += reward
    return out


def _run_search(ctx: StageContext, failed: dict[str, dict]) -> tuple[dict[str, int], dict]:
    """i* of every failed response by rounds of prefix rollouts; returns (i* per key, counters). Each round's
    rollouts are sampled on the replicas (each its shards), then every rank reads them all and takes the
    same (deterministic) next step of the search."""
    from stepwise.pipeline.stages.sampling import make_replica, solution_text
    from stepwise.sampling import read_shards, sample_to_shards
    from stepwise.tasks.grading import grade
    from stepwise.tasks.steps import ids_key

    config, data = ctx.config, ctx.config.dqo_data
    params = replace(data.params, n=data.process_completions)
    search = PrefixSearch({key: len(r["ends"]) for key, r in failed.items()})
    counters = {"rounds": 0, "prefixes": 0, "completions": 0}
    sampler = None
    while search.pending():
        counters["rounds"] += 1
        pending = search.pending()
        prompt_of = {key: failed[key]["prompt_ids"] + failed[key]["response_ids"][:failed[key]["ends"][i - 1]]
                     for key, i in pending.items()}
        records = {}
        for key, i in pending.items():
            r = failed[key]
            records.setdefault(ids_key(prompt_of[key]), {
                "prefix_id": ids_key(prompt_of[key]), "prompt_ids": prompt_of[key], "answer": r["answer"],
                "prefix": "".join(r["segments"][:i])})
        if sampler is None:
            sampler = make_replica(ctx, base_policy(ctx)[1], config.sampling.batch_size)
        out = ctx.dir("dqo_process") / f"round_{counters['rounds']:03d}"
        sample_to_shards(sampler, list(records.values()), "prompt_ids", params, out, shard_size=config.sampling.shard_size,
                         desc=f"dqo_process round {counters['rounds']}", rank=ctx.rank, world_size=ctx.world_size)
        ctx.barrier()
        ok: dict[str, bool] = {}
        for sample in read_shards(out):
            ok[sample["prefix_id"]] = ok.get(sample["prefix_id"], False) or bool(
                grade(config.task.name, solution_text(sample), sample["answer"]))
            counters["completions"] += 1
        counters["prefixes"] += len(records)
        search.update({key: ok[ids_key(prompt)] for key, prompt in prompt_of.items()})
    if sampler is not None:
        sampler.close()
    return search.result, counters


@stage("dqo_process", depends=("dqo_sample", "export", "init", "tokenizer"),
       config_keys=("dqo_data.process_scores", "dqo_data.process_completions", "dqo_data.separator",
                    "dqo_data.max_segments", "dqo_data.params", "sampling.backend", "sampling.batch_size",
                    "sampling.shard_size", "task.name"))
def dqo_process(ctx: StageContext) -> dict:
    """Per unique (prompt, response) of `dqo_sample`: its segments and their process rewards (off:
    nothing is written and `dqo_datasets` uses outcome rewards only)."""
    return in_step(ctx, score_processes, replicas(ctx))


def score_processes(ctx: StageContext) -> dict:
    """(In a launched step, on the sampling replicas.) The prefix search of `dqo_process`; rank 0 writes."""
    data = ctx.config.dqo_data
    if not data.process_scores:
        return {"enabled": False}
    from stepwise.pipeline.stages.data import tokenizer_dir
    from stepwise.tasks.steps import decode_ids, encode_text, step_ends, text_ids
    from stepwise.tasks.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(ctx))
    unique: dict[str, dict] = {}
    for r in read_jsonl(ctx.path("dqo_sample") / "graded.jsonl"):
        key = sample_key(r["problem"], r["token_ids"])
        if key in unique:
            continue
        response_ids = text_ids(r)
        ends = merge_steps(step_ends(response_ids, tokenizer, data.separator), data.max_segments)
        unique[key] = {"key": key, "prompt_ids": encode_text(tokenizer, r["problem"]), "response_ids": response_ids,
                       "answer": r["answer"], "correct": r["correct"], "ends": ends,
                       "segments": [decode_ids(tokenizer, response_ids[a:b]) for a, b in zip([0] + ends[:-1], ends)]}
    failed = {key: r for key, r in unique.items() if not r["correct"] and r["ends"]}
    good, counters = _run_search(ctx, failed)
    rows = []
    for key, r in unique.items():
        n = len(r["ends"])
        rewards = step_rewards(n, r["correct"], good.get(key, 0)) if n else []
        rows.append({"key": key, "ends": r["ends"], "segments": r["segments"],
                     "good_prefix": n if r["correct"] else good.get(key, 0), "step_rewards": rewards})
    if ctx.rank == 0:
        write_jsonl(ctx.dir("dqo_process") / "process.jsonl", rows)
    fractions = [good[key] / len(r["ends"]) for key, r in failed.items()]
    return {"enabled": True, "responses": len(unique), "failed": len(failed), **counters,
            "failed_with_good_prefix": sum(good[key] > 0 for key in failed),
            "mean_good_fraction_failed": sum(fractions) / max(1, len(fractions))}
