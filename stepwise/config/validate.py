"""Cross-field checks of a recipe, run at load time (before any process group or GPU work).

Each failure names the key and the fix: TP x PP must divide the world size, attention and KV heads
must divide by TP, layers by PP, the global batch by micro-batch x DP; names must be registered;
FP8 needs Transformer Engine and a length cap FP8's padded batches can reach.
"""
from __future__ import annotations

from pathlib import Path

from stepwise.config.schema import RecipeConfig, TrainConfig
from stepwise.models.precision import FP8_RECIPES, TRANSFORMER_IMPLS, fp8_sequence_multiple

DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant", "linear")
LAUNCHERS = ("torchrun", "srun", "inprocess")
SAMPLING_BACKENDS = ("hf", "vllm")
TASKS = ("arith", "code", "gsm8k", "math")
PROBLEM_FORMATS = ("math", "gsm8k", "generic")  # task.format of the math-like tasks
NAN_POLICIES = ("skip", "stop")
TRAIN_SECTIONS = ("sft", "critic", "policy", "rs", "dqo", "dro", "dpo", "kto", "sft_baseline", "rs_baseline")
DATA_ERRORS = ("strict", "lenient")
VALUE_MODELS = ("separate", "head")


def _fail(source: str, message: str):
    from stepwise.config.loader import ConfigError

    raise ConfigError(f"{source}: {message}")


def _one_of(source: str, key: str, value, allowed) -> None:
    if value not in allowed:
        _fail(source, f"{key}={value!r} is not one of {list(allowed)}")


def _hf_fields(config: RecipeConfig, source: str) -> dict:
    if config.model.path:
        from stepwise.models.hf_config import ConfigError as HFConfigError, load_hf_config

        try:
            return load_hf_config(config.model.path)
        except HFConfigError as error:
            _fail(source, f"model.path: {error}")
    return dict(config.model.hf_config)


def _check_layout(parallel, hf: dict, where: str, source: str) -> int:
    """`where` ("parallel" or "<section>.parallel") against the model `hf` describes; returns the DP size."""
    for key in ("tp", "pp", "nproc_per_node", "nnodes"):
        if getattr(parallel, key) < 1:
            _fail(source, f"{where}.{key} must be >= 1")
    world = parallel.world_size
    if world % (parallel.tp * parallel.pp):
        _fail(source, f"{where}: TP {parallel.tp} x PP {parallel.pp} does not divide the world size "
                      f"{world} (nproc_per_node x nnodes); change {where}.nproc_per_node or tp/pp")
    heads = hf.get("num_attention_heads")
    kv_heads = hf.get("num_key_value_heads", heads)
    layers = hf.get("num_hidden_layers")
    if heads and heads % parallel.tp:
        _fail(source, f"{where}.tp={parallel.tp} does not divide num_attention_heads={heads}")
    if kv_heads and kv_heads % parallel.tp:
        _fail(source, f"{where}.tp={parallel.tp} does not divide num_key_value_heads={kv_heads}")
    if layers and layers % parallel.pp:
        _fail(source, f"{where}.pp={parallel.pp} does not divide num_hidden_layers={layers}")
    return world // (parallel.tp * parallel.pp)


def _start_fields(config: RecipeConfig, key: str, source: str) -> dict:
    """config.json of the model recipe key `key` (skywork_dapo.critic_init, dqo_data.value_init) names
    as a starting point, else the policy's."""
    section, name = key.split(".")
    path = getattr(getattr(config, section), name)
    if path is None:
        return _hf_fields(config, source)
    from stepwise.models.hf_config import ConfigError as HFConfigError, load_hf_config

    try:
        return load_hf_config(path)
    except HFConfigError as error:
        _fail(source, f"{key}: {error}")


def _check_value_network(config: RecipeConfig, policy_fields: dict, source: str) -> None:
    """dqo / dro with a separate value network: it reads the policy's tokens (same vocabulary) and runs
    at the section's layout beside the policy (its heads and layers must split the same way)."""
    data = config.dqo_data
    _one_of(source, "dqo_data.value_model", data.value_model, VALUE_MODELS)
    if data.value_model != "separate":
        return
    fields = _start_fields(config, "dqo_data.value_init", source)
    vocab, policy_vocab = fields.get("vocab_size"), policy_fields.get("vocab_size")
    if data.value_init and vocab and policy_vocab and vocab != policy_vocab:
        _fail(source, f"dqo_data.value_init={data.value_init}: vocab_size {vocab} differs from the policy's "
                      f"{policy_vocab}; the value network reads the policy's tokens")
    for section in ("dqo", "dro"):
        if section in config.run.stages:
            _check_layout(config.layout_for(section), fields, f"{section}.parallel (value network)", source)


def _check_reliability(train: TrainConfig, section: str, source: str) -> None:
    """Checkpoint retention, fault policies and the bad-input policy of a train section."""
    _one_of(source, f"{section}.nan_policy", train.nan_policy, NAN_POLICIES)
    _one_of(source, f"{section}.data_errors", train.data_errors, DATA_ERRORS)
    if train.keep_last < 1:
        _fail(source, f"{section}.keep_last={train.keep_last} must be >= 1 (the newest checkpoint is always kept)")
    if train.keep_every < 0:
        _fail(source, f"{section}.keep_every={train.keep_every} must be >= 0 (0: keep only the last keep_last)")
    if train.max_wall_minutes is not None and train.max_wall_minutes <= 0:
        _fail(source, f"{section}.max_wall_minutes={train.max_wall_minutes} must be > 0, or null for no deadline")
    if not 0.0 <= train.max_bad_fraction < 1.0:
        _fail(source, f"{section}.max_bad_fraction={train.max_bad_fraction} must be in [0, 1)")


def check_train(train: TrainConfig, section: str, dp: int, source: str) -> None:
    """Batch arithmetic, optimizer choices and the loss plugin's own options."""
    from stepwise.losses import registry

    per_step = train.micro_batch_size * dp
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        _fail(source, f"{section}.global_batch_size and micro_batch_size must be >= 1")
    if train.score_micro_batch_size is not None and train.score_micro_batch_size < 1:
        _fail(source, f"{section}.score_micro_batch_size={train.score_micro_batch_size} must be >= 1, or null "
                      f"for micro_batch_size")
    if train.global_batch_size % per_step:
        _fail(source, f"{section}.global_batch_size={train.global_batch_size} is not divisible by "
                      f"micro_batch_size x DP = {train.micro_batch_size} x {dp}; "
                      f"use a multiple of {per_step}")
    _one_of(source, f"{section}.optim.schedule", train.optim.schedule, SCHEDULES)
    _check_reliability(train, section, source)
    try:
        options = registry.get(train.loss).parse_options(train.loss_args)
    except (KeyError, ValueError, TypeError) as error:
        _fail(source, f"{section}.loss / loss_args: {error}")
    group = getattr(options, "kl_group_size", None)  # kto: a micro-batch must hold whole reference-point groups
    if group and (train.micro_batch_size % group or train.global_batch_size // dp % group):
        _fail(source, f"{section}.micro_batch_size={train.micro_batch_size} and the per-DP-rank batch "
                      f"{train.global_batch_size // dp} must be multiples of {section}.loss_args.kl_group_size={group}")


def _check_fp8(config: RecipeConfig, source: str) -> None:
    """FP8 needs TE's spec, and a length cap the padded batches can reach at every layout it trains or
    scores at (`stepwise.models.precision.fp8_sequence_multiple`). The GPU is checked when the model is built."""
    model = config.model
    _one_of(source, "model.transformer_impl", model.transformer_impl, TRANSFORMER_IMPLS)
    _one_of(source, "model.fp8.recipe", model.fp8.recipe, FP8_RECIPES)
    if not model.fp8.enabled:
        return
    if model.transformer_impl == "local":
        _fail(source, "model.fp8.enabled=true needs Transformer Engine: set model.transformer_impl=te (or auto)")
    layouts = [("parallel", config.parallel)] + [(f"{s}.parallel", getattr(config, s).parallel) for s in TRAIN_SECTIONS
                                                 if getattr(config, s).parallel is not None]
    for where, parallel in layouts:
        multiple = fp8_sequence_multiple(model.fp8.recipe, parallel.tp, parallel.sequence_parallel)
        if model.max_seq_len % multiple:
            _fail(source, f"model.max_seq_len={model.max_seq_len} must be a multiple of {multiple} with FP8 "
                          f"(recipe {model.fp8.recipe!r}, {where}.tp={parallel.tp}"
                          f"{', sequence parallel' if parallel.sequence_parallel and parallel.tp > 1 else ''}): "
                          f"use {-(-model.max_seq_len // multiple) * multiple}")


def _check_dqo_data(config: RecipeConfig, source: str) -> None:
    """The DQO data section (sampling parameters are checked by SamplingParams itself)."""
    data = config.dqo_data
    for key, minimum in (("n_problems", 0), ("process_completions", 1), ("max_segments", 0), ("eval_seeds", 0)):
        if getattr(data, key) < minimum:
            _fail(source, f"dqo_data.{key}={getattr(data, key)} must be >= {minimum}")
    if not data.separator:
        _fail(source, "dqo_data.separator must be a non-empty string (e.g. \"\\n\")")
    if not data.dpo_pair_ratio > 0:
        _fail(source, f"dqo_data.dpo_pair_ratio={data.dpo_pair_ratio} must be > 0 (appendix A: 0.5)")
    stages = config.run.stages
    if data.process_scores and "dqo_datasets" in stages and "dqo_process" not in stages:
        _fail(source, "dqo_data.process_scores=true needs the stage 'dqo_process' in run.stages (before 'dqo_datasets')")


def _check_task_format(config: RecipeConfig, source: str) -> None:
    """task.format: a code benchmark layout for task.name=code, else math | gsm8k | generic."""
    if config.task.format is None:
        return
    if config.task.name == "code":
        from stepwise.data.datasets import code_layouts

        _one_of(source, "task.format (task.name=code)", config.task.format, code_layouts())
    else:
        _one_of(source, "task.format", config.task.format, PROBLEM_FORMATS)


def validate(config: RecipeConfig, source: str = "recipe") -> None:
    """Raise ConfigError on the first inconsistency."""
    _one_of(source, "model.dtype", config.model.dtype, DTYPES)
    _check_fp8(config, source)
    _one_of(source, "parallel.launcher", config.parallel.launcher, LAUNCHERS)
    _one_of(source, "sampling.backend", config.sampling.backend, SAMPLING_BACKENDS)
    _one_of(source, "task.name", config.task.name, TASKS)
    if config.task.name != "arith":
        for key in ("train_path", "test_path"):
            if not getattr(config.task, key):
                _fail(source, f"task.{key} is required for task.name={config.task.name} (a JSONL or parquet file)")
        if not (config.model.path or config.tokenizer.path):
            _fail(source, f"task.name={config.task.name} needs model.path (or tokenizer.path) for the chat template")
        _check_task_format(config, source)
    if config.tokenizer.path and not Path(config.tokenizer.path).is_dir():
        _fail(source, f"tokenizer.path={config.tokenizer.path}: no such directory")
    if config.model.path and config.model.hf_config:
        _fail(source, "model.path and model.hf_config are exclusive (a checkpoint brings its own config.json)")
    dapo = config.skywork_dapo
    if dapo.iterations < 1:
        _fail(source, f"skywork_dapo.iterations={dapo.iterations} must be >= 1")
    for role in ("generator", "completer"):
        _one_of(source, f"skywork_dapo.{role}", getattr(dapo, role), ("previous", "base"))
    _one_of(source, "skywork_dapo.advantage_source", dapo.advantage_source, ("critic", "mc"))
    _one_of(source, "eval.split", config.eval.split, ("test", "validation"))
    if config.eval.split == "validation" and not (config.task.n_validation if config.task.name == "arith"
                                                  else config.task.validation_path):
        _fail(source, "eval.split=validation needs a validation split: task.n_validation (embedded task) or "
                      "task.validation_path")
    if len(set(config.run.seeds)) != len(config.run.seeds):
        _fail(source, f"run.seeds={config.run.seeds} repeats a seed")
    policy_fields = _hf_fields(config, source)
    dp = _check_layout(config.parallel, policy_fields, "parallel", source)
    _check_dqo_data(config, source)
    _check_value_network(config, policy_fields, source)
    for section in TRAIN_SECTIONS:
        own = getattr(config, section).parallel
        if own is not None:  # the section's own layout, checked against the model it trains
            fields = _start_fields(config, "skywork_dapo.critic_init", source) if section == "critic" else policy_fields
            section_dp = _check_layout(own, fields, f"{section}.parallel", source)
        check_train(getattr(config, section), section, section_dp if own is not None else dp, source)
