"""Whether a job fits its GPUs and, when it does not, the one recipe change that makes it fit.

Changes are tried from the cheapest to the most disruptive and the first that fits is named: for
megatron jobs selective recompute, sequence parallelism, the distributed optimizer, a smaller
micro-batch, then another TP x PP layout of the same GPUs (fewest model-parallel GPUs first); for a
vLLM sampler a larger tensor-parallel group; for the HF sampler a smaller batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Union

from stepwise.plan import estimate
from stepwise.plan.defaults import GIB, usable_gib
from stepwise.plan.stages import MegatronJob, SamplingJob

Job = Union[MegatronJob, SamplingJob]


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gib: float
    gpus_per_node: int | None = None  # None: each layout's nproc_per_node

    def budget(self, job: Job) -> float:
        """Bytes a job may use per GPU: vLLM's share, else what a megatron / torch process can fill."""
        if isinstance(job, SamplingJob) and job.backend == "vllm":
            return job.utilization * self.gpu_memory_gib * GIB
        return usable_gib(self.gpu_memory_gib) * GIB


@dataclass(frozen=True)
class Verdict:
    fits: bool
    needed: float  # bytes on the most loaded GPU (a vLLM sampler: weights + one sequence's KV cache)
    budget: float
    fix: str | None = None  # the recipe change that makes it fit ("key=value ..."), when one does
    why: str = ""  # what does not fit, when it does not
    note: str = ""  # worth knowing even when it fits


def needed_bytes(job: Job) -> float:
    if isinstance(job, MegatronJob):
        return estimate.megatron_peak(job).total
    kv = estimate.kv_cache(job, 1 if job.backend == "vllm" else job.sequences)  # vLLM queues what does not fit
    return estimate.sampler_weights(job) + kv


def _node_limit(job: Job, hardware: Hardware) -> int:
    if hardware.gpus_per_node:
        return hardware.gpus_per_node
    return job.layout.nproc_per_node if isinstance(job, MegatronJob) else job.node_gpus


def fits(job: Job, hardware: Hardware) -> bool:
    gpus = job.layout.nproc_per_node if isinstance(job, MegatronJob) else job.tp
    return gpus <= _node_limit(job, hardware) and needed_bytes(job) <= hardware.budget(job)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(job: MegatronJob, hardware: Hardware) -> Iterator[tuple[str, MegatronJob]]:
    layout, archs = job.layout, [n.model.arch for n in job.networks]
    tps = [t for t in _divisors(_node_limit(job, hardware))
           if all(a.num_attention_heads % t == 0 and a.num_kv_heads % t == 0 for a in archs)]
    pps = [p for p in _divisors(layout.world) if all(a.num_layers % p == 0 for a in archs)]
    for tp, pp in sorted(((t, p) for t in tps for p in pps), key=lambda tp_pp: (tp_pp[0] * tp_pp[1], tp_pp[1])):
        if (tp, pp) == (layout.tp, layout.pp) or layout.world % (tp * pp):
            continue
        candidate = job.with_layout(tp=tp, pp=pp)
        if job.training and job.global_batch % (job.micro_batch * candidate.layout.dp):
            continue
        yield f"{layout.key}.tp={tp} {layout.key}.pp={pp}", candidate


def _megatron_changes(job: MegatronJob, hardware: Hardware) -> Iterator[tuple[str, MegatronJob]]:
    layout = job.layout
    if job.training and not job.recompute:
        yield "model.recompute_activations=true", replace(job, recompute=True)
    if layout.tp > 1 and not layout.sequence_parallel:
        yield f"{layout.key}.sequence_parallel=true", job.with_layout(sequence_parallel=True)
    if job.training and layout.dp > 1 and not layout.distributed_optimizer:
        yield f"{layout.key}.use_distributed_optimizer=true", job.with_layout(distributed_optimizer=True)
    for size in reversed(_divisors(job.micro_batch)[:-1]):
        yield f"{job.micro_batch_key}={size}", replace(job, micro_batch=size)
    yield from _layouts(job, hardware)


def _sampling_changes(job: SamplingJob, hardware: Hardware) -> Iterator[tuple[str, SamplingJob]]:
    """vLLM: larger TP groups, those whose KV cache holds the most of max_num_seqs sequences first (the
    smallest such group), then the HF sampler: smaller batches."""
    arch = job.model.arch
    if job.backend == "vllm":
        groups = [replace(job, tp=tp) for tp in _divisors(_node_limit(job, hardware))
                  if tp > job.tp and arch.num_attention_heads % tp == 0
                  and (arch.num_kv_heads % tp == 0 or tp % arch.num_kv_heads == 0)]
        budget = hardware.budget(job)
        for group in sorted(groups, key=lambda g: (-min(estimate.sequences_at_once(g, budget), g.sequences), g.tp)):
            yield f"sampling.tensor_parallel_size={group.tp}", group
        return
    for size in reversed(_divisors(job.sequences)[:-1]):
        yield f"{job.sequences_key}={size}", replace(job, sequences=size)


def _vllm_note(job: SamplingJob, budget: float) -> str:
    if job.backend != "vllm" or estimate.sequences_at_once(job, budget) >= job.sequences:
        return ""
    return (f"the KV cache holds {estimate.sequences_at_once(job, budget)} of sampling.max_num_seqs={job.sequences} "
            f"full-length sequences at once; vLLM queues the rest (sampling.tensor_parallel_size raises it)")


def _beyond_reach(job: Job, limit: int) -> str:
    if isinstance(job, SamplingJob):
        return f"no tensor-parallel group of up to {limit} GPUs fits: use larger GPUs"
    layout = job.layout
    return f"no TP x PP layout of its {layout.world} GPUs fits: add nodes ({layout.key}.nnodes) or use larger GPUs"


def judge(job: Job, hardware: Hardware) -> Verdict:
    budget, needed = hardware.budget(job), needed_bytes(job)
    if fits(job, hardware):
        return Verdict(True, needed, budget, note=_vllm_note(job, budget) if isinstance(job, SamplingJob) else "")
    limit = _node_limit(job, hardware)
    if isinstance(job, MegatronJob) and job.layout.nproc_per_node > limit:
        layout = job.layout
        nodes = f" {layout.key}.nnodes={layout.world // limit}" if layout.world % limit == 0 else ""
        return Verdict(False, needed, budget, f"{layout.key}.nproc_per_node={limit}{nodes}",
                       f"{layout.key}.nproc_per_node={layout.nproc_per_node} but nodes have {limit} GPUs")
    why = f"needs {needed / GIB:.1f} GiB per GPU, {budget / GIB:.1f} GiB usable"
    changes = _megatron_changes(job, hardware) if isinstance(job, MegatronJob) else _sampling_changes(job, hardware)
    fix = next((change for change, candidate in changes if fits(candidate, hardware)), None)
    return Verdict(False, needed, budget, fix, why if fix else f"{why}; {_beyond_reach(job, limit)}")
