"""Skywork DAPO model stages: `critic` (BCE on MC values, held-out report), `advantage` (critic
advantages of unique next steps, gap filter, reference log-probs), `policy` (the skywork_dapo loss
from pi_ref), and `dapo_eval` (export + greedy accuracy of the new policy)."""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

from stepwise.data.jsonl import read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.launch import launch
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.dapo_data import split_steps
from stepwise.pipeline.stages.model import base_policy, export_checkpoint, last_metrics, reference_policy, section_tokenizer, train_section
from stepwise.pipeline.stages.sampling import greedy_accuracy

CALIBRATION_BINS = 5


def held_out(problem_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(problem_id.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def score(ctx: StageContext, checkpoint: str | Path, kind: str, records: list[dict], name: str) -> list[dict]:
    """Forward-only scores of `records` by the workers (see `stepwise.train.score`), at the layout, with
    the tokenizer and at the scoring micro-batch size of the model's train section (critic or policy)."""
    from stepwise.train.score import read_scores

    out = ctx.dir(name.split("/")[0]) / (name.split("/")[-1] + "_scores")
    shutil.rmtree(out, ignore_errors=True)
    data = out.with_suffix(".jsonl")
    write_jsonl(data, records)
    section = "critic" if kind == "critic" else "policy"
    train = getattr(ctx.config, section)
    launch(ctx.config.layout_for(section), "stepwise.train.score",
           ["--recipe", str(ctx.resolved_recipe), "--ckpt", str(checkpoint), "--kind", kind, "--data", str(data),
            "--tokenizer", section_tokenizer(ctx, section), "--out", str(out), "--section", section,
            "--micro-batch-size", str(train.score_micro_batch_size or train.micro_batch_size)], ctx.run_dir)
    return read_scores(out)


def _critic_records(ctx: StageContext, holdout: bool) -> list[dict]:
    mc = {row["state_id"]: row["mc"] for row in read_jsonl(ctx.path("complete") / "mc.jsonl")}
    fraction = ctx.config.skywork_dapo.critic_holdout
    return [{"prompt": s["prompt"], "steps": s["steps"], "mc": [mc[i] for i in s["state_ids"]]}
            for s in read_jsonl(ctx.path("segment") / "solutions.jsonl")
            if held_out(s["id"], fraction) == holdout and s["state_ids"]]


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
    train = _critic_records(ctx, holdout=False)
    write_jsonl(ctx.dir("critic") / "train.jsonl", train)
    init = ctx.summary("init").get("critic") or base_policy(ctx)[0]  # skywork_dapo.critic_init, else pi0's trunk
    checkpoints = train_section(ctx, "critic", ctx.path("critic") / "train.jsonl", init)
    summary = {"checkpoints": str(checkpoints), "final": last_metrics(checkpoints)}
    for split, records in (("train", train), ("held_out", _critic_records(ctx, holdout=True))):
        if records:
            scores = score(ctx, checkpoints, "critic", records, f"critic/{split}")
            predicted = [v for row in scores for v in row["values"]]
            summary[split] = critic_report(predicted, [v for r in records for v in r["mc"]])
    return summary


def _actions_per_state(ctx: StageContext) -> dict[str, list[dict]]:
    separator = ctx.config.skywork_dapo.separator
    actions: dict[str, list[dict]] = {}
    for record in read_jsonl(ctx.path("complete") / "completions.jsonl"):
        steps = split_steps(record["response"], separator)
        if not steps:
            continue
        ends = len(steps) == 1
        actions.setdefault(record["state_id"], []).append({
            "state_id": record["state_id"], "prompt": record["prompt"], "step": steps[0], "ends": ends,
            "action": steps[0] if ends else steps[0] + separator, "correct": record["correct"]})
    return actions


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
    unique = list({a["action"]: a for a in reversed(actions)}.values())[::-1]
    gap = max(a["value"] for a in unique) - min(a["value"] for a in unique)
    if gap < min_gap:
        return [], gap
    return [{**a, "advantage": a["value"] - baseline} for a in unique], gap


@stage("advantage", depends=("critic", "complete", "sft", "init"), config_keys=("skywork_dapo", "task.name"), iterative=True)
def advantage(ctx: StageContext) -> dict:
    from stepwise.tasks.grading import grade

    per_state = _actions_per_state(ctx)
    answers = {row["state_id"]: row["answer"] for row in read_jsonl(ctx.path("segment") / "states.jsonl")}
    to_value = [{"prompt": a["prompt"] + a["action"], "steps": [], "mc": [0.0]}
                for actions in per_state.values() for a in actions if not a["ends"]]
    values = iter(row["values"][0] for row in score(ctx, ctx.summary("critic")["checkpoints"], "critic", to_value, "advantage/next"))
    kept, gaps = [], []
    for sid, actions in per_state.items():
        assign_values(actions, values, lambda a: float(grade(ctx.config.task.name, a["step"], answers[sid])))
        chosen, gap = state_advantages(actions, ctx.config.skywork_dapo.advantage_gap)
        kept += chosen
        gaps.append(gap)
    reference = score(ctx, reference_policy(ctx)[0], "policy",
                      [{**a, "ref_logp": 0.0} for a in kept], "advantage/reference") if kept else []
    rows = [{"state_id": a["state_id"], "prompt": a["prompt"], "action": a["action"], "ends": a["ends"],
             "advantage": a["advantage"], "ref_logp": r["logp"]} for a, r in zip(kept, reference)]
    write_jsonl(ctx.dir("advantage") / "actions.jsonl", rows)
    return {"states": len(per_state), "states_kept": len({r["state_id"] for r in rows}), "actions": len(rows),
            "mean_gap": sum(gaps) / max(1, len(gaps)),
            "positive_actions": sum(r["advantage"] > 0 for r in rows)}


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
    correct = [{"prompt": r["problem"], "response": r["response"]}
               for r in read_jsonl(ctx.path("grade") / "graded.jsonl") if r["correct"]]
    steps = int(ctx.summary("policy")["final"]["step"])
    if len(correct) < ctx.config.rs.global_batch_size:
        print(f"[stepwise] rs: {len(correct)} correct samples, fewer than one global batch: ablation skipped", flush=True)
        return {"samples": len(correct), "steps": 0, "skipped": "fewer correct samples than one global batch"}
    write_jsonl(ctx.dir("rs") / "correct.jsonl", correct)
    checkpoints = train_section(ctx, "rs", ctx.path("rs") / "correct.jsonl", base_policy(ctx)[0],
                                max_steps=steps)
    return {"samples": len(correct), "steps": steps, **export_and_evaluate(ctx, "rs", str(checkpoints), "rs_same_steps")}
