"""`stepwise plan`: per-GPU memory of every training, scoring and sampling job of a recipe, a verdict
for each with the recipe change that would make it fit, and the check `stepwise run` makes before its
first stage.

    defaults.py  hardware assumptions (GPU memory, headroom), byte sizes
    sources.py   where each model's architecture is read
    stages.py    recipe -> the jobs of each stage
    memory.py    the formulas (megatron's accounting, Korthikanti et al. 2022)
    estimate.py  bytes on a job's most loaded GPU
    verdict.py   fits or not, and the change that makes it fit
    report.py    the table, the details, the refusal message
    check.py     assess a recipe; the check before `stepwise run`
"""
from stepwise.plan.check import assess, check_before_run
from stepwise.plan.defaults import GPU_MEMORY_GIB
from stepwise.plan.report import render
from stepwise.plan.sources import PlanError, resolve_models, stand_ins
from stepwise.plan.verdict import Hardware

__all__ = ["GPU_MEMORY_GIB", "Hardware", "PlanError", "assess", "check_before_run", "render", "resolve_models",
           "stand_ins"]
