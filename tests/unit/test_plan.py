"""`stepwise plan`: per-GPU memory of each job of a recipe, its verdict, and `stepwise run` refusing a
recipe that does not fit. The Qwen2.5-72B figures are derived by hand below, from config.json's numbers."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from stepwise import cli
from stepwise.config import load_recipe
from stepwise.config.loader import ConfigError
from stepwise.config.schema import RecipeConfig
from stepwise.plan import Hardware, PlanError, assess, check_before_run, memory, resolve_models, stand_ins

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests/fixtures/configs"
QWEN_72B = REPO / "recipes/skywork_dapo/qwen2.5-72b-instruct_8n8g_tp8pp4.yaml"
CLUSTER_RECIPES = sorted((REPO / "recipes/skywork_dapo").glob("*.yaml")) + sorted((REPO / "recipes/dqo").glob("*.yaml"))
TINY_RECIPES = sorted((REPO / "recipes/tiny").glob("*.yaml"))
GIB = 2**30


def _fixture_flags(recipe: Path) -> tuple[str | None, str | None]:
    """--model-config / --critic-config for a cluster recipe: the published config.json of the models it names."""
    data = yaml.safe_load(recipe.read_text())
    named = [(data.get("model") or {}).get("path"), (data.get("skywork_dapo") or {}).get("critic_init")]
    return tuple(str(CONFIGS / f"{Path(p).name}.json") if p else None for p in named)


@functools.lru_cache(maxsize=None)  # loading a recipe takes most of this file's time; configs are not modified
def _load(recipe: Path, overrides: tuple[str, ...] = ()) -> RecipeConfig:
    found = stand_ins(recipe, list(overrides), *_fixture_flags(recipe))
    return load_recipe(recipe, list(overrides) + found.overrides)


def _assess(recipe: Path, overrides: list[str] = (), gpu_gib: float = 80.0):
    config = _load(recipe, tuple(overrides))
    return assess(config, Hardware(gpu_gib), resolve_models(config))


def _job(assessments, stage: str, kind: str):
    return next(item for item in assessments if item.job.stage == stage and item.job.kind == kind)


def test_qwen72b_policy_at_tp8_pp4_matches_a_hand_derivation():
    hf = json.loads((CONFIGS / "Qwen2.5-72B-Instruct.json").read_text())
    h, layers, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    kv_heads = hf["num_key_value_heads"]
    f, vocab = hf["intermediate_size"], hf["vocab_size"]
    head_dim = h // heads  # 128
    tp, pp, dp = 8, 4, 64 // (8 * 4)
    seq, micro, global_batch = 4096, 1, 2048  # model.max_seq_len, policy.micro_batch_size, policy.global_batch_size

    # parameters: vocabulary padded to a multiple of 128 x TP, 20 layers per stage
    padded = -(-vocab // (128 * tp)) * (128 * tp)
    assert padded == 152576
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv)  # q, k, v, output projection, q/k/v biases
    per_layer = attention + 3 * h * f + 2 * h  # gate/up/down, two RMSNorms
    assert per_layer == 877_684_736
    first_stage = (layers // pp) * per_layer + padded * h  # + word embedding
    last_stage = (layers // pp) * per_layer + h + padded * h  # + final norm + untied output layer
    first_per_gpu, last_per_gpu = first_stage / tp, last_stage / tp
    assert first_per_gpu == 2_350_449_664

    # bytes per parameter: bf16 weights 2, fp32 grads 4, fp32 master + Adam 12 sharded over DP (6 + 12/DP)
    weights, grads, optimizer = 2, 4, 12 / dp
    assert weights + grads + optimizer == 6 + 12 / dp == 12

    # activations per layer and micro-batch (values, then 2 bytes each), SP and selective recompute on
    tokens = seq * micro
    norms_and_inputs = 4 * tokens * h / tp  # two norm inputs, QKV and MLP inputs: split by SP
    attention_values = 2 * tokens * (q + kv)  # q, k, v, output-projection input: split by TP
    mlp_values = 3 * tokens * f  # gate and up outputs, down-projection input
    layer_bytes = 2 * (norms_and_inputs + (attention_values + mlp_values) / tp)
    assert layer_bytes == 143_261_696
    microbatches = global_batch // (micro * dp)  # 1024
    first_activations = min(pp, microbatches) * (layers // pp) * layer_bytes  # 1F1B: 4 micro-batches in flight
    last_activations = 1 * (layers // pp) * layer_bytes + 2 * (2 * tokens * h / tp) + tokens * padded * (2 + 8) / tp
    first_total = first_per_gpu * (weights + grads + optimizer) + first_activations
    last_total = last_per_gpu * (weights + grads + optimizer) + last_activations
    assert first_total > last_total  # the first stage is the most loaded

    policy = _job(_assess(QWEN_72B), "policy", "train")
    peak = policy.peak
    assert peak.rank == 0 and peak.parameters == first_per_gpu
    assert (peak.weights, peak.gradients, peak.optimizer) == (first_per_gpu * 2, first_per_gpu * 4, first_per_gpu * 6)
    assert peak.activations == pytest.approx(first_activations)
    assert peak.total == pytest.approx(first_total) and first_total / GIB == pytest.approx(36.94, abs=0.01)
    assert policy.verdict.fits
    bubble = (pp - 1) / microbatches  # 1F1B: (p - 1) / m
    assert memory.bubble_fraction(pp, policy.job.microbatches) == bubble == pytest.approx(0.00293, abs=1e-5)

    # without selective recompute the softmax of the scores comes back: a s^2 b / t values per layer
    from stepwise.plan.estimate import activation_variants

    scores = heads * seq * seq * micro / tp * 2
    no_sp = 2 * 4 * tokens * h * (1 - 1 / tp)  # the norm and input values no longer split by SP
    variants = activation_variants(policy.job, 0)
    assert variants["SP only"] == pytest.approx(first_activations + 4 * 20 * scores)
    assert variants["recompute only"] == pytest.approx(first_activations + 4 * 20 * no_sp)

    # checkpoint: bf16 weights + fp32 master + Adam m, v = 14 bytes per parameter of the whole model
    whole = layers * per_layer + 2 * padded * h + h
    from stepwise.plan.estimate import checkpoint_bytes

    assert checkpoint_bytes(policy.job) == whole * 14

    # vLLM at TP 8: weights split 8 ways, KV cache 2 x layers x kv heads x head dim x 2 bytes per token
    sampler = _job(_assess(QWEN_72B, ["sampling.tensor_parallel_size=8"]), "sample", "sample")
    unpadded = layers * per_layer + 2 * vocab * h + h
    assert sampler.peak.weights == pytest.approx(unpadded * 2 / 8)
    assert sampler.peak.kv_cache == pytest.approx(2 * layers * kv_heads * head_dim * 2 / 8 * 4096 * 256)  # 40 GiB
    assert sampler.verdict.fits


@pytest.mark.parametrize("recipe", CLUSTER_RECIPES, ids=lambda p: p.stem)
def test_every_cluster_recipe_fits_80gb_gpus(recipe):
    assessments = _assess(recipe)  # as shipped
    assert [item.job.stage for item in assessments if not item.verdict.fits] == []
    kinds = {item.job.kind for item in assessments}
    assert kinds >= {"train", "score", "sample"}


def test_qwen72b_at_tp2_pp1_or_on_24gb_gpus_does_not_fit_and_names_the_knob():
    narrow = _job(_assess(QWEN_72B, ["parallel.tp=2", "parallel.pp=1", "parallel.nnodes=2"]), "policy", "train")
    assert not narrow.verdict.fits and narrow.peak.total / GIB > 200  # 36B parameters per GPU
    assert narrow.verdict.fix is None and "no TP x PP layout of its 16 GPUs fits" in narrow.verdict.why
    assert "add nodes (parallel.nnodes)" in narrow.verdict.why
    wide = _job(_assess(QWEN_72B, ["parallel.tp=4", "parallel.pp=1", "parallel.nnodes=4"]), "policy", "train")
    assert wide.verdict.fix == "parallel.tp=8 parallel.pp=2"  # the smallest model-parallel group of 32 GPUs that fits
    small = _job(_assess(QWEN_72B, gpu_gib=24), "policy", "train")
    assert not small.verdict.fits and small.verdict.fix is None
    assert "parallel.nnodes" in small.verdict.why and "19.6 GiB usable" in small.verdict.why


def _run_args(tmp_path, *extra):
    model, critic = _fixture_flags(QWEN_72B)
    return ["run", str(QWEN_72B), f"model.path={model}", f"skywork_dapo.critic_init={critic}",
            f"run.dir={tmp_path / 'run'}", *extra]


def test_run_refuses_a_recipe_that_does_not_fit_before_any_stage(tmp_path, monkeypatch, capsys):
    import stepwise.pipeline.runner as runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("run_pipeline called for a recipe that does not fit")

    monkeypatch.setattr(runner, "run_pipeline", must_not_run)
    narrow = ["parallel.tp=2", "parallel.pp=1", "parallel.nnodes=2"]
    assert cli.main(_run_args(tmp_path, *narrow)) == 2
    error = capsys.readouterr().err
    assert "does not fit 80 GiB GPUs" in error and "--force" in error
    assert "policy (train): needs 299.6 GiB per GPU, 70.0 GiB usable" in error and "parallel.nnodes" in error
    assert not (tmp_path / "run").exists()

    calls = []
    monkeypatch.setattr(runner, "run_pipeline", lambda config, only, force: calls.append(force) or
                        SimpleNamespace(run_dir=tmp_path / "run"))
    assert cli.main(_run_args(tmp_path, *narrow, "--force")) == 0
    assert "memory plan skipped (--force)" in capsys.readouterr().out
    assert cli.main(_run_args(tmp_path)) == 0  # the shipped layout fits: no --force needed
    assert "every job fits 80 GiB GPUs" in capsys.readouterr().out
    assert calls == [False, False]  # --force skips the memory check; it is not `stepwise stage`'s re-run


def test_a_recipe_whose_architecture_cannot_be_read_is_not_refused(monkeypatch):
    import stepwise.plan.check as check

    def unreadable(config):
        raise PlanError("model.path: no config.json")

    monkeypatch.setattr(check, "resolve_models", unreadable)
    allowed, message = check_before_run(_load(TINY_RECIPES[0]))
    assert allowed and "skipped" in message


@pytest.mark.parametrize("recipe", TINY_RECIPES, ids=lambda p: p.stem)
def test_tiny_recipes_fit_and_the_check_is_cheap(recipe):
    config = _load(recipe)
    began = time.perf_counter()
    allowed, message = check_before_run(config)
    assert allowed, message
    assert time.perf_counter() - began < 2.0
    assert all(item.peak.total < GIB for item in assess(config, Hardware(80.0), resolve_models(config)))


def test_plan_prints_the_table_and_names_missing_model_configs(capsys):
    model, critic = _fixture_flags(QWEN_72B)
    assert cli.main(["plan", str(QWEN_72B), "--model-config", model, "--critic-config", critic,
                     "sampling.tensor_parallel_size=8"]) == 0
    out = capsys.readouterr().out
    assert "stages: data -> tokenizer" in out and "verdict: every job fits 80 GiB GPUs" in out
    assert "policy     train   Qwen2.5-72B-Instruct" in out and "checkpoint 948.1 GiB" in out
    assert "note: skywork_dapo.critic_init=/models/Qwen2.5-Math-7B-Instruct: planned with --critic-config" in out
    assert cli.main(["plan", str(QWEN_72B)]) == 2
    error = capsys.readouterr().err
    assert "model.path=/models/Qwen2.5-72B-Instruct has no config.json here; pass --model-config" in error
    assert cli.main(["plan", str(QWEN_72B), "--model-config", model, "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "planned with the policy's architecture" in out


def test_sampling_memory_keys_are_checked():
    from stepwise.config.schema import SamplingConfig

    with pytest.raises(ConfigError, match=r"sampling.gpu_memory_utilization=1.5 must be in \(0, 1\]"):
        load_recipe(TINY_RECIPES[0], ["sampling.gpu_memory_utilization=1.5"])
    for key in ("tensor_parallel_size", "max_num_seqs"):
        with pytest.raises(ValueError, match=f"sampling.{key}=0 must be an integer >= 1"):
            SamplingConfig(**{key: 0})
