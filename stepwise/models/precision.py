"""Which transformer implementation and which FP8 recipe a model is built with, and what FP8 asks of
the GPU and of the batches: pure functions of the recipe and the device, so CPU tests check them.

- `model.transformer_impl`: `te` (Transformer Engine's layer spec: fused RMSNorm + linear, fused
  attention, FP8 capable), `local` (megatron's local spec with SDPA attention) or `auto` (TE when
  `transformer_engine` imports and CUDA is present). `te` where either is missing is an error.
- `model.fp8.recipe`: the FP8 scaling recipes megatron-core 0.16.1 accepts for
  `TransformerConfig.fp8_recipe` (its `Fp8Recipe` enum, `custom` left out: it needs a quantizer
  factory). The GPU requirements are Transformer Engine's (`transformer_engine/pytorch/quantization.py`,
  `_compute_*_support`): per-tensor scaling (delayed, tensorwise) from compute capability 8.9 (Ada,
  Hopper), blockwise from 9.0 with CUDA >= 12.9, MXFP8 on Blackwell (10.x, 11.x) only. An A100 (8.0)
  trains in bf16.
- FP8 GEMMs need token counts that are multiples of 16 (32 for MXFP8: megatron's
  `fp8_utils.get_fp8_align_size`); with sequence parallelism each TP rank holds 1/TP of the sequence,
  so the padded length must be that multiple times TP.

Importing this module needs neither torch nor megatron (recipe validation uses it).
"""
from __future__ import annotations

TRANSFORMER_IMPLS = ("auto", "te", "local")
FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")  # megatron-core 0.16.1 Fp8Recipe, less `custom`
# the lowest compute capability each recipe runs at, and the first it no longer runs at (None: no limit)
FP8_CAPABILITY = {"tensorwise": ((8, 9), None), "delayed": ((8, 9), None), "blockwise": ((9, 0), None),
                  "mxfp8": ((10, 0), (12, 0))}
FP8_ALIGNMENT = {"mxfp8": 32}  # tokens; every other recipe 16 (megatron's get_fp8_align_size)
DEFAULT_FP8_ALIGNMENT = 16


def resolve_transformer_impl(choice: str, te_importable: bool, cuda: bool) -> str:
    """"te" or "local" for `model.transformer_impl` = `choice` on a machine where Transformer Engine
    does / does not import and CUDA is / is not present."""
    if choice not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl={choice!r} is not one of {list(TRANSFORMER_IMPLS)}")
    if choice == "local":
        return "local"
    if te_importable and cuda:
        return "te"
    if choice == "auto":
        return "local"
    missing = " and ".join(name for name, present in (("transformer_engine", te_importable), ("CUDA", cuda))
                           if not present)
    raise ValueError(f"model.transformer_impl=te needs Transformer Engine on a CUDA GPU, but {missing} is missing "
                     f"here (pip install -r requirements-cluster.txt on a GPU node, or set "
                     f"model.transformer_impl=auto|local)")


def fp8_problem(capability: tuple[int, int], recipe: str) -> str | None:
    """Why FP8 recipe `recipe` cannot run on a GPU of compute capability `capability` (major, minor),
    or None when it can."""
    if recipe not in FP8_CAPABILITY:
        return f"model.fp8.recipe={recipe!r} is not one of {list(FP8_RECIPES)}"
    lowest, beyond = FP8_CAPABILITY[recipe]
    have = ".".join(map(str, capability))
    if tuple(capability) < lowest:
        hint = ("an A100 or older GPU trains in bf16: set model.fp8.enabled=false" if tuple(capability) < (8, 9)
                else "use model.fp8.recipe=tensorwise")
        return (f"model.fp8.enabled=true with recipe {recipe!r} needs a GPU of compute capability >= "
                f"{'.'.join(map(str, lowest))}, this one is {have} ({hint})")
    if beyond is not None and tuple(capability) >= beyond:
        return (f"model.fp8.recipe={recipe!r} runs on compute capability {'.'.join(map(str, lowest))} up to "
                f"{'.'.join(map(str, beyond))} (exclusive), this GPU is {have}; use model.fp8.recipe=tensorwise")
    return None


def fp8_sequence_multiple(recipe: str, tp: int, sequence_parallel: bool) -> int:
    """What an FP8 batch's sequence length must be a multiple of: the GEMM alignment of `recipe`, times
    TP when sequence parallelism splits the sequence over the TP ranks."""
    alignment = FP8_ALIGNMENT.get(recipe, DEFAULT_FP8_ALIGNMENT)
    return alignment * tp if sequence_parallel and tp > 1 else alignment
