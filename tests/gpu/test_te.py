"""Transformer Engine on a GPU (marked `gpu`; skipped without CUDA or transformer_engine): a converted
checkpoint loads into TE's spec with every key, TE and the local spec give the same bf16 logits on
the same converted weights, an FP8 step's loss matches bf16's at step 0, packed rows (their masks to
SDPA, `stepwise.models.te_packed_attention`) give the unpacked gradients under TE's spec, and sequence
packs reach TE as THD and attend as the masked kernel does (bf16).

NOT YET RUN: no GPU was lent to the task that wrote these; the CPU side of each (the TE module
paths, the checkpoint's `_extra_state` keys, the FP8 checks, the masked and THD dispatch) is tested in
tests/unit/test_te_spec.py, tests/unit/test_precision.py and tests/unit/test_te_packed_attention.py.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from stepwise.config.schema import FP8Config, ModelConfig
from tests.gpu.test_engine_gpu import train_losses
from tests.tolerance import bf16_implementations_bound, fp8_loss_bound, within

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                                  reason="Transformer Engine not installed")]
# FP8 GEMMs need dimensions that are multiples of 16; head_dim 64 suits TE's fused attention kernels
SHAPE = dict(model_type="qwen2", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=512, max_position_embeddings=256, tie_word_embeddings=False,
             initializer_range=0.1, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF dir, bf16 megatron checkpoint converted from it) of a random Qwen2 of SHAPE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("te")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPE))
    with torch.no_grad():  # norms away from 1, so a norm read from the wrong key shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(root / "hf")
    convert_hf_to_megatron(root / "hf", root / "ckpt", dtype="bfloat16", progress=False)
    return root / "hf", root / "ckpt"


def test_a_converted_checkpoint_holds_every_key_of_the_te_model(converted):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    from torch.distributed.checkpoint import FileSystemReader

    from stepwise.checkpoint import layout
    from stepwise.checkpoint.state import load_checkpoint
    from stepwise.models.builder import EngineOptions, build_gpt_model
    from stepwise.models.hf_config import arch_from_hf
    from stepwise.models.te_spec import FINAL_NORM, te_module_paths
    from stepwise.parallel.runtime import init_parallel

    hf_dir, ckpt = converted
    arch = arch_from_hf(hf_dir)
    init_parallel(1, 1)
    model = build_gpt_model(arch, EngineOptions(dtype="bfloat16", transformer_impl="te"))
    with_extra_state = {name for name, module in model.named_modules() if name.startswith("decoder.layers.")
                        and f"{name}._extra_state" in module.state_dict(prefix=f"{name}.")}
    in_layers = {f"decoder.layers.{layer}.{path}" for layer in range(arch.num_layers) for path in te_module_paths()}
    assert with_extra_state == in_layers  # the CPU derivation names TE's modules exactly
    state = model.sharded_state_dict()
    apply_factories(state)
    asked = {v.key if isinstance(v, ShardedTensor) else v.unique_key for v in nested_values(state)
             if isinstance(v, (ShardedTensor, ShardedObject))}
    stored = set(FileSystemReader(str(layout.resolve(ckpt))).read_metadata().state_dict_metadata)
    assert asked - stored == set()  # nothing missing
    # nothing unexpected, but the final norm's object where this TE's RMSNorm keeps no extra state (TE < 2)
    assert {key for key in stored - asked if not key.startswith(f"{FINAL_NORM}._extra_state")} == set()
    load_checkpoint(ckpt, model)  # megatron's own load: raises on a missing or unexpected key


def test_te_and_local_specs_give_the_same_bf16_logits(converted):
    from stepwise.convert.compare import hf_logits, megatron_logits

    hf_dir, ckpt = converted
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf_dir, tokens)  # fp32, only to size the bound
    assert reference.abs().mean() > 0.1  # logits vary: the comparison means something
    te = megatron_logits(ckpt, tokens, dtype="bfloat16", transformer_impl="te")
    local = megatron_logits(ckpt, tokens, dtype="bfloat16", transformer_impl="local")
    bound = bf16_implementations_bound(float(reference.abs().max()), json.loads((hf_dir / "config.json").read_text()))
    within("TE vs local spec, bf16 logits", float((te - local).abs().max()), bound)
    within("TE bf16 vs transformers fp32 logits", float((te - reference).abs().max()), bound)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_an_fp8_step_starts_at_the_bf16_loss(converted, recipe):
    from stepwise.models.precision import fp8_problem

    problem = fp8_problem(torch.cuda.get_device_capability(), recipe)
    if problem:
        pytest.skip(problem)
    _, ckpt = converted
    bf16 = ModelConfig(dtype="bfloat16", max_seq_len=64, transformer_impl="te")
    fp8 = ModelConfig(dtype="bfloat16", max_seq_len=64, transformer_impl="te", fp8=FP8Config(enabled=True, recipe=recipe))
    [loss_bf16], [loss_fp8] = (train_losses(config, steps=1, shape=SHAPE, init=ckpt) for config in (bf16, fp8))
    assert loss_fp8 != loss_bf16  # FP8 is engaged: its GEMMs round differently
    within(f"FP8 ({recipe}) vs bf16 step-0 loss", abs(loss_fp8 - loss_bf16), fp8_loss_bound(loss_bf16))


@pytest.mark.parametrize("case", ["skywork_dapo", "sft"])
def test_packing_is_exact_under_te(tmp_path, monkeypatch, case):
    """fp32, so TE's attention takes its unfused backend unpacked; TF32 off, or GEMMs of different row
    counts would round differently (the bound is fp32's)."""
    from tests.conftest import run_python
    from tests.integration.test_prefix_packing import WORKER, _check

    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # inherited by the worker
    run_python(WORKER, tmp_path / "te.pt", 1, 1, case, "te")
    _check(torch.load(tmp_path / "te.pt"), f"{case} TE")


def test_sequence_packs_reach_te_as_thd_and_attend_as_the_masked_kernel(monkeypatch):
    """bf16, one layer's core attention under TE's spec: a block-diagonal packed mask (two rows of
    samples and padding) goes to TE as THD sequences (`te_packed_attention`); outputs and q/k/v
    gradients equal the masked SDPA kernel's within bf16's bound for attention's three reductions
    (q.k, the softmax sum, p.v; twice that depth for gradients, as `gradient_bound`), each side
    rounding to bf16."""
    from stepwise.models.attention import core_attention
    from stepwise.models.builder import EngineOptions, build_gpt_model
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.parallel.runtime import init_parallel
    from stepwise.train.prefix_packing import blocked_mask
    from tests.tolerance import UNIT_ROUNDOFF_BF16

    init_parallel(1, 1)
    model = build_gpt_model(arch_from_hf_dict(SHAPE), EngineOptions(dtype="bfloat16", transformer_impl="te"))
    attention = model.decoder.layers[0].self_attention.core_attention
    thd_calls, packed_forward = [], attention.packed_forward

    def recorded(query, key, value, bounds):
        thd_calls.append(bounds)
        return packed_forward(query, key, value, bounds)

    monkeypatch.setattr(attention, "packed_forward", recorded)
    blocks = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 50 + [1] * 14])
    mask = blocked_mask(blocks, torch.zeros_like(blocks)).cuda()
    heads, groups = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    dim = SHAPE["hidden_size"] // heads
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(64, 2, count, dim, generator=generator, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for count in (heads, groups, groups))
    thd = attention(q, k, v, mask, None)
    assert thd_calls == [[0, 20, 50, 64, 114, 128]]
    want = core_attention(q, k, v, mask, 0.0, attention.masked_softmax_scale)
    weights = torch.randn(thd.shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    got_grads = torch.autograd.grad((thd.float() * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want.float() * weights).sum(), (q, k, v))
    within("THD vs masked SDPA, bf16 outputs", float((thd - want).abs().max()),
           2 * UNIT_ROUNDOFF_BF16 * 3 * float(want.abs().max()))
    for name, got, expected in zip("qkv", got_grads, want_grads):
        within(f"THD vs masked SDPA, bf16 {name} gradient", float((got - expected).abs().max()),
               2 * UNIT_ROUNDOFF_BF16 * 6 * float(expected.abs().max()))
