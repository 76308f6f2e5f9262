"""Per-GPU memory of a job: megatron jobs on their most loaded pipeline stage, samplers on one GPU of
their tensor-parallel group.

A megatron GPU holds its stage's weights, fp32 gradients and optimizer state (training), and the
activations of the micro-batches in flight: under 1F1B stage i keeps min(p - i, m) of them, so the
first stage holds the most while the last one alone holds the output head's. Every stage is computed
and the largest total is the job's figure. Forward-only scoring keeps weights and one layer's working
set at a time. A vLLM sampler holds its weights split over its TP group and a KV cache for its
concurrent sequences, carved from `gpu_memory_utilization` of the GPU after the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from stepwise.plan import memory
from stepwise.plan.defaults import DTYPE_BYTES
from stepwise.plan.stages import MegatronJob, Network, SamplingJob


@dataclass(frozen=True)
class Breakdown:
    """Bytes on one GPU (parameters: a count)."""

    rank: int  # pipeline stage (0 for samplers)
    parameters: float
    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache


def _vocab(job: MegatronJob, network: Network) -> int:
    return memory.padded_vocab(network.model.arch.vocab_size, job.vocab_divisible_by, job.layout.tp)


def _layer_activations(job: MegatronJob, network: Network, recompute: bool) -> float:
    layout = job.layout
    return memory.layer_activation_bytes(network.model.arch, job.seq_len, job.rows, job.dtype, layout.tp,
                                         layout.splits_sequence, recompute)


def _head_activations(job: MegatronJob, network: Network) -> float:
    layout = job.layout
    return memory.output_activation_bytes(network.model.arch, network.outputs, _vocab(job, network), job.seq_len,
                                          job.rows, job.dtype, layout.tp, layout.splits_sequence)


def megatron_stage(job: MegatronJob, rank: int) -> Breakdown:
    """Pipeline stage `rank` of `job`, on one of its GPUs."""
    layout, last = job.layout, rank == job.layout.pp - 1
    parameters = sum(memory.stage_parameters(n.model.arch, n.outputs, _vocab(job, n), layout.pp, rank)
                     for n in job.networks) / layout.tp
    head = sum(_head_activations(job, n) for n in job.networks) if last else 0.0
    if not job.training:  # weights, one layer's working set at a time, the head's output
        working = max(_layer_activations(job, n, recompute=False) for n in job.networks)
        return Breakdown(rank, parameters, parameters * DTYPE_BYTES[job.dtype], activations=working + head)
    weight, gradient, optimizer = memory.bytes_per_parameter(job.dtype, layout.distributed_optimizer, layout.dp)
    per_microbatch = sum(memory.layers_per_stage(n.model.arch, layout.pp) * _layer_activations(job, n, job.recompute)
                         for n in job.networks)
    in_flight = memory.in_flight_microbatches(layout.pp, rank, job.microbatches)
    return Breakdown(rank, parameters, parameters * weight, parameters * gradient, parameters * optimizer,
                     in_flight * per_microbatch + head)


def megatron_peak(job: MegatronJob) -> Breakdown:
    """The most loaded pipeline stage."""
    return max((megatron_stage(job, rank) for rank in range(job.layout.pp)), key=lambda b: b.total)


def activation_variants(job: MegatronJob, rank: int) -> dict[str, float]:
    """Activations of stage `rank` with and without sequence parallelism and selective recompute."""
    variants = {}
    for sp in ((True, False) if job.layout.tp > 1 else (False,)):
        for recompute in (True, False):
            variant = replace(job.with_layout(sequence_parallel=sp), recompute=recompute)
            variants[variant_name(sp, recompute)] = megatron_stage(variant, rank).activations
    return variants


def variant_name(sequence_parallel: bool, recompute: bool) -> str:
    return {(True, True): "SP + recompute", (True, False): "SP only", (False, True): "recompute only",
            (False, False): "neither"}[(sequence_parallel, recompute)]


def sampler_parameters(job: SamplingJob) -> float:
    """Per GPU of the TP group; HF and vLLM load the exported model, with its real vocabulary."""
    arch = job.model.arch
    return memory.model_parameters(arch, (memory.LOGITS,), arch.vocab_size) / job.tp


def sampler_weights(job: SamplingJob) -> float:
    return sampler_parameters(job) * DTYPE_BYTES[job.dtype]


def kv_cache(job: SamplingJob, sequences: int) -> float:
    """KV cache of `sequences` full-length sequences on one GPU of the TP group: the KV heads are split
    over the group, or replicated once it has more GPUs than KV heads."""
    arch = job.model.arch
    per_gpu = memory.kv_cache_bytes_per_token(arch, job.dtype) / min(job.tp, arch.num_kv_heads)
    return per_gpu * job.context * sequences


def sampler_gpu(job: SamplingJob) -> Breakdown:
    return Breakdown(0, sampler_parameters(job), sampler_weights(job), kv_cache=kv_cache(job, job.sequences))


def sequences_at_once(job: SamplingJob, budget: float) -> int:
    """How many full-length sequences the KV cache holds after the weights (vLLM's preallocation)."""
    return int(max(0.0, budget - sampler_weights(job)) // kv_cache(job, 1))


def checkpoint_bytes(job: MegatronJob) -> int:
    """The section's training checkpoint, all GPUs together (with megatron's padded vocabulary rows)."""
    return sum(memory.checkpoint_bytes(memory.model_parameters(n.model.arch, n.outputs, _vocab(job, n)), job.dtype)
               for n in job.networks)
