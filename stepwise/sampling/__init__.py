"""Sampling completions from an exported HF model: the backend interface (`Sampler`, `make_sampler`),
the `transformers` backend (`HFSampler`, imported lazily), the vLLM backend (`sampling.vllm`, built by
`make_sampler("vllm", ...)` where vllm is installed), prompts and completions shared by both
(`sampling.requests`) and resumable JSONL shards."""
from stepwise.sampling.base import (FINISH_REASONS, SAMPLERS, Completion, Sampler, SamplingParams, make_sampler,
                                    register_sampler, sample_key)
from stepwise.sampling.shards import SAMPLE_FIELDS, read_shards, sample_to_shards

__all__ = ["FINISH_REASONS", "SAMPLERS", "SAMPLE_FIELDS", "Completion", "HFSampler", "Sampler", "SamplingParams",
           "make_sampler", "read_shards", "register_sampler", "sample_key", "sample_to_shards"]


def __getattr__(name: str):
    if name == "HFSampler":  # keeps `import stepwise.sampling` free of transformers
        from stepwise.sampling.hf import HFSampler

        return HFSampler
    raise AttributeError(f"module 'stepwise.sampling' has no attribute {name!r}")
