"""The plan as text: one table row per job (GiB on its most loaded GPU and a verdict), a line of
details per job (activation variants, pipeline bubble, checkpoint size, the sampler's KV cache), and
the message `stepwise run` refuses a recipe with."""
from __future__ import annotations

from dataclasses import dataclass

from stepwise.plan import estimate, memory
from stepwise.plan.defaults import CUDA_RESERVE_GIB, FRAGMENTATION_FRACTION, GIB, usable_gib
from stepwise.plan.estimate import Breakdown
from stepwise.plan.sources import Models
from stepwise.plan.stages import MegatronJob, SamplingJob
from stepwise.plan.verdict import Hardware, Job, Verdict

COLUMNS = ("job", "kind", "model", "layout", "params/GPU", "weights", "grads", "optim", "activ.", "KV cache",
           "total", "verdict")


@dataclass(frozen=True)
class Assessment:
    job: Job
    peak: Breakdown
    verdict: Verdict


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}" if value else "-"


def _count(value: float) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"


def _size(value: float) -> str:
    return f"{value / GIB / 1024:.2f} TiB" if value >= 1024 * GIB else f"{value / GIB:.1f} GiB"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('h') else 's'}"


def _layout(job: Job) -> str:
    if isinstance(job, MegatronJob):
        return job.layout.label()
    return f"{'vLLM' if job.backend == 'vllm' else job.backend.upper()} TP{job.tp} x{job.sequences} seqs"


def _model(job: Job) -> str:
    if isinstance(job, SamplingJob):
        return job.model.name
    return " + ".join(n.model.name + (" (value)" if i else "") for i, n in enumerate(job.networks))


def _row(item: Assessment) -> list[str]:
    job, peak = item.job, item.peak
    return [job.stage, job.kind, _model(job), _layout(job), _count(peak.parameters), _gib(peak.weights),
            _gib(peak.gradients), _gib(peak.optimizer), _gib(peak.activations), _gib(peak.kv_cache), _gib(peak.total),
            "fits" if item.verdict.fits else "does not fit"]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _training_details(job: MegatronJob, peak: Breakdown) -> str:
    layout = job.layout
    where = f"pipeline stage {peak.rank + 1} of {layout.pp}" if layout.pp > 1 else "one pipeline stage"
    in_flight = memory.in_flight_microbatches(layout.pp, peak.rank, job.microbatches)
    configured = estimate.variant_name(layout.splits_sequence, job.recompute)
    variants = ", ".join(f"{name} {value / GIB:.1f}" + (" (as configured)" if name == configured else "")
                         for name, value in estimate.activation_variants(job, peak.rank).items())
    bubble = (f"pipeline bubble {memory.bubble_fraction(layout.pp, job.microbatches):.2%}" if layout.pp > 1
              else "no pipeline bubble")
    return (f"{where}, {_plural(in_flight, 'micro-batch')} of {job.rows} x {job.seq_len} tokens in flight; "
            f"activations (GiB) with {variants}; {bubble} ({job.microbatches} micro-batches a step); "
            f"checkpoint {_size(estimate.checkpoint_bytes(job))} ({job.dtype} weights, "
            f"{'' if job.dtype == 'float32' else 'fp32 master, '}Adam m, v)")


def _details(item: Assessment) -> str:
    job, peak = item.job, item.peak
    if isinstance(job, SamplingJob):
        text = (f"weights {peak.weights / GIB:.1f} GiB per GPU of its TP-{job.tp} group, KV cache "
                f"{estimate.kv_cache(job, 1) / GIB:.2f} GiB per {job.context}-token sequence")
    elif job.training:
        text = _training_details(job, peak)
    else:
        text = (f"forward only at {job.micro_batch_key}={job.micro_batch}: weights and one layer's working set"
                + (f", pipeline stage {peak.rank + 1} of {job.layout.pp}" if job.layout.pp > 1 else ""))
    verdict = item.verdict
    if not verdict.fits:
        text += f"\n    -> does not fit: {verdict.why}" + (f"; change {verdict.fix}" if verdict.fix else "")
    if verdict.note:
        text += f"\n    note: {verdict.note}"
    return f"  {job.stage} ({job.kind}): {text}"


def _models(models: Models) -> str:
    named = {"policy": models.policy, "critic": models.critic, "value network": models.value}
    return "; ".join(f"{role} {m.name} ({m.arch.num_layers} layers, "
                     f"{_count(memory.model_parameters(m.arch, (memory.LOGITS,), m.arch.vocab_size))} parameters)"
                     for role, m in named.items() if role == "policy" or m is not models.policy)


def render(assessments: list[Assessment], models: Models, hardware: Hardware) -> str:
    gpu = hardware.gpu_memory_gib
    lines = [f"memory per GPU in GiB, on each job's most loaded GPU; {gpu:g} GiB GPUs: megatron and HF jobs may use "
             f"{usable_gib(gpu):.1f} GiB ({FRAGMENTATION_FRACTION:.0%} fragmentation, {CUDA_RESERVE_GIB:g} GiB CUDA "
             f"context), vLLM sampling.gpu_memory_utilization of it",
             f"models: {_models(models)}", ""]
    lines += _table([list(COLUMNS)] + [_row(item) for item in assessments])
    lines += [""] + [_details(item) for item in assessments]
    failing = [item for item in assessments if not item.verdict.fits]
    lines += ["", f"verdict: {len(failing)} of {len(assessments)} jobs do not fit" if failing else
              f"verdict: every job fits {gpu:g} GiB GPUs"]
    return "\n".join(lines)


def refusal_message(failing: list[Assessment], hardware: Hardware) -> str:
    """Why `stepwise run` does not start: each job that does not fit and what to change."""
    lines = [f"the recipe does not fit {hardware.gpu_memory_gib:g} GiB GPUs (`stepwise plan` shows the "
             f"figures; `stepwise run --force` runs it anyway):"]
    for item in failing:
        fix = f"; change {item.verdict.fix}" if item.verdict.fix else ""
        lines.append(f"  {item.job.stage} ({item.job.kind}): {item.verdict.why}{fix}")
    return "\n".join(lines)
