"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def safetensors_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / INDEX).is_file():
        weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or {INDEX}")


def read_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(Path(hf_dir)):
        state.update(load_file(str(file)))
    return state


def write_safetensors(state: dict[str, torch.Tensor], out_dir: Path) -> int:
    """Write `model.safetensors` atomically (temp name, then rename); returns bytes written."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = out_dir / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, out_dir / "model.safetensors")
    return (out_dir / "model.safetensors").stat().st_size


def state_dtype(state: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"checkpoint mixes dtypes {sorted(map(str, dtypes))}; pass --dtype")
    return DTYPE_NAMES[dtypes.pop()]
