"""Stages `init` (HF weights -> megatron checkpoint), `sft` (training workers) and `export` (-> HF)."""
from __future__ import annotations

from pathlib import Path

from stepwise.pipeline.context import StageContext
from stepwise.pipeline.launch import launch
from stepwise.pipeline.registry import stage
from stepwise.pipeline.stages.data import tokenizer_dir


@stage("init", depends=("tokenizer",), config_keys=("model.path", "model.hf_config", "model.dtype", "run.seed"))
def init_model(ctx: StageContext) -> dict:
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
    from stepwise.models.init import random_hf_model
    from stepwise.tasks.tokenizer import load_tokenizer

    out = ctx.dir("init")
    source = ctx.config.model.path
    if source is None:
        tokenizer = load_tokenizer(tokenizer_dir(ctx))
        source = random_hf_model(ctx.config.model.hf_config, tokenizer, out / "hf", ctx.config.run.seed)
    convert_hf_to_megatron(source, out / "megatron", dtype=ctx.config.model.dtype)
    return {"hf": str(source), "megatron": str(out / "megatron")}


def train_section(ctx: StageContext, section: str, data: Path, init: str | Path, max_steps: int | None = None) -> Path:
    """Run the workers of a train section; returns its checkpoint root."""
    out = ctx.dir(section) / "checkpoints"
    args = ["--recipe", str(ctx.resolved_recipe), "--section", section, "--data", str(data),
            "--tokenizer", tokenizer_dir(ctx), "--init", str(init), "--out", str(out)]
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    launch(ctx.config.parallel, "stepwise.train.worker", args)
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


@stage("sft", depends=("data", "tokenizer", "init"), config_keys=("model", "parallel", "sft", "run.seed"))
def sft(ctx: StageContext) -> dict:
    checkpoints = train_section(ctx, "sft", ctx.run_dir / "data" / "sft.jsonl", ctx.summary("init")["megatron"])
    return {"checkpoints": str(checkpoints), "final": last_metrics(checkpoints)}


@stage("export", depends=("sft",), config_keys=())
def export(ctx: StageContext) -> dict:
    from stepwise.convert.megatron_to_hf import convert_megatron_to_hf

    out = ctx.dir("export") / "policy"
    convert_megatron_to_hf(ctx.summary("sft")["checkpoints"], out)
    return {"policy": str(out)}
