"""NeMo 2 checkpoint import (`stepwise convert nemo-to-megatron`) on NeMo-shaped directories of the
tiny family models (`tests.nemo_models`): the import holds the same tensors as `hf-to-megatron` of the
source, exports back to the source's tensors bitwise in their dtype with a config.json giving the
source's exact logits, and loads into the megatron model with transformers' logits; broken
checkpoints fail naming the file and key."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stepwise.checkpoint import layout
from stepwise.convert import dist_io
from stepwise.convert.compare import hf_logits, megatron_logits, parity
from stepwise.convert.hf_io import read_hf_state
from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
from stepwise.convert.mapping import MappingError
from stepwise.convert.megatron_to_hf import convert_megatron_to_hf
from stepwise.convert.nemo_config import NemoCheckpointError
from stepwise.convert.nemo_import import import_nemo2
from stepwise.models.hf_config import arch_from_hf
from tests.family_models import VOCAB, make_family_model
from tests.helpers import make_tiny_char_tokenizer
from tests.nemo_models import make_nemo_checkpoint
from tests.tolerance import logits_bound, within

pytestmark = pytest.mark.slow


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def nemo_of(hf_dir: Path, out: Path, **options) -> Path:
    return make_nemo_checkpoint(hf_dir, out, make_tiny_char_tokenizer(VOCAB), **options)


@pytest.mark.parametrize("family, dtype", [("qwen2-untied", torch.bfloat16), ("llama3", torch.float32),
                                           ("gemma", torch.float32)])
def test_import_round_trips_bitwise_and_keeps_the_logits(tmp_path, family, dtype):
    hf_dir = make_family_model(family, tmp_path / "hf", dtype=dtype)
    summary = import_nemo2(nemo_of(hf_dir, tmp_path / "nemo"), tmp_path / "ckpt", progress=False)
    assert summary["dtype"] == str(dtype).removeprefix("torch.") and summary["tokenizer"].endswith("nemo_tokenizer")
    convert_hf_to_megatron(hf_dir, tmp_path / "direct", progress=False)
    stored = dist_io.stored_tensors(layout.resolve(tmp_path / "ckpt"))
    assert stored == dist_io.stored_tensors(layout.resolve(tmp_path / "direct"))
    assert (tmp_path / "ckpt" / "hf" / "tokenizer.json").is_file()
    assert arch_from_hf(tmp_path / "ckpt" / "hf") == arch_from_hf(hf_dir)
    convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    original, returned = read_hf_state(hf_dir), read_hf_state(tmp_path / "back")
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == dtype and torch.equal(tensor, returned[name]), name
    reference = hf_logits(hf_dir, tokens())
    assert torch.equal(hf_logits(tmp_path / "back", tokens()), reference)
    if dtype == torch.float32:
        observed = parity(reference, megatron_logits(tmp_path / "ckpt", tokens()))["max_abs_logit_diff"]
        within(f"{family} NeMo import vs transformers", observed,
               logits_bound(reference, json.loads((hf_dir / "config.json").read_text())))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF dir, NeMo dir) of the tiny Llama 3 model."""
    root = tmp_path_factory.mktemp("nemo_llama")
    hf_dir = make_family_model("llama3", root / "hf")
    return hf_dir, nemo_of(hf_dir, root / "nemo")


def copy_with(nemo_dir: Path, out: Path, **config_changes) -> Path:
    """A copy of `nemo_dir` whose model.yaml has `config_changes` (`_target_` changes the model class)."""
    shutil.copytree(nemo_dir, out)
    file = out / "context" / "model.yaml"
    document = yaml.safe_load(file.read_text())
    document["_target_"] = config_changes.pop("_target_", document["_target_"])
    document["config"].update(config_changes)
    file.write_text(yaml.safe_dump(document))
    return out


def test_template_sets_what_nemo_does_not_record_and_nemo_wins_on_numerics(tmp_path, llama):
    hf_dir, nemo_dir = llama
    template = tmp_path / "template"
    template.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["max_position_embeddings"], config["bos_token_id"] = 999, 5
    config["rope_parameters"]["rope_theta"] = 1234.0
    (template / "config.json").write_text(json.dumps(config))
    summary = import_nemo2(nemo_dir, tmp_path / "ckpt", hf_template=template, progress=False)
    written = json.loads((tmp_path / "ckpt" / "hf" / "config.json").read_text())
    assert (written["max_position_embeddings"], written["bos_token_id"]) == (999, 5)
    assert arch_from_hf(tmp_path / "ckpt" / "hf").rope_theta == 500000.0 and summary["from_nemo_over_template"] == ["rope_theta"]


def test_shape_field_differing_from_the_template_is_named(tmp_path, llama):
    hf_dir, nemo_dir = llama
    shutil.copytree(hf_dir, tmp_path / "template")
    config = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "template" / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(NemoCheckpointError, match=r"model\.yaml: intermediate_size is 96 .* 128 in .*template/config\.json"):
        import_nemo2(nemo_dir, tmp_path / "ckpt", hf_template=tmp_path / "template", progress=False)


@pytest.mark.parametrize("changes, named", [
    ({"_target_": "nemo.collections.llm.gpt.model.ssm.MambaModel"}, r"model\.yaml: _target_ '.*MambaModel'"),
    ({"num_moe_experts": 8}, r"model\.yaml: config\.num_moe_experts=8"),
    ({"ffn_hidden_size": 128}, r"'module\.decoder\.layers\.mlp\.linear_fc1\.weight' holds \(192, 64\)"),
])
def test_unsupported_or_inconsistent_config_is_named(tmp_path, llama, changes, named):
    broken = copy_with(llama[1], tmp_path / "nemo", **changes)
    with pytest.raises(NemoCheckpointError, match=named):
        import_nemo2(broken, tmp_path / "ckpt", progress=False)


@pytest.mark.parametrize("options, named", [
    ({"drop": "linear_fc2"}, r"missing 'decoder\.layers\.0\.mlp\.linear_fc2\.weight' \(key 'decoder\.layers\.mlp\.linear_fc2\.weight'\)"),
    ({"extra": {f"decoder.layers.{i}.self_attention.q_layernorm.weight": torch.ones(16) for i in range(2)}},
     r"keys no rule maps: \['decoder\.layers\.self_attention\.q_layernorm\.weight'\]"),
])
def test_missing_or_unknown_weight_is_named(tmp_path, llama, options, named):
    broken = nemo_of(llama[0], tmp_path / "nemo", **options)
    with pytest.raises(MappingError, match=named):
        import_nemo2(broken, tmp_path / "ckpt", progress=False)


@pytest.mark.parametrize("damage, named", [
    (lambda d: shutil.rmtree(d / "weights"), r"/weights: missing"),
    (lambda d: (d / "weights" / "adapter_metadata.json").write_text("{}"), r"adapter_metadata\.json: a PEFT adapter"),
    (lambda d: (d / "weights" / "metadata.json").write_text('{"sharded_backend": "zarr"}'),
     r"metadata\.json: sharded_backend 'zarr'"),
    (lambda d: (d / "context" / "model.yaml").unlink(),  # nemo-toolkit made not importable, installed or not
     r"model\.yaml: missing, and .*io\.json .* install nemo-toolkit \(requirements-cluster\.txt\)"),
])
def test_unreadable_layout_is_named_with_what_to_do(tmp_path, llama, monkeypatch, damage, named):
    monkeypatch.setitem(sys.modules, "nemo", None)
    damage(copy_with(llama[1], tmp_path / "nemo"))
    with pytest.raises(NemoCheckpointError, match=named):
        import_nemo2(tmp_path / "nemo", tmp_path / "ckpt", progress=False)


def test_cli_reports_the_error_and_exits_2(tmp_path, capsys):
    from stepwise.cli import main

    code = main(["convert", "nemo-to-megatron", "--nemo", str(tmp_path / "absent"), "--out", str(tmp_path / "x")])
    assert code == 2 and f"error: {tmp_path / 'absent' / 'weights'}: missing" in capsys.readouterr().err
