"""The weight-mapping engine: a table of rules (HF names <-> one megatron name + a named transform),
from which both directions are derived.

A rule's names may hold `{i}` (the layer index). Transforms:
- `identity`  one tensor, unchanged;
- `qkv`       HF q/k/v projections <-> megatron's fused linear_qkv, grouped per KV head group
              ([q rows of the group's heads, k rows, v rows] for each group);
- `gate_up`   HF gate/up projections <-> megatron's fc1 ([gate; up]);
- `vocab`     embedding / output rows padded with zeros to the padded vocabulary, sliced back.
Every HF key and every megatron key must be used exactly once: anything missing, unknown or left
over is an error naming the key.

There is no norm-offset transform: Gemma's (1 + w) norms are built zero-centred in megatron
(`layernorm_zero_centered_gamma`), so w is stored as HF stores it. Adding 1 on the way in and
subtracting it on the way out could not be bitwise in bf16 (1 + w keeps 8 significant bits).

The whole-state functions serve small models and tests; the streaming converters use `pairs`,
`check_hf_keys` and the per-tensor transforms (shapes come from running them on meta tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stepwise.models.hf_config import ModelArch


class MappingError(KeyError):
    """A key that is missing, unknown or unused (the message names it)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    megatron: str
    transform: str = "identity"

    def expand(self, num_layers: int) -> list[tuple[tuple[str, ...], str]]:
        if "{i}" not in self.megatron:
            return [(self.hf, self.megatron)]
        return [(tuple(n.format(i=i) for n in self.hf), self.megatron.format(i=i)) for i in range(num_layers)]


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    groups, d = arch.num_kv_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest),
                       v.reshape(groups, d, *rest)], dim=1)
    return fused.reshape(-1, *rest)


def _qkv_to_hf(fused: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    groups, d = arch.num_kv_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] > rows:
        raise ValueError(f"vocabulary of {tensor.shape[0]} rows exceeds the padded size {rows}")
    padding = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, padding], dim=0)


def to_megatron_tensor(rule: Rule, tensors: list[torch.Tensor], arch: ModelArch, padded_vocab: int) -> torch.Tensor:
    if rule.transform == "identity":
        return tensors[0]
    if rule.transform == "qkv":
        return _qkv_to_megatron(*tensors, arch)
    if rule.transform == "gate_up":
        return torch.cat(tensors, dim=0)
    if rule.transform == "vocab":
        return _pad_rows(tensors[0], padded_vocab)
    raise ValueError(f"unknown transform {rule.transform!r}")


def to_hf_tensors(rule: Rule, tensor: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    if rule.transform == "identity":
        return (tensor,)
    if rule.transform == "qkv":
        return _qkv_to_hf(tensor, arch)
    if rule.transform == "gate_up":
        return tuple(torch.chunk(tensor, 2, dim=0))
    if rule.transform == "vocab":
        return (tensor[: arch.vocab_size],)
    raise ValueError(f"unknown transform {rule.transform!r}")


def pairs(rules: list[Rule], arch: ModelArch) -> list[tuple[Rule, tuple[str, ...], str]]:
    """Every (rule, HF names, megatron name), layers expanded, in table order."""
    return [(rule, hf, megatron) for rule in rules for hf, megatron in rule.expand(arch.num_layers)]


def check_hf_keys(rules: list[Rule], arch: ModelArch, names) -> None:
    """Raise `MappingError` naming the first HF key the table needs but `names` lacks, or the keys
    in `names` no rule maps."""
    names = set(names)
    unused = set(names)
    for _, hf_names, megatron_name in pairs(rules, arch):
        for name in hf_names:
            if name not in names:
                raise MappingError(f"HF checkpoint is missing '{name}' (needed for '{megatron_name}')")
        unused -= set(hf_names)
    if unused:
        raise MappingError(f"HF checkpoint has keys no rule maps: {sorted(unused)[:5]} ({len(unused)} in all)")


def megatron_shape(rule: Rule, hf_shapes: list, arch: ModelArch, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the megatron tensor `rule` makes from HF tensors of `hf_shapes` (no data touched)."""
    tensors = [torch.empty(shape, device="meta") for shape in hf_shapes]
    return tuple(to_megatron_tensor(rule, tensors, arch, padded_vocab).shape)


def hf_shapes(rule: Rule, shape, arch: ModelArch) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors `rule` makes from a megatron tensor of `shape` (no data touched)."""
    return [tuple(t.shape) for t in to_hf_tensors(rule, torch.empty(shape, device="meta"), arch)]


def hf_to_megatron_state(rules: list[Rule], hf_state: dict[str, torch.Tensor], arch: ModelArch,
                         padded_vocab: int) -> dict[str, torch.Tensor]:
    """Map a full HF state dict to megatron names; every HF key must be consumed."""
    check_hf_keys(rules, arch, hf_state.keys())
    return {megatron_name: to_megatron_tensor(rule, [hf_state[n] for n in hf_names], arch, padded_vocab)
            for rule, hf_names, megatron_name in pairs(rules, arch)}


def megatron_to_hf_state(rules: list[Rule], megatron_state: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Map a full megatron state dict (no `_extra_state`) to HF names; every key must be consumed."""
    unused = set(megatron_state)
    out = {}
    for rule, hf_names, megatron_name in pairs(rules, arch):
        if megatron_name not in megatron_state:
            raise MappingError(f"megatron checkpoint is missing '{megatron_name}'")
        unused.discard(megatron_name)
        for name, tensor in zip(hf_names, to_hf_tensors(rule, megatron_state[megatron_name], arch)):
            out[name] = tensor.contiguous()
    if unused:
        raise MappingError(f"megatron checkpoint has keys no rule maps: {sorted(unused)[:5]} ({len(unused)} in all)")
    return out
