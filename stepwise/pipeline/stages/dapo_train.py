"""Skywork DAPO model stages: `critic` (BCE on MC values, held-out report), `advantage` (critic
advantages of unique next steps, gap filter, reference log-probs), `policy` (the skywork_dapo loss
from pi_ref), and `dapo_eval` (export + greedy accuracy of the new policy)."""
from __future__ import annotations

import hashlib
import itertools
import math
import shutil
from operator import itemgetter

from stepwise.data.jsonl import iter_jsonl, jsonl_output, read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.model import base_policy, export_checkpoint, last_metrics, reference_policy, train_section
from stepwise.pipeline.stages.sampling import greedy_accuracy
from stepwise.pipeline.stages.scoring import score_files, scores_dir, scores_of
from stepwise.pipeline.step import in_step

CALIBRATION_BINS = 5


def held_out(problem_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(problem_id.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _critic_records(ctx: StageContext) -> dict[str, list[dict]]:
    """The critic's `values` records of the segmented solutions, by split ("train", "held_out"): one read
    of the files and one critic-tokenizer setup for both."""
    mc = {row["state_id"]: row["mc"] for row in read_jsonl(ctx.path("complete") / "mc.jsonl")}
    fraction, in_critic_tokens = ctx.config.skywork_dapo.critic_holdout, critic_tokens(ctx)
    splits: dict[str, list[dict]] = {"train": [], "held_out": []}
    for s in iter_jsonl(ctx.path("segment") / "solutions.jsonl"):
        if s["state_ids"]:
            record = value_record(s["prompt_ids"], s["response_ids"], s["step_ends"], [mc[i] for i in s["state_ids"]])
            splits["held_out" if held_out(s["id"], fraction) else "train"].append(in_critic_tokens(record))
    return splits


def critic_tokens(ctx: StageContext):
    """record -> record: a `values` record of policy ids as the critic reads it. The identity when the
    critic shares the policy's tokenizer; else (skywork_dapo.critic_init of another family) its pieces
    between state ends re-encoded in the critic's tokens (`tasks.steps.retokenize_pieces`). A next state is
    one piece: its tokens match the piecewise ones of the critic's training states where the critic's
    pre-tokenizer splits at newline runs, as Llama-3's and Qwen2.5's do (steps end after a "\n" run)."""
    from stepwise.pipeline.stages.data import tokenizer_dir
    from stepwise.pipeline.stages.model import section_tokenizer
    from stepwise.tasks.steps import decode_ids, encode_text, retokenize_pieces
    from stepwise.tasks.tokenizer import load_tokenizer

    if section_tokenizer(ctx, "critic") == tokenizer_dir(ctx):
        return lambda record: record
    policy, critic = load_tokenizer(tokenizer_dir(ctx)), load_tokenizer(section_tokenizer(ctx, "critic"))
    if policy.get_vocab() == critic.get_vocab():
        return lambda record: record

    def convert(record: dict) -> dict:
        ids, ends = retokenize_pieces(record["ids"], record["ends"], lambda piece: decode_ids(policy, piece),
                                      lambda text: encode_text(critic, text))
        return {**record, "ids": ids, "ends": ends}
    return convert


def value_record(prompt_ids: list[int], response_ids: list[int], step_ends: list[int], mc: list[float]) -> dict:
    """A `values` record of a solution: its ids and the end of each state (the prompt, then the prompt and
    each step but the last) with the state's MC value; the critic reads state t at token ends[t] - 1."""
    ends = [len(prompt_ids) + end for end in [0] + step_ends[:-1]]
    return {"ids": prompt_ids + response_ids, "ends": ends[: len(mc)], "mc": mc}


def critic_report(predicted: list[float], targets: list[float]) -> dict:
    """Correlation with MC, BCE against the constant predictor, calibration per bin of prediction."""
    n = len(targets)
    if n == 0:
        return {"states": 0}
    mean_t, mean_p = sum(targets) / n, sum(predicted) / n
    cov = sum((p - mean_p) * (t - mean_t) for p, t in zip(predicted, targets))
    spread = math.sqrt(sum((p - mean_p) ** 2 for p in predicted) * sum((t - mean_t) ** 2 for t in targets))

    def bce(ps):
        return -sum(t * math.log(min(max(p, 1e-6), 1 - 1e-6)) + (1 - t) * math.log(min(max(1 - p, 1e-6), 1 - 1e-6))
                    for p, t in zip(ps, targets)) / n

    bins = []
    for b in range(CALIBRATION_BINS):
        members = [(p, t) for p, t in zip(predicted, targets) if b / CALIBRATION_BINS <= p < (b + 1) / CALIBRATION_BINS or (b == CALIBRATION_BINS - 1 and p == 1.0)]
        if members:
            bins.append({"bin": f"{b / CALIBRATION_BINS:.1f}-{(b + 1) / CALIBRATION_BINS:.1f}", "states": len(members),
                         "mean_v": sum(p for p, _ in members) / len(members), "mean_mc": sum(t for _, t in members) / len(members)})
    return {"states": n, "corr": cov / spread if spread > 0 else 0.0, "bce": bce(predicted),
            "bce_constant": bce([mean_t] * n), "calibration": bins}


@stage("critic", depends=("complete", "sft", "init"), config_keys=("critic", "model", "parallel", "skywork_dapo.critic_holdout"),
       iterative=True)
def critic(ctx: StageContext) -> dict:
    splits = [split for split, count in in_step(ctx, write_critic_splits).items() if count]
    init = ctx.summary("init").get("critic") or base_policy(ctx)[0]  # skywork_dapo.critic_init, else pi0's trunk
    checkpoints = train_section(ctx, "critic", ctx.path("critic") / "train.jsonl", init)
    score_files(ctx, checkpoints, "critic", [ctx.path("critic") / f"{split}.jsonl" for split in splits])
    reports = in_step(ctx, report_critic_splits, splits=splits)
    return {"checkpoints": str(checkpoints), "final": last_metrics(checkpoints), **reports}


def write_critic_splits(ctx: StageContext) -> dict:
    """(In a step.) critic/train.jsonl (the critic's training states) and critic/held_out.jsonl; their sizes."""
    counts = {}
    for split, records in _critic_records(ctx).items():
        write_jsonl(ctx.dir("critic") / f"{split}.jsonl", records)
        counts[split] = len(records)
    return counts


def report_critic_splits(ctx: StageContext, splits: list[str]) -> dict:
    """(In a step.) `critic_report` of the trained critic's values on each scored split."""
    reports = {}
    for split in splits:
        data = ctx.path("critic") / f"{split}.jsonl"
        predicted = [v for row in scores_of(data) for v in row["values"]]
        reports[split] = critic_report(predicted, [v for r in read_jsonl(data) for v in r["mc"]])
    return reports


def _actions_per_state(ctx: StageContext, too_long: list[str]):
    """(state, its sampled first steps) per state, streamed from the graded completions (a state's
    completions are contiguous: they share a shard). An action is the first step's slice of the
    completion's token ids; a one-step completion ends the solution and keeps its eos. Actions whose next
    state exceeds model.max_seq_len are left out (their state ids appended to `too_long`)."""
    from stepwise.pipeline.stages.data import tokenizer_dir
    from stepwise.tasks.steps import decode_ids, step_ends, text_ids
    from stepwise.tasks.tokenizer import load_tokenizer

    tokenizer, separator = load_tokenizer(tokenizer_dir(ctx)), ctx.config.skywork_dapo.separator
    completions = iter_jsonl(ctx.path("complete") / "completions.jsonl")
    for sid, group in itertools.groupby(completions, key=itemgetter("state_id")):
        actions, state = [], None
        for record in group:
            state, response_ids = record, text_ids(record)
            ends = step_ends(response_ids, tokenizer, separator)
            if not ends:
                continue
            last = len(ends) == 1
            action_ids = record["token_ids"] if last else record["token_ids"][:ends[0]]
            if len(record["prompt_ids"]) + len(action_ids) > ctx.config.model.max_seq_len:
                too_long.append(sid)  # neither the critic nor the policy could read this next state
                continue
            actions.append({"step": decode_ids(tokenizer, response_ids[:ends[0]]), "ends": last,
                            "action_ids": action_ids, "correct": record["correct"]})
        if actions:
            yield {"state_id": sid, "prompt": state["prompt"], "prompt_ids": state["prompt_ids"]}, actions


def assign_values(actions: list[dict], critic_values, reward) -> None:
    """V of each next state: the graded reward when the action ends the solution, else the next
    critic value (in order)."""
    for action in actions:
        action["value"] = reward(action) if action["ends"] else next(critic_values)


def state_advantages(actions: list[dict], min_gap: float) -> tuple[list[dict], float]:
    """Paper eq. 3.7 on one state: A(s, a_i) = V(f(s, a_i)) - mean_j V(f(s, a_j)) over all M sampled
    actions (the baseline estimates V(s) under pi_ref); returns the unique actions (first occurrence)
    with their advantage, or none when the state's gap max A - min A is below `min_gap`; and the gap."""
    baseline = sum(a["value"] for a in actions) / len(actions)
    unique = list({tuple(a["action_ids"]): a for a in reversed(actions)}.values())[::-1]
    gap = max(a["value"] for a in unique) - min(a["value"] for a in unique)
    if gap < min_gap:
        return [], gap
    return [{**a, "advantage": a["value"] - baseline} for a in unique], gap


@stage("advantage", depends=("critic", "complete", "sft", "init"), config_keys=("skywork_dapo", "task.name", "model.max_seq_len"),
       iterative=True)
def advantage(ctx: StageContext) -> dict:
    return advantage_data(ctx, "advantage", ctx.config.skywork_dapo.advantage_source)


def advantage_data(ctx: StageContext, stage_name: str, source: str) -> dict:
    """Next-state values (by the critic, or `mc`: the completions' own outcomes), advantages and the gap
    filter, then pi_ref's log-probs of the kept actions, in `stage_name`'s directory: scoring launches
    between three steps that shape the data."""
    written = in_step(ctx, write_next_states, stage_name=stage_name)
    if source == "critic" and written["next_states"]:
        score_files(ctx, ctx.summary("critic")["checkpoints"], "critic", [ctx.path(stage_name) / "next.jsonl"])
    chosen = in_step(ctx, choose_actions, stage_name=stage_name, source=source)
    if chosen["actions"]:
        score_files(ctx, reference_policy(ctx)[0], "policy", [ctx.path(stage_name) / "kept.jsonl"])
    return {**chosen, "value_source": source, "actions_too_long": written["actions_too_long"],
            **in_step(ctx, write_actions, stage_name=stage_name)}


def write_next_states(ctx: StageContext, stage_name: str) -> dict:
    """(In a step, streamed.) STAGE/per_state.jsonl (each state's sampled first steps) and STAGE/next.jsonl
    (the next states the critic values: those of actions that do not end the solution), one branched
    `values` record per state (`value_data.branched_record`: their shared prefix is read once) with
    `critic.pack_prefixes`, else one record per next state."""
    from stepwise.train.value_data import branched_record, state_record

    out, count, too_long, in_critic_tokens = ctx.dir(stage_name), 0, [], critic_tokens(ctx)
    branched = ctx.config.critic.pack_prefixes
    for stale in ("next.jsonl", "kept.jsonl"):  # scores of an earlier attempt's files
        shutil.rmtree(scores_dir(out / stale), ignore_errors=True)
    with jsonl_output(out / "per_state.jsonl") as write_state, jsonl_output(out / "next.jsonl") as write_next:
        for state, actions in _actions_per_state(ctx, too_long):
            write_state({**state, "actions": actions})
            next_states = []
            for action in actions:
                if not action["ends"]:
                    next_ids = state["prompt_ids"] + action["action_ids"]
                    next_states.append(in_critic_tokens(state_record(next_ids))["ids"])
            if branched and next_states:
                write_next(branched_record(next_states))
            elif not branched:
                for ids in next_states:
                    write_next(state_record(ids))
            count += len(next_states)
    return {"next_states": count, "actions_too_long": len(too_long)}


def mc_values(actions: list[dict]) -> None:
    """The Monte-Carlo value of each action's next state, with no critic: the mean outcome of the state's
    completions whose first step is that action (the estimate the completions already hold)."""
    outcomes: dict[tuple, list[bool]] = {}
    for action in actions:
        outcomes.setdefault(tuple(action["action_ids"]), []).append(action["correct"])
    for action in actions:
        same = outcomes[tuple(action["action_ids"])]
        action["value"] = sum(same) / len(same)


def choose_actions(ctx: StageContext, stage_name: str, source: str) -> dict:
    """(In a step, streamed.) Values of next states (critic, or the graded reward of a final step; or the
    completions' MC estimates), advantages, the gap filter; the kept actions go to STAGE/kept.jsonl."""
    out = ctx.path(stage_name)
    values = (value for row in scores_of(out / "next.jsonl") for value in row["values"])  # in action order
    states, kept, gap_sum = 0, 0, 0.0
    with jsonl_output(out / "kept.jsonl") as write_kept:
        for row in iter_jsonl(out / "per_state.jsonl"):
            sid, actions = row["state_id"], row["actions"]
            if source == "mc":
                mc_values(actions)
            else:
                assign_values(actions, values, lambda a: float(a["correct"]))  # a final step: its graded solution
            chosen, gap = state_advantages(actions, ctx.config.skywork_dapo.advantage_gap)
            for action in chosen:
                write_kept({"state_id": sid, "prompt": row["prompt"], "prompt_ids": row["prompt_ids"], **action,
                            "ref_logp": 0.0})
            states, kept, gap_sum = states + 1, kept + len(chosen), gap_sum + gap
    return {"states": states, "actions": kept, "mean_gap": gap_sum / max(1, states)}


def write_actions(ctx: StageContext, stage_name: str) -> dict:
    """(In a step, streamed.) STAGE/actions.jsonl: the kept actions with pi_ref's log-probs."""
    out = ctx.path(stage_name)
    kept = iter_jsonl(out / "kept.jsonl")
    reference = scores_of(out / "kept.jsonl")
    states, count, positive = set(), 0, 0
    with jsonl_output(out / "actions.jsonl") as write:
        for a, r in zip(kept, reference):
            write({"state_id": a["state_id"], "prompt": a["prompt"], "prompt_ids": a["prompt_ids"], "action": a["step"],
                   "action_ids": a["action_ids"], "ends": a["ends"], "advantage": a["advantage"], "ref_logp": r["logp"]})
            states.add(a["state_id"])
            count, positive = count + 1, positive + (a["advantage"] > 0)
    return {"states_kept": len(states), "actions": count, "positive_actions": positive}


@stage("policy", depends=("advantage", "sft", "init"), config_keys=("policy", "model", "parallel", "run.seed"),
       iterative=True)
def policy(ctx: StageContext) -> dict:
    """pi_theta starts from pi_ref (pi0, or the previous iteration's policy) and trains on its advantages."""
    checkpoints = train_section(ctx, "policy", ctx.path("advantage") / "actions.jsonl", reference_policy(ctx)[0])
    return {"checkpoints": str(checkpoints), "final": last_metrics(checkpoints)}


def export_and_evaluate(ctx: StageContext, stage_name: str, checkpoints: str, name: str) -> dict:
    out = ctx.dir(stage_name) / name
    export_checkpoint(ctx, checkpoints, out)
    return {"policy": str(out), name: greedy_accuracy(ctx, str(out), name, stage_name)}


@stage("dapo_eval", depends=("policy", "data"), config_keys=("eval",), iterative=True)
def dapo_eval(ctx: StageContext) -> dict:
    return export_and_evaluate(ctx, "dapo_eval", ctx.summary("policy")["checkpoints"], f"iteration_{ctx.iteration}")


@stage("rs", depends=("grade", "policy", "sft", "init"), config_keys=("rs", "eval", "model", "parallel"))
def rs_baseline(ctx: StageContext) -> dict:
    """Ablation: rejection sampling (SFT on pi0's correct samples) for as many steps as the policy."""
    correct = in_step(ctx, write_correct_samples)["samples"]
    steps = int(ctx.summary("policy")["final"]["step"])
    if correct < ctx.config.rs.global_batch_size:
        print(f"[stepwise] rs: {correct} correct samples, fewer than one global batch: ablation skipped", flush=True)
        return {"samples": correct, "steps": 0, "skipped": "fewer correct samples than one global batch"}
    checkpoints = train_section(ctx, "rs", ctx.path("rs") / "correct.jsonl", base_policy(ctx)[0],
                                max_steps=steps)
    return {"samples": correct, "steps": steps, "final": last_metrics(checkpoints),
            **export_and_evaluate(ctx, "rs", str(checkpoints), "rs_same_steps")}


def write_correct_samples(ctx: StageContext) -> dict:
    """(In a step.) rs/correct.jsonl: pi0's correct samples as SFT records of their sampled ids, streamed."""
    from stepwise.pipeline.stages.data import tokenizer_dir
    from stepwise.pipeline.stages.sampling import correct_as_sft
    from stepwise.tasks.tokenizer import load_tokenizer

    eos_id, count = load_tokenizer(tokenizer_dir(ctx)).eos_token_id, 0
    with jsonl_output(ctx.dir("rs") / "correct.jsonl") as write:
        for record in correct_as_sft(iter_jsonl(ctx.path("grade") / "graded.jsonl"), eos_id):
            write(record)
            count += 1
    return {"samples": count}
