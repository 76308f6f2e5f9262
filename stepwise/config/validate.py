"""Cross-field checks of a recipe, run at load time (before any process group or GPU work).

Each failure names the key and the fix: TP x PP must divide the world size, attention and KV heads
must divide by TP, layers by PP, the global batch by micro-batch x DP; names must be registered.
"""
from __future__ import annotations

from pathlib import Path

from stepwise.config.schema import RecipeConfig, TrainConfig

DTYPES = ("float32", "bfloat16")
FP8_RECIPES = ("delayed", "current")
SCHEDULES = ("cosine", "constant", "linear")
LAUNCHERS = ("torchrun", "srun", "inprocess")
SAMPLING_BACKENDS = ("hf", "vllm")
TASKS = ("arith", "gsm8k", "math")


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


def _check_layout(config: RecipeConfig, source: str) -> int:
    parallel = config.parallel
    for key in ("tp", "pp", "nproc_per_node", "nnodes"):
        if getattr(parallel, key) < 1:
            _fail(source, f"parallel.{key} must be >= 1")
    world = parallel.world_size
    if world % (parallel.tp * parallel.pp):
        _fail(source, f"parallel: TP {parallel.tp} x PP {parallel.pp} does not divide the world size "
                      f"{world} (nproc_per_node x nnodes); change parallel.nproc_per_node or tp/pp")
    hf = _hf_fields(config, source)
    heads = hf.get("num_attention_heads")
    kv_heads = hf.get("num_key_value_heads", heads)
    layers = hf.get("num_hidden_layers")
    if heads and heads % parallel.tp:
        _fail(source, f"parallel.tp={parallel.tp} does not divide num_attention_heads={heads}")
    if kv_heads and kv_heads % parallel.tp:
        _fail(source, f"parallel.tp={parallel.tp} does not divide num_key_value_heads={kv_heads}")
    if layers and layers % parallel.pp:
        _fail(source, f"parallel.pp={parallel.pp} does not divide num_hidden_layers={layers}")
    return world // (parallel.tp * parallel.pp)


def check_train(train: TrainConfig, section: str, dp: int, source: str) -> None:
    """Batch arithmetic, optimizer choices and the loss plugin's own options."""
    from stepwise.losses import registry

    per_step = train.micro_batch_size * dp
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        _fail(source, f"{section}.global_batch_size and micro_batch_size must be >= 1")
    if train.global_batch_size % per_step:
        _fail(source, f"{section}.global_batch_size={train.global_batch_size} is not divisible by "
                      f"micro_batch_size x DP = {train.micro_batch_size} x {dp}; "
                      f"use a multiple of {per_step}")
    _one_of(source, f"{section}.optim.schedule", train.optim.schedule, SCHEDULES)
    try:
        registry.get(train.loss).parse_options(train.loss_args)
    except (KeyError, ValueError, TypeError) as error:
        _fail(source, f"{section}.loss / loss_args: {error}")


def validate(config: RecipeConfig, source: str = "recipe") -> None:
    """Raise ConfigError on the first inconsistency."""
    _one_of(source, "model.dtype", config.model.dtype, DTYPES)
    _one_of(source, "model.fp8.recipe", config.model.fp8.recipe, FP8_RECIPES)
    _one_of(source, "parallel.launcher", config.parallel.launcher, LAUNCHERS)
    _one_of(source, "sampling.backend", config.sampling.backend, SAMPLING_BACKENDS)
    _one_of(source, "task.name", config.task.name, TASKS)
    if config.task.name != "arith":
        for key in ("train_path", "test_path"):
            if not getattr(config.task, key):
                _fail(source, f"task.{key} is required for task.name={config.task.name} (a JSONL or parquet file)")
        if not (config.model.path or config.tokenizer.path):
            _fail(source, f"task.name={config.task.name} needs model.path (or tokenizer.path) for the chat template")
    if config.tokenizer.path and not Path(config.tokenizer.path).is_dir():
        _fail(source, f"tokenizer.path={config.tokenizer.path}: no such directory")
    if config.model.path and config.model.hf_config:
        _fail(source, "model.path and model.hf_config are exclusive (a checkpoint brings its own config.json)")
    dp = _check_layout(config, source)
    for section in ("sft", "critic", "policy", "rs"):
        check_train(getattr(config, section), section, dp, source)
