"""The recipe schema: every default of stepwise lives here, once.

A recipe YAML is a small diff over these dataclasses (usually via `recipes/base/*.yaml`); unknown
keys are rejected at load time with the key path and the closest valid name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from stepwise.sampling.base import SamplingParams


@dataclass
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # default: runs/<recipe file stem>
    seed: int = 1234
    stages: list[str] = field(default_factory=list)  # empty: every stage of the recipe's method
    seeds: list[int] = field(default_factory=list)  # run once per seed in <dir>/seed_<s>, then a spread report


@dataclass
class ArithTaskConfig:
    n_steps: int = 3
    operators: str = "+-*"
    corrupt_fraction: float = 0.3
    corrupt_rate: float = 0.6


@dataclass
class TaskConfig:
    name: str = "arith"  # arith | gsm8k | math | code (problems with unit tests, graded by running them)
    n_train: int = 4000  # arith: problems generated; real tasks: at most this many read (0: all)
    n_test: int = 500
    n_validation: int = 0  # problems that tuning evaluates on (eval.split=validation) and reported tables never
    arith: ArithTaskConfig = field(default_factory=ArithTaskConfig)
    train_path: Optional[str] = None  # real tasks: JSONL or parquet (MATH, GSM8K, {"problem", "answer"}; code: TACO)
    test_path: Optional[str] = None
    validation_path: Optional[str] = None  # real tasks: the validation split's file (eval.split=validation)
    test_ids: Optional[str] = None  # file of ids selecting a test subset (MATH500)
    format: Optional[str] = None  # math | gsm8k | generic; default: the task name. code: a code benchmark layout (default taco)
    prompt_template: Optional[str] = None  # "{problem}" placeholder; default: the paper's CoT instruction


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # HF tokenizer dir; None: train one on the task corpus
    vocab_size: Optional[int] = None


@dataclass
class FP8Config:
    """FP8 training through Transformer Engine (`stepwise.models.precision`): GPUs of compute capability
    >= 8.9 (H100; an A100 trains in bf16), sequences padded to the FP8 GEMMs' multiple."""

    enabled: bool = False
    recipe: str = "tensorwise"  # tensorwise (per-tensor current scaling) | delayed | blockwise | mxfp8
    margin: int = 0  # delayed scaling only
    amax_history_len: int = 1024  # delayed scaling only
    # forward-only scoring (pi_ref log-probs, critic values) in FP8 too; false: in model.dtype (bf16). FP8
    # log-probs differ from bf16 ones by FP8 rounding, so with training in FP8 and pi_ref scored in bf16
    # log pi/pi_ref starts off zero by that gap; true scores like the training pass
    scoring: bool = False


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF model dir (config.json + safetensors); None: random init from `hf_config`
    hf_config: dict[str, Any] = field(default_factory=dict)  # config.json fields for a from-scratch model
    dtype: str = "float32"  # float32 | bfloat16
    make_vocab_size_divisible_by: int = 128
    max_seq_len: int = 128
    recompute_activations: bool = False
    transformer_impl: str = "auto"  # te (Transformer Engine) | local (megatron + SDPA) | auto: te when it imports on CUDA
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    nproc_per_node: int = 1  # processes per node (GPUs per node on a cluster)
    nnodes: int = 1
    sequence_parallel: bool = True  # used when TP > 1 on GPU
    use_distributed_optimizer: bool = True  # GPU only; the CPU path uses the plain megatron optimizer
    launcher: str = "torchrun"  # torchrun | srun | inprocess

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.0
    schedule: str = "cosine"  # cosine | constant | linear


@dataclass
class TrainConfig:
    loss: str = "sft"
    loss_args: dict[str, Any] = field(default_factory=dict)  # validated by the loss plugin's options
    global_batch_size: int = 64
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs when set
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    keep_every: int = 0  # also keep iterations whose step is a multiple of this (0: none beyond keep_last)
    async_save: bool = False  # save_every checkpoints written by a forked process while training goes on
    nan_policy: str = "skip"  # non-finite loss or grad norm: skip (no update) | stop (save, exit non-zero)
    max_wall_minutes: Optional[float] = None  # save and exit with the requeue code before this wall time
    data_errors: str = "strict"  # bad input records: strict (stop before training) | lenient (skip, count)
    max_bad_fraction: float = 0.01  # lenient: abort when more than this fraction of records is bad
    score_micro_batch_size: Optional[int] = None  # forward-only scoring with this section's model; None: micro_batch_size
    tensorboard: bool = False  # TensorBoard event files beside metrics.jsonl (needs the tensorboard package)
    pack_prefixes: bool = True  # `action` batches: each state's prefix once, its actions after it, rows filled to
    # model.max_seq_len tokens; in the critic section, the advantage stage's next states of a state as one branched
    # record (exact; under Transformer Engine the masked rows go to SDPA: stepwise.models.te_packed_attention)
    pack_sequences: bool = True  # `sft`, `pair`, `labelled`, `trajectory` and `values` batches: several samples per row of
    # the longest sample's padded length, up to micro_batch_size rows a micro-batch, block-diagonal attention,
    # positions restarting per sample (exact; under Transformer Engine as above). Faster on CPU at
    # every shape measured (benchmarks/RESULTS.md, 2026-12-02: step x0.77-0.93 of unpacked on mixed-length
    # samples; dqo_smoke's SFT stage unchanged)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: Optional[ParallelConfig] = None  # this section's own layout (a 7B critic beside a 72B policy); None: the recipe's


def _critic_train() -> TrainConfig:
    """Paper §3.2 / §4.1: BCE on MC values, one epoch, lr 5e-6, global batch 512."""
    return TrainConfig(loss="critic_bce", global_batch_size=512, micro_batch_size=4, epochs=1.0,
                       optim=OptimConfig(lr=5e-6, schedule="constant", warmup_fraction=0.0))


def _policy_train() -> TrainConfig:
    """Paper §4.1: skywork_dapo, beta 0.01, lr 5e-7, global batch 2048."""
    return TrainConfig(loss="skywork_dapo", loss_args={"beta": 0.01}, global_batch_size=2048, micro_batch_size=4,
                       epochs=1.0, optim=OptimConfig(lr=5e-7, schedule="constant", warmup_fraction=0.0))


@dataclass
class SkyworkDAPOConfig:
    """Data side of Skywork DAPO (paper §4.1); the critic and policy train sections sit beside it."""

    select_k: int = 6  # solutions kept per problem, balanced correct / wrong
    separator: str = "\n"  # step separator; empty steps are dropped
    completions: int = 16  # m rollouts per state for its MC value
    completion_temperature: float = 1.0  # the completer samples pi_ref itself
    advantage_gap: float = 0.1  # delta: keep states with max A - min A >= delta
    advantage_source: str = "critic"  # critic: V of the next state | mc: mean outcome of the completions starting with the action
    critic_holdout: float = 0.1  # fraction of problems whose states only evaluate the critic
    critic_init: Optional[str] = None  # HF causal-LM dir the critic starts from (paper: Qwen2.5-Math-7B-Instruct); None: pi0
    iterations: int = 1  # rounds of the loop; round k > 1 uses round k-1's policy as pi_ref (paper §4.3)
    generator: str = "previous"  # who samples solutions past round 1: previous (pi_ref) | base (pi0)
    completer: str = "previous"  # who rolls out states past round 1 (MC values of V^pi_ref): previous | base


def _dqo_train(loss: str, epochs: float) -> TrainConfig:
    """DQO paper appendix B: DQO and DRO with beta 0.03, lr 5e-7 (Qwen; Gemma 1e-7), global batch 256
    (local 32 x 8 GPUs); DRO's checkpoint after epoch 1, DQO's after epoch 2. The schedule is not stated."""
    return TrainConfig(loss=loss, loss_args={"beta": 0.03}, global_batch_size=256, micro_batch_size=4, epochs=epochs,
                       optim=OptimConfig(lr=5e-7, schedule="constant"))


def _preference_train(loss: str, micro_batch_size: int) -> TrainConfig:
    """Appendix B: DPO with beta 0.1, lr 5e-8, global batch 64, one epoch; KTO takes DPO's settings.
    DPO counts pairs (a micro-batch of 4 pairs is 8 rows); KTO's 8 rows hold whole reference-point
    groups (`kl_group_size` 8)."""
    return TrainConfig(loss=loss, loss_args={"beta": 0.1}, global_batch_size=64, micro_batch_size=micro_batch_size,
                       epochs=1.0, optim=OptimConfig(lr=5e-8, schedule="constant"))


def _baseline_sft() -> TrainConfig:
    """Appendix B: SFT on gold solutions and rejection sampling, lr 2e-5 (Qwen; Gemma 5e-6 / 1e-6),
    global batch 64, 3 epochs."""
    return TrainConfig(loss="sft", global_batch_size=64, micro_batch_size=4, epochs=3.0, optim=OptimConfig(lr=2e-5))


@dataclass
class DQODataConfig:
    """Data and value-network side of DQO and its baselines (DQO paper §4.1, §4.4, appendix A); the
    train sections `dqo`, `dro`, `dpo`, `kto`, `sft_baseline`, `rs_baseline` sit beside it."""

    n_problems: int = 0  # training problems to sample responses for (0: all of the task's train split)
    # the behaviour policy mu = pi0: 20 responses per prompt, top_p 0.9, top_k 16 (the paper's thresh_p 0.01
    # has no counterpart here); max_tokens / seed / stop as in SamplingParams
    params: SamplingParams = field(default_factory=lambda: SamplingParams(n=20, temperature=1.0, top_p=0.9, top_k=16))
    process_scores: bool = False  # §4.4: synthetic process rewards from prefix rollouts of failed responses
    process_completions: int = 20  # m completions per prefix (same sampling parameters as `params`)
    separator: str = "\n"  # step separator of the process-score segments
    max_segments: int = 0  # 0: one segment per step; k > 0: consecutive steps merged into at most k segments
    dpo_pair_ratio: float = 0.5  # DPO pairs ~ this x the DQO trajectories (appendix A: about half)
    eval_seeds: int = 0  # > 0: also sampled accuracy (one sample per test problem per seed; paper: 5)
    # V_phi of dqo / dro: separate (its own network beside the policy, the paper's) | head (a scalar head on
    # the policy trunk: one model's memory)
    value_model: str = "separate"
    value_init: Optional[str] = None  # HF causal-LM dir the separate value network starts from; None: pi0


@dataclass
class SamplingConfig:
    backend: str = "hf"  # hf | vllm
    n_problems: int = 256  # training problems to sample solutions for
    batch_size: int = 64
    shard_size: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)  # n, temperature, top_p, top_k, max_tokens, seed, stop
    # vllm: GPUs per sampler (its tensor-parallel group), the fraction of each GPU vLLM may take (weights,
    # activations, then the KV cache from what is left) and the most sequences it decodes at once
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "max_num_seqs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sampling.{key}={value!r} must be an integer >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"sampling.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")


@dataclass
class EvalConfig:
    split: str = "test"  # test: the reported tables | validation: for tuning (task.n_validation / validation_path)
    n_problems: int = 500
    max_tokens: int = 64
    batch_size: int = 128


@dataclass
class BenchmarkEvalConfig:
    """`stepwise eval` (stepwise/evaluate): greedy zero-shot with the CoT template; its flags' defaults."""
    backend: str = "hf"  # hf | vllm
    max_tokens: int = 2048
    batch_size: int = 32
    shard_size: int = 128  # prompts per resumable sample shard
    replicas: int = 1  # data-parallel sampler replicas on this node (shards index % replicas == rank)
    tensor_parallel_size: int = 1  # vllm: GPUs per replica
    launcher: str = "torchrun"  # torchrun | srun: how the replicas start (one replica: a plain process)


@dataclass
class RecipeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    skywork_dapo: SkyworkDAPOConfig = field(default_factory=SkyworkDAPOConfig)
    critic: TrainConfig = field(default_factory=_critic_train)
    policy: TrainConfig = field(default_factory=_policy_train)
    rs: TrainConfig = field(default_factory=TrainConfig)  # ablation: SFT on correct samples, policy's step count
    dqo_data: DQODataConfig = field(default_factory=DQODataConfig)
    dqo: TrainConfig = field(default_factory=lambda: _dqo_train("dqo", 2.0))
    dro: TrainConfig = field(default_factory=lambda: _dqo_train("dro", 1.0))
    dpo: TrainConfig = field(default_factory=lambda: _preference_train("dpo", 4))
    kto: TrainConfig = field(default_factory=lambda: _preference_train("kto", 8))
    sft_baseline: TrainConfig = field(default_factory=_baseline_sft)  # DQO baseline: SFT on gold solutions
    rs_baseline: TrainConfig = field(default_factory=_baseline_sft)  # DQO baseline: SFT on pi0's correct samples
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def layout_for(self, section: str) -> ParallelConfig:
        """The layout the workers of train section `section` run at: its own `parallel`, else the recipe's."""
        own = getattr(self, section).parallel if section in self.__dataclass_fields__ else None
        return own or self.parallel
