"""Family -> weight table. Adding a family is one entry here (and its `FAMILIES` entry in
`stepwise.models.hf_config`); a family whose HF names differ gets its own table file."""
from __future__ import annotations

from stepwise.convert.decoder import decoder_rules
from stepwise.convert.mapping import Rule
from stepwise.models.hf_config import ModelArch

TABLES = {"qwen2": decoder_rules, "llama": decoder_rules, "gemma": decoder_rules}


def rules_for(arch: ModelArch, value_head: bool = False) -> list[Rule]:
    if arch.family not in TABLES:
        raise KeyError(f"no conversion table for family '{arch.family}' (known: {sorted(TABLES)})")
    return TABLES[arch.family](arch, value_head=value_head)
