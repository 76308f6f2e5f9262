"""DQO with process scores (DQO paper §4.4, Figure 1): stage `dqo_process` and its pure rules.

Each graded response y of `dqo_sample` is cut into n segments by `dqo_data.separator` (each
segment keeps its trailing separator, so the segments concatenate back to y; blank steps join the
segment before them; `dqo_data.max_segments` > 0 merges consecutive steps into at most that many
segments of near-equal step counts). y[0:i] is the concatenation of the first i segments.

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


def sample_key(prompt: str, response: str) -> str:
    """The id of a (prompt, response) pair across the DQO data files."""
    return hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:20]


def split_segments(response: str, separator: str, max_segments: int = 0) -> list[str]:
    """Segments of `response` (see the module docstring); [] when it has no non-blank step."""
    parts = response.split(separator)
    pieces = [part + separator for part in parts[:-1]] + [parts[-1]]
    segments: list[str] = []
    carry = ""
    for piece in pieces:
        if not piece.replace(separator, "").strip():
            if segments:
                segments[-1] += piece
            else:
                carry += piece
            continue
        segments.append(carry + piece)
        carry = ""
    if max_segments and len(segments) > max_segments:
        n = len(segments)
        bounds = [round(j * n / max_segments) for j in range(max_segments + 1)]
        segments = ["".join(segments[bounds[j]:bounds[j + 1]]) for j in range(max_segments)]
    return segments


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


def segment_token_rewards(tokenizer, response: str, segments: list[str], rewards: list[float]) -> list[float]:
    """Per response token as `trajectory_data` tokenizes it (the response's tokens, then eos): each
    segment's reward on the last token that starts inside the segment (a token spanning a boundary
    belongs to the segment it starts in)."""
    if "".join(segments) != response:
        raise ValueError("segments do not concatenate to the response")
    encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    out = [0.0] * (len(encoded["input_ids"]) + 1)
    end = 0
    for segment, reward in zip(segments, rewards):
        end += len(segment)
        inside = [k for k, start in enumerate(starts) if start < end]
        if not inside:
            raise ValueError(f"no token of the response starts before character {end}")
        out[inside[-1]] += reward
    return out


def _prefix_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _run_search(ctx: StageContext, failed: dict[str, dict]) -> tuple[dict[str, int], dict]:
    """i* of every failed response by rounds of prefix rollouts; returns (i* per key, counters). Each round's
    rollouts are sampled on the replicas (each its shards), then every rank reads them all and takes the
    same (deterministic) next step of the search."""
    from stepwise.pipeline.stages.sampling import make_replica
    from stepwise.sampling import read_shards, sample_to_shards
    from stepwise.tasks.grading import grade

    config, data = ctx.config, ctx.config.dqo_data
    params = replace(data.params, n=data.process_completions)
    search = PrefixSearch({key: len(r["segments"]) for key, r in failed.items()})
    counters = {"rounds": 0, "prefixes": 0, "completions": 0}
    sampler = None
    while search.pending():
        counters["rounds"] += 1
        pending = search.pending()
        prefix_of = {key: "".join(failed[key]["segments"][:i]) for key, i in pending.items()}
        records = {}
        for key, prefix in prefix_of.items():
            prompt = failed[key]["prompt"] + prefix
            records.setdefault(_prefix_id(prompt), {"prefix_id": _prefix_id(prompt), "prompt": prompt,
                                                    "prefix": prefix, "answer": failed[key]["answer"]})
        if sampler is None:
            sampler = make_replica(ctx, base_policy(ctx)[1], config.sampling.batch_size)
        out = ctx.dir("dqo_process") / f"round_{counters['rounds']:03d}"
        sample_to_shards(sampler, list(records.values()), "prompt", params, out, shard_size=config.sampling.shard_size,
                         desc=f"dqo_process round {counters['rounds']}", rank=ctx.rank, world_size=ctx.world_size)
        ctx.barrier()
        ok: dict[str, bool] = {}
        for sample in read_shards(out):
            ok[sample["prefix_id"]] = ok.get(sample["prefix_id"], False) or bool(
                grade(config.task.name, sample["prefix"] + sample["response"], sample["answer"]))
            counters["completions"] += 1
        counters["prefixes"] += len(records)
        search.update({key: ok[_prefix_id(failed[key]["prompt"] + prefix)] for key, prefix in prefix_of.items()})
    if sampler is not None:
        sampler.close()
    return search.result, counters


@stage("dqo_process", depends=("dqo_sample", "export", "init"),
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
    unique: dict[str, dict] = {}
    for r in read_jsonl(ctx.path("dqo_sample") / "graded.jsonl"):
        key = sample_key(r["problem"], r["response"])
        unique.setdefault(key, {"key": key, "prompt": r["problem"], "answer": r["answer"], "correct": r["correct"],
                                "segments": split_segments(r["response"], data.separator, data.max_segments)})
    failed = {key: r for key, r in unique.items() if not r["correct"] and r["segments"]}
    good, counters = _run_search(ctx, failed)
    rows = []
    for key, r in unique.items():
        n = len(r["segments"])
        rewards = step_rewards(n, r["correct"], good.get(key, 0)) if n else []
        rows.append({"key": key, "segments": r["segments"], "good_prefix": n if r["correct"] else good.get(key, 0),
                     "step_rewards": rewards})
    if ctx.rank == 0:
        write_jsonl(ctx.dir("dqo_process") / "process.jsonl", rows)
    fractions = [good[key] / len(r["segments"]) for key, r in failed.items()]
    return {"enabled": True, "responses": len(unique), "failed": len(failed), **counters,
            "failed_with_good_prefix": sum(good[key] > 0 for key in failed),
            "mean_good_fraction_failed": sum(fractions) / max(1, len(fractions))}
