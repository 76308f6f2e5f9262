"""HF `config.json` -> megatron `TransformerConfig` + layer spec + `GPTModel`; SDPA or TE attention; FP8."""
