"""Conversion of each family (Qwen2 tied / untied, Llama 3 with llama3 rope scaling, Gemma) through
the streaming converters: megatron logits equal transformers' (fp32, TP1 in-process; TP2 under
torchrun), a sharded export with an index loads in transformers with the source's exact logits,
bf16 stays bf16 in every file and the HF -> megatron -> HF round trip is bitwise."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stepwise.convert import dist_io
from stepwise.convert.compare import hf_logits, megatron_logits, parity
from stepwise.convert.hf_io import INDEX, read_hf_state
from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
from stepwise.convert.megatron_to_hf import convert_megatron_to_hf
from tests.conftest import run_torchrun
from tests.family_models import FAMILIES, VOCAB, make_family_model
from tests.tolerance import logits_bound, within

WORKER = Path(__file__).with_name("_parity_worker.py")
RSS_WORKER = Path(__file__).with_name("_rss_worker.py")


def config_of(hf_dir: Path) -> dict:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def tokens() -> torch.Tensor:
    """The parity worker's fixed tokens (seed 0, 2 x 24)."""
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_and_sharded_export_loads(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf_dir = make_family_model(family, tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", progress=False)
    reference = hf_logits(hf_dir, tokens())
    report = parity(reference, megatron_logits(tmp_path / "ckpt", tokens()))
    assert reference.abs().mean() > 0.1, report  # logits vary: the comparison means something
    within(f"{family} megatron vs transformers", report["max_abs_logit_diff"], logits_bound(reference, config_of(hf_dir)))
    summary = convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="60KB", progress=False)
    assert summary["files"] > 1 and (tmp_path / "back" / INDEX).is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens()).logits, reference)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_stays_bf16_and_round_trips_bitwise(tmp_path, family):
    hf_dir = make_family_model(family, tmp_path / "hf", dtype=torch.bfloat16)
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", progress=False)
    from stepwise.checkpoint import layout

    stored = dist_io.stored_tensors(layout.resolve(tmp_path / "ckpt"))
    assert {dtype for _, dtype in stored.values()} == {torch.bfloat16}
    convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    original, returned = read_hf_state(hf_dir), read_hf_state(tmp_path / "back")
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == torch.bfloat16 and torch.equal(tensor, returned[name]), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    exact = hf_logits(hf_dir, tokens())  # fp32 run of the bf16 weights
    own_noise = parity(exact, hf_logits(hf_dir, tokens(), torch.bfloat16))["mean_abs_logit_diff"]
    ours = parity(exact, megatron_logits(tmp_path / "ckpt", tokens()))["mean_abs_logit_diff"]
    print(family, "bf16 mean |logit diff| vs fp32: megatron", ours, "transformers", own_noise)
    assert ours < 1.5 * own_noise, (ours, own_noise)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma"])
def test_tp2_logits_equal_tp1_and_transformers(tmp_path, family):
    hf_dir = make_family_model(family, tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", progress=False)
    run_torchrun(2, WORKER, tmp_path / "ckpt", tmp_path / "tp2.pt", 2, 1, VOCAB)
    tp2 = torch.load(tmp_path / "tp2.pt")
    reference = hf_logits(hf_dir, tokens())
    bound = logits_bound(reference, config_of(hf_dir))
    within(f"{family} TP2 vs TP1", float((tp2 - megatron_logits(tmp_path / "ckpt", tokens())).abs().max()), bound)
    within(f"{family} TP2 vs transformers", float((tp2 - reference).abs().max()), bound)


HEAD_DIM = 8  # qwen2-untied: hidden 112 / 14 heads
BROKEN_MAPPINGS = {  # what a wrong entry of the mapping table does to the weights megatron receives
    "transposed o_proj": lambda state: state["model.layers.0.self_attn.o_proj.weight"].copy_(
        state["model.layers.0.self_attn.o_proj.weight"].t().clone()),
    "two query heads swapped": lambda state: _swap(state["model.layers.0.self_attn.q_proj.weight"][:HEAD_DIM],
                                                   state["model.layers.0.self_attn.q_proj.weight"][HEAD_DIM:2 * HEAD_DIM]),
    "dropped q bias": lambda state: state["model.layers.1.self_attn.q_proj.bias"].zero_(),
    "gate and up swapped": lambda state: _swap(state["model.layers.1.mlp.gate_proj.weight"],
                                               state["model.layers.1.mlp.up_proj.weight"]),
    "norm offset by one": lambda state: state["model.layers.0.input_layernorm.weight"].add_(1.0),
}


def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    a_copy = a.clone()
    a.copy_(b)
    b.copy_(a_copy)


@pytest.mark.slow
def test_a_broken_mapping_fails_the_bound_by_orders_of_magnitude(tmp_path):
    """The derived tolerance stays tight: each simulated mapping bug (weights megatron would receive
    from a wrong table entry; a wrong RoPE base) moves the logits by at least 100x the bound."""
    from safetensors.torch import load_file, save_file

    hf_dir = make_family_model("qwen2-untied", tmp_path / "hf")
    reference = hf_logits(hf_dir, tokens())
    bound = logits_bound(reference, config_of(hf_dir))
    cases = dict(BROKEN_MAPPINGS, **{"RoPE base 1e4 for 1e6": None})
    for number, (name, breaking) in enumerate(cases.items()):
        broken = tmp_path / f"broken_{number}"
        shutil.copytree(hf_dir, broken)
        if breaking is None:
            config = config_of(broken)
            config["rope_parameters"]["rope_theta"] = 10_000.0
            (broken / "config.json").write_text(json.dumps(config))
        else:
            state = load_file(str(broken / "model.safetensors"))
            breaking(state)
            save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
        convert_hf_to_megatron(broken, tmp_path / f"ckpt_{number}", progress=False)
        observed = float((megatron_logits(tmp_path / f"ckpt_{number}", tokens()) - reference).abs().max())
        print(f"[tolerance] broken mapping '{name}': {observed:.3e} = {observed / bound:.0f}x the bound {bound:.3e}")
        assert observed > 100 * bound, (name, observed, bound)


@pytest.mark.slow
def test_streaming_peak_memory_is_bounded_by_layers_not_the_model(tmp_path, monkeypatch):
    """Each direction in a fresh process: its peak RSS grows by far less than the model's bytes
    (the whole-model converters grew by 3.8x / 2.2x the model)."""
    from tests.conftest import run_python
    from tests.family_models import make_wide_qwen2

    for name in ("MASTER_ADDR", "MASTER_PORT"):  # set by this process's own group: the worker picks its own
        monkeypatch.delenv(name, raising=False)

    model_mb = make_wide_qwen2(tmp_path / "hf") / 2**20
    runs = (("hf-to-megatron", tmp_path / "hf", tmp_path / "ckpt"), ("megatron-to-hf", tmp_path / "ckpt", tmp_path / "back"))
    for direction, source, out in runs:
        summary = json.loads(run_python(RSS_WORKER, direction, source, out).stdout.strip().splitlines()[-1])
        growth = summary["peak_rss_mb"] - summary["baseline_rss_mb"]
        print(f"{direction}: peak RSS +{growth:.0f} MiB for a {model_mb:.0f} MiB model")
        assert growth < 0.6 * model_mb, (direction, growth, model_mb)
    assert (tmp_path / "back" / INDEX).is_file()  # 40MB shards
    original, returned = read_hf_state(tmp_path / "hf"), read_hf_state(tmp_path / "back")
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)
