"""HF <-> megatron conversion split over the ranks of a step (torchrun, 2 CPU processes): each rank
converts a contiguous range of layers. The 2-rank HF export has the 1-rank export's file names and
bytes and loads in transformers with the source's exact logits; the 2-rank megatron checkpoint (one
data file per rank) stores the same tensors, loads at TP1 with bitwise the 1-rank checkpoint's
logits and at TP2 within the reordering bound, and exports back to the very same files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stepwise.checkpoint import layout
from stepwise.convert import dist_io
from stepwise.convert.compare import hf_logits, megatron_logits
from stepwise.convert.hf_io import read_hf_state
from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
from stepwise.convert.megatron_to_hf import convert_megatron_to_hf
from tests.conftest import run_torchrun
from tests.family_models import VOCAB, make_family_model
from tests.tolerance import logits_bound, within

WORKER = Path(__file__).with_name("_convert_worker.py")
SHARD = "60KB"  # several files for a tiny model, so both ranks write some


def tokens() -> torch.Tensor:
    """The worker's fixed tokens (seed 0, 2 x 24)."""
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def exported_files(directory: Path) -> dict[str, bytes]:
    """{name: bytes} of an HF export's weight files and configs."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())
            if path.name.startswith("model") or path.name.endswith("config.json")}


@pytest.fixture
def converted(tmp_path, request):
    """(source HF dir, 1-rank checkpoint, 1-rank export, run dir of the 2-rank worker) for a family."""
    family, dtype = request.param
    hf_dir = make_family_model(family, tmp_path / "hf", dtype=dtype)
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt1", progress=False)
    convert_megatron_to_hf(tmp_path / "ckpt1", tmp_path / "back1", max_shard_size=SHARD, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    run_torchrun(2, WORKER, hf_dir, tmp_path / "ckpt2", tmp_path / "ckpt1", tmp_path / "back2", SHARD, run, VOCAB,
                 corrupted_copy(tmp_path / "ckpt1", tmp_path / "corrupt"))
    return hf_dir, tmp_path / "ckpt1", tmp_path / "back1", run


def corrupted_copy(ckpt: Path, copy: Path) -> Path:
    """A copy of `ckpt` whose largest file has other bytes at the same size (only its CRC-32 shows it)."""
    import shutil

    shutil.copytree(ckpt, copy)
    largest = max(layout.resolve(copy).iterdir(), key=lambda path: path.stat().st_size if path.is_file() else 0)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    return copy


FAMILIES = [("qwen2-untied", torch.bfloat16), ("gemma", torch.float32)]


@pytest.mark.slow
@pytest.mark.parametrize("converted", FAMILIES, ids=[family for family, _ in FAMILIES], indirect=True)
def test_two_rank_conversion_equals_one_rank(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt1, back1, run = converted
    ckpt2, back2 = tmp_path / "ckpt2", tmp_path / "back2"
    summaries = [json.loads((run / f"summary_{rank}.json").read_text()) for rank in range(2)]
    assert [s["hf_to_megatron"]["ranks"] for s in summaries] == [2, 2]
    assert all(s["megatron_to_hf"]["rank_files"] > 0 for s in summaries), summaries  # both ranks wrote shards
    assert sum(s["megatron_to_hf"]["rank_files"] for s in summaries) == summaries[0]["megatron_to_hf"]["files"] > 2
    # one rank checks the damaged file; both raise (no hang), the other naming the rank that found it
    errors = sorted(s["corrupt"] for s in summaries)
    assert all(error.startswith("CheckpointError:") and "CRC-32" in error for error in errors), errors
    assert "raised on rank" in errors[1] and "raised on rank" not in errors[0], errors

    # megatron -> HF: the same files, byte for byte; loads in transformers with the source's logits
    assert exported_files(back2) == exported_files(back1)
    original, returned = read_hf_state(hf_dir), read_hf_state(back2)
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[name], returned[name]) for name in original)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(str(back2)).float()(input_ids=tokens()).logits
        reference = AutoModelForCausalLM.from_pretrained(str(back1)).float()(input_ids=tokens()).logits
    assert torch.equal(logits, reference)

    # HF -> megatron: one data file per rank, the same stored tensors, the same logits
    iteration1, iteration2 = layout.resolve(ckpt1), layout.resolve(ckpt2)
    data_files = sorted(path.name for path in iteration2.glob("*.distcp"))
    assert data_files == ["__0_0.distcp", "__1_0.distcp"]
    assert all((iteration2 / name).stat().st_size > 0 for name in data_files)
    assert dist_io.stored_tensors(iteration2) == dist_io.stored_tensors(iteration1)
    meta = layout.read_meta(iteration2)
    assert set(meta["crc32"]) == set(meta["files"]) - {layout.META}
    layout.verify_checksums(iteration2, meta)
    assert torch.equal(megatron_logits(ckpt2, tokens()), megatron_logits(ckpt1, tokens()))
    tp1 = megatron_logits(ckpt2, tokens(), dtype="float32")  # the worker's TP2 run is in fp32 too
    bound = logits_bound(hf_logits(hf_dir, tokens()), json.loads((hf_dir / "config.json").read_text()))
    within("2-rank checkpoint at TP2 vs TP1", float((torch.load(run / "logits.pt") - tp1).abs().max()), bound)
    convert_megatron_to_hf(ckpt2, tmp_path / "back3", max_shard_size=SHARD, progress=False)
    assert exported_files(tmp_path / "back3") == exported_files(back1)
