"""What each stage of a recipe puts on its GPUs: megatron training or forward-only scoring jobs of a
train section, and samplers.

Stages named after a train section train it (`sft`, `critic`, `policy`, `rs`, the DQO methods); the
critic stage then scores its states with the critic, `advantage` scores with the critic and with the
reference policy, `dqo_datasets` with pi0 (forward only, the section's layout and scoring micro-batch).
Samplers: `sample`, `complete`, `dqo_sample`, `dqo_process` at `sampling.batch_size`; `eval`,
`dapo_eval`, `dqo_base_eval` at `eval.batch_size` (the evaluations inside `rs` and the DQO method
stages use the same sampler as `eval`). Later Skywork DAPO iterations repeat iteration 1's jobs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from stepwise.config.schema import RecipeConfig, TrainConfig
from stepwise.plan.memory import LOGITS, VALUE
from stepwise.plan.sources import Model, Models

TRAIN_SECTIONS = tuple(f.name for f in dataclasses.fields(RecipeConfig) if f.type in (TrainConfig, "TrainConfig"))
SCORING = {"critic": ("critic",), "advantage": ("critic", "policy"), "dqo_datasets": ("policy",)}
SAMPLING = {"sample": "sampling", "complete": "sampling", "dqo_sample": "sampling", "dqo_process": "sampling",
            "eval": "eval", "dapo_eval": "eval", "dqo_base_eval": "eval"}
HF_SAMPLER_DTYPE = "float32"  # the stages build HFSampler without a dtype: it loads the model in fp32


@dataclass(frozen=True)
class Layout:
    key: str  # where its knobs live: "parallel" or "<section>.parallel"
    tp: int
    pp: int
    nproc_per_node: int
    nnodes: int
    sequence_parallel: bool  # as the recipe asks; megatron uses it only with TP > 1 (`splits_sequence`)
    distributed_optimizer: bool

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def splits_sequence(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}" + (" SP" if self.splits_sequence else "")


@dataclass(frozen=True)
class Network:
    model: Model
    outputs: tuple[str, ...]  # memory.LOGITS and / or memory.VALUE


@dataclass(frozen=True)
class MegatronJob:
    """Megatron workers training a section, or scoring with its model (forward only)."""

    stage: str
    section: str
    training: bool
    networks: tuple[Network, ...]
    layout: Layout
    micro_batch: int  # records per micro-batch
    rows_per_record: int  # 2 for (chosen, rejected) pairs
    global_batch: int
    seq_len: int
    dtype: str
    recompute: bool
    vocab_divisible_by: int

    @property
    def rows(self) -> int:
        return self.micro_batch * self.rows_per_record

    @property
    def microbatches(self) -> int:
        """Micro-batches per step on each data-parallel rank: global batch / (micro-batch x DP)."""
        return max(1, self.global_batch // (self.micro_batch * self.layout.dp))

    @property
    def micro_batch_key(self) -> str:
        return f"{self.section}.{'micro_batch_size' if self.training else 'score_micro_batch_size'}"

    @property
    def kind(self) -> str:
        return "train" if self.training else "score"

    def with_layout(self, **changes) -> "MegatronJob":
        return replace(self, layout=replace(self.layout, **changes))


@dataclass(frozen=True)
class SamplingJob:
    """A sampler: vLLM over a tensor-parallel group of GPUs, or transformers on one."""

    stage: str
    model: Model
    backend: str
    tp: int
    sequences: int  # decoded at once: vLLM's max_num_seqs, the HF sampler's batch size
    sequences_key: str
    context: int  # tokens per sequence, prompt and completion: model.max_seq_len
    dtype: str
    utilization: float  # the GPU fraction vLLM takes (1 for the HF sampler: the megatron budget applies)
    node_gpus: int  # GPUs per node (parallel.nproc_per_node): the largest TP group on one node

    @property
    def kind(self) -> str:
        return "sample"


def _layout(config: RecipeConfig, section: str) -> Layout:
    parallel = config.layout_for(section)
    key = f"{section}.parallel" if getattr(config, section).parallel is not None else "parallel"
    return Layout(key, parallel.tp, parallel.pp, parallel.nproc_per_node, parallel.nnodes,
                  parallel.sequence_parallel, parallel.use_distributed_optimizer)


def _trained_networks(config: RecipeConfig, section: str, models: Models) -> tuple[Network, ...]:
    from stepwise import losses

    kind = losses.get(getattr(config, section).loss).model_kind
    if kind == "critic":
        return (Network(models.critic if section == "critic" else models.policy, (VALUE,)),)
    if kind == "policy_value" and config.dqo_data.value_model == "separate":
        return Network(models.policy, (LOGITS,)), Network(models.value, (VALUE,))
    return (Network(models.policy, (LOGITS, VALUE) if kind == "policy_value" else (LOGITS,)),)


def _megatron_job(config: RecipeConfig, stage: str, section: str, models: Models, training: bool) -> MegatronJob:
    from stepwise import losses

    train = getattr(config, section)
    networks = _trained_networks(config, section, models) if training else \
        (Network(models.critic, (VALUE,)) if section == "critic" else Network(models.policy, (LOGITS,)),)
    pairs = training and losses.get(train.loss).data_kind == "pair"
    return MegatronJob(stage, section, training, networks, _layout(config, section),
                       train.micro_batch_size if training else (train.score_micro_batch_size or train.micro_batch_size),
                       2 if pairs else 1, train.global_batch_size, config.model.max_seq_len, config.model.dtype,
                       config.model.recompute_activations, config.model.make_vocab_size_divisible_by)


def _sampling_job(config: RecipeConfig, stage: str, models: Models) -> SamplingJob:
    sampling, batch_section = config.sampling, SAMPLING[stage]
    if sampling.backend == "vllm":
        return SamplingJob(stage, models.policy, "vllm", sampling.tensor_parallel_size, sampling.max_num_seqs,
                           "sampling.max_num_seqs", config.model.max_seq_len, config.model.dtype,
                           sampling.gpu_memory_utilization, config.parallel.nproc_per_node)
    batch = getattr(config, batch_section).batch_size
    return SamplingJob(stage, models.policy, sampling.backend, 1, batch, f"{batch_section}.batch_size",
                       config.model.max_seq_len, HF_SAMPLER_DTYPE, 1.0, config.parallel.nproc_per_node)


def stage_jobs(config: RecipeConfig, stage_names: list[str], models: Models) -> list[MegatronJob | SamplingJob]:
    """The jobs of each stage, in run order."""
    jobs: list[MegatronJob | SamplingJob] = []
    for stage in stage_names:
        if stage in TRAIN_SECTIONS:
            jobs.append(_megatron_job(config, stage, stage, models, training=True))
        jobs += [_megatron_job(config, stage, section, models, training=False) for section in SCORING.get(stage, ())]
        if stage in SAMPLING:
            jobs.append(_sampling_job(config, stage, models))
    return jobs
