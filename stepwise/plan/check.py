"""Assess every job of a recipe, and the check `stepwise run` makes before its first stage."""
from __future__ import annotations

from stepwise.config.schema import RecipeConfig
from stepwise.plan import estimate
from stepwise.plan.defaults import GIB, GPU_MEMORY_GIB
from stepwise.plan.report import Assessment, refusal_message
from stepwise.plan.sources import Models, PlanError, resolve_models
from stepwise.plan.stages import MegatronJob, stage_jobs
from stepwise.plan.verdict import Hardware, judge


def assess(config: RecipeConfig, hardware: Hardware, models: Models) -> list[Assessment]:
    """Each job of each stage the recipe runs, with its most loaded GPU and its verdict."""
    from stepwise.pipeline.runner import stage_names

    assessments = []
    for job in stage_jobs(config, stage_names(config), models):
        peak = estimate.megatron_peak(job) if isinstance(job, MegatronJob) else estimate.sampler_gpu(job)
        assessments.append(Assessment(job, peak, judge(job, hardware)))
    return assessments


def check_before_run(config: RecipeConfig, gpu_memory_gib: float = GPU_MEMORY_GIB) -> tuple[bool, str]:
    """(whether the run may start, a line to print). A recipe whose architecture cannot be read here
    is not refused for that: the check says it was skipped."""
    hardware = Hardware(gpu_memory_gib)
    try:
        models = resolve_models(config)
    except PlanError as error:
        return True, f"[stepwise] memory plan skipped: {error}"
    assessments = assess(config, hardware, models)
    failing = [item for item in assessments if not item.verdict.fits]
    if failing:
        return False, refusal_message(failing, hardware)
    largest = max(assessments, key=lambda item: item.verdict.needed, default=None)
    most = f" (largest: {largest.job.stage}, {largest.verdict.needed / GIB:.1f} GiB)" if largest else ""
    return True, f"[stepwise] memory plan: every job fits {gpu_memory_gib:g} GiB GPUs{most}"
