"""Stages `init` (HF weights -> megatron checkpoint), `sft` (training workers) and `export` (-> HF)."""
from __future__ import annotations

from pathlib import Path

from stepwise.pipeline.context import StageContext
from stepwise.pipeline.launch import launch
from stepwise.pipeline.registry import stage
from stepwise.pipeline.step import all_workers, in_step
from stepwise.pipeline.stages.data import tokenizer_dir


@stage("init", depends=("tokenizer",),
       config_keys=("model.path", "model.hf_config", "model.dtype", "run.seed", "skywork_dapo.critic_init",
                    "dqo_data.value_init"))
def init_model(ctx: StageContext) -> dict:
    return in_step(ctx, convert_starting_models, all_workers(ctx))


def convert_starting_models(ctx: StageContext) -> dict:
    """(In a launched step; every worker converts a range of layers.) The starting models as megatron
    checkpoints: pi0's (from `model.path`, or randomly initialised from `model.hf_config` by rank 0) and
    the critic's / value network's when they start from other models."""
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
    from stepwise.models.init import random_hf_model
    from stepwise.tasks.tokenizer import load_tokenizer

    out = ctx.dir("init")
    source = ctx.config.model.path
    if source is None:
        source = out / "hf"
        if ctx.rank == 0:
            tokenizer = load_tokenizer(tokenizer_dir(ctx))
            random_hf_model(ctx.config.model.hf_config, tokenizer, source, ctx.config.run.seed)
        ctx.barrier()
    convert_hf_to_megatron(source, out / "megatron", dtype=ctx.config.model.dtype)
    summary = {"hf": str(source), "megatron": str(out / "megatron")}
    # other starting models (their trunks; value heads start fresh): Skywork DAPO's critic, DQO's value network
    for name, start in (("critic", ctx.config.skywork_dapo.critic_init), ("value", ctx.config.dqo_data.value_init)):
        if start:
            convert_hf_to_megatron(start, out / name, dtype=ctx.config.model.dtype)
            summary[name] = str(out / name)
    return summary


def section_tokenizer(ctx: StageContext, section: str) -> str:
    """The tokenizer a section's workers read text with: the critic's own when it starts from another model."""
    if section == "critic" and ctx.config.skywork_dapo.critic_init:
        return ctx.config.skywork_dapo.critic_init
    return tokenizer_dir(ctx)


def train_section(ctx: StageContext, section: str, data: Path, init: str | Path, max_steps: int | None = None,
                  stage_name: str | None = None) -> Path:
    """Run the workers of a train section; returns its checkpoint root (in the directory of `stage_name`,
    by default the section's). A separate DQO value network starts from `dqo_data.value_init` when
    given (converted by `init`), else from `init` itself."""
    out = ctx.dir(stage_name or section) / "checkpoints"
    args = ["--recipe", str(ctx.resolved_recipe), "--section", section, "--data", str(data),
            "--tokenizer", section_tokenizer(ctx, section), "--init", str(init), "--out", str(out)]
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    from stepwise import losses  # here: the driver and the data steps need no torch

    if ctx.config.dqo_data.value_init and losses.get(getattr(ctx.config, section).loss).model_kind == "policy_value":
        args += ["--value-init", ctx.summary("init")["value"]]
    launch(ctx.config.layout_for(section), "stepwise.train.worker", args, ctx.run_dir)
    return out


def last_metrics(checkpoints: Path) -> dict:
    import json

    lines = (checkpoints / "metrics.jsonl").read_text().splitlines() if (checkpoints / "metrics.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else {}


def base_policy(ctx: StageContext) -> tuple[str, str]:
    """(megatron checkpoint, HF directory) of pi0: the SFT result when the recipe trains one (the
    embedded task), else the model the recipe starts from (`model.path`, converted by `init`)."""
    from stepwise.pipeline.runner import stage_names

    if "sft" in stage_names(ctx.config):
        return ctx.summary("sft")["checkpoints"], ctx.summary("export")["policy"]
    return ctx.summary("init")["megatron"], ctx.summary("init")["hf"]


def reference_policy(ctx: StageContext) -> tuple[str, str]:
    """pi_ref of the current Skywork DAPO iteration: pi0 at iteration 1, else the previous iteration's
    policy (its checkpoints and its HF export)."""
    if ctx.iteration == 1:
        return base_policy(ctx)
    previous = ctx.at(ctx.iteration - 1)
    return previous.summary("policy")["checkpoints"], previous.summary("dapo_eval")["policy"]


def acting_policy(ctx: StageContext, role: str) -> tuple[str, str]:
    """Who samples (`generator`) or rolls out (`completer`) at this iteration: pi_ref ("previous") or pi0 ("base")."""
    return base_policy(ctx) if getattr(ctx.config.skywork_dapo, role) == "base" else reference_policy(ctx)


@stage("sft", depends=("data", "tokenizer", "init"), config_keys=("model", "parallel", "sft", "run.seed"))
def sft(ctx: StageContext) -> dict:
    checkpoints = train_section(ctx, "sft", ctx.path("data") / "sft.jsonl", ctx.summary("init")["megatron"])
    return {"checkpoints": str(checkpoints), "final": last_metrics(checkpoints)}


@stage("export", depends=("sft",), config_keys=())
def export(ctx: StageContext) -> dict:
    out = ctx.dir("export") / "policy"
    export_checkpoint(ctx, ctx.summary("sft")["checkpoints"], out)
    return {"policy": str(out)}


def export_checkpoint(ctx: StageContext, checkpoints: str | Path, out: str | Path, **options) -> None:
    """Megatron checkpoint -> HF directory, in a launched step whose workers write the shard files
    between them (options: `megatron_to_hf`'s)."""
    in_step(ctx, convert_to_hf, all_workers(ctx), checkpoints=str(checkpoints), out=str(out), **options)


def convert_to_hf(ctx: StageContext, checkpoints: str, out: str, **options) -> dict:
    from stepwise.convert.megatron_to_hf import convert_megatron_to_hf

    return convert_megatron_to_hf(checkpoints, out, **options)
