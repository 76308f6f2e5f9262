"""Stage `mc_ablation`: what the critic adds (the ablation a reviewer asks first). The same states and
completions as the Skywork DAPO iteration, but each action's value is the Monte-Carlo estimate the
completions already hold (`skywork_dapo.advantage_source: mc`: the mean outcome of the state's
completions whose first step is that action) instead of the critic's value of its next state; the
policy trains from pi_ref with the policy section's settings for as many steps as the critic-based
policy, and is exported and evaluated greedily beside it (and beside the RS ablation)."""
from __future__ import annotations

from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.dapo_train import advantage_data, export_and_evaluate
from stepwise.pipeline.stages.model import last_metrics, reference_policy, train_section


@stage("mc_ablation", depends=("policy", "complete", "segment", "sft", "init"),
       config_keys=("skywork_dapo", "policy", "eval", "model", "parallel", "task.name"))
def mc_ablation(ctx: StageContext) -> dict:
    data = advantage_data(ctx, "mc_ablation", "mc")
    steps = int(ctx.summary("policy")["final"]["step"])
    if not data["actions"]:
        print("[stepwise] mc_ablation: no state passed the gap filter with MC values: ablation skipped", flush=True)
        return {**data, "steps": 0, "skipped": "no action passed the gap filter"}
    checkpoints = train_section(ctx, "policy", ctx.path("mc_ablation") / "actions.jsonl", reference_policy(ctx)[0],
                                max_steps=steps, stage_name="mc_ablation")
    return {**data, "steps": steps, "final": last_metrics(checkpoints),
            **export_and_evaluate(ctx, "mc_ablation", str(checkpoints), "mc_same_steps")}
