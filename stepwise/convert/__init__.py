"""HF <-> megatron checkpoint conversion: per-family weight tables as data, one engine for both directions."""
