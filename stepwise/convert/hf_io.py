"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index).

`HFSource` knows every tensor's file, dtype and shape from the headers alone and reads tensors one
at a time (`safe_open`, the file mapped, not loaded); `read_hf_state` loads everything (small models,
tests). Writing lives in `stepwise.convert.safetensors_out`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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


def common_dtype(dtypes) -> str:
    """The one floating dtype of a checkpoint's tensors (name); mixed dtypes need an explicit choice."""
    floating = {d for d in dtypes if d.is_floating_point}
    if len(floating) != 1:
        raise ValueError(f"checkpoint mixes dtypes {sorted(map(str, floating))}; pass --dtype")
    return DTYPE_NAMES[floating.pop()]


def state_dtype(state: dict[str, torch.Tensor]) -> str:
    return common_dtype(t.dtype for t in state.values())


class HFSource:
    """The tensors of an HF checkpoint directory, by name; headers read up front, data on request."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        by_code = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
        self.dir = Path(hf_dir)
        self.file: dict[str, Path] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for file in safetensors_files(self.dir):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name in self.file:
                        raise ValueError(f"{self.dir}: tensor '{name}' is in both {self.file[name].name} and {file.name}")
                    piece = handle.get_slice(name)
                    code = piece.get_dtype()
                    if code not in by_code:
                        raise ValueError(f"{file}: tensor '{name}' has dtype {code} (supported: {sorted(by_code)})")
                    self.file[name], self.dtype[name], self.shape[name] = file, by_code[code], tuple(piece.get_shape())

    def names(self) -> set[str]:
        return set(self.file)

    def nbytes(self, name: str) -> int:
        return torch.Size(self.shape[name]).numel() * self.dtype[name].itemsize

    def read(self, names) -> list[torch.Tensor]:
        """The tensors `names`, each read alone from its file (the mapping is dropped after each)."""
        from safetensors import safe_open

        tensors = []
        for name in names:
            with safe_open(str(self.file[name]), framework="pt") as handle:
                tensors.append(handle.get_tensor(name))
        return tensors
