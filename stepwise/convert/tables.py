"""Family -> weight table. Adding a family (Llama 3.x, Gemma 1.x) is one entry here and its file."""
from __future__ import annotations

from stepwise.convert.mapping import Rule
from stepwise.convert.qwen2 import qwen2_rules
from stepwise.models.hf_config import ModelArch

TABLES = {"qwen2": qwen2_rules}


def rules_for(arch: ModelArch, value_head: bool = False) -> list[Rule]:
    if arch.family not in TABLES:
        raise KeyError(f"no conversion table for family '{arch.family}' (known: {sorted(TABLES)})")
    return TABLES[arch.family](arch, value_head=value_head)
