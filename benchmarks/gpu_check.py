"""One command that checks the engine on one GPU (about 5 minutes), ending with ONE JSON line.

On a Qwen2.5-0.5B-shaped model (tests/fixtures/configs/Qwen2.5-0.5B-Instruct.json) with random weights:

- a random HF checkpoint (with a byte-level tokenizer of the model's vocabulary), converted to a
  megatron checkpoint by `stepwise.convert`;
- for megatron's local spec in bf16, Transformer Engine's spec in bf16 and TE in FP8
  (`--fp8-recipe`): the converted checkpoint loaded (a missing or unexpected key fails the load), one
  SFT step whose loss is the step-0 loss (same weights, same batch: the runs agree up to their
  rounding), then `--steps` timed steps: tokens/s, model TFLOP/s and MFU against the GPU's dense
  bf16 peak (`stepwise.models.flops`), peak GPU memory against `stepwise plan`'s estimate of the job;
- a plain transformers + SDPA training step of the same shape and batch in the same process;
- the last run's model saved, exported to HF, and greedy generation from the export through
  `make_sampler("hf", ...)` and `make_sampler("vllm", ...)` (an error string where one fails).

`--dry-run` runs the same code on CPU at a much smaller shape in float32: the local spec, one timed
step, HF generation; the TE, FP8, GPU-memory and vLLM entries say "skipped: no CUDA". The exit status
is 1 when any entry is an error.

NOT YET RUN ON A GPU: no GPU was lent to the task that wrote it; only the dry run has run
(benchmarks/RESULTS.md).

    python benchmarks/gpu_check.py [--rows 4 --seq 2048 --steps 5 --fp8-recipe tensorwise --work DIR]
    python benchmarks/gpu_check.py --dry-run
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, ahead of an installed copy
from stepwise.config.schema import FP8Config  # noqa: E402
from stepwise.models.precision import FP8_RECIPES, fp8_sequence_multiple  # noqa: E402
from train_step import engine_step, timed, transformers_step  # noqa: E402 (benchmarks/, the script's directory)

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests/fixtures/configs/Qwen2.5-0.5B-Instruct.json"
SKIPPED = "skipped: no CUDA"
GIB = 2**30
RUNS = (("local", "local", False), ("te_bf16", "te", False), ("te_fp8", "te", True))  # name, transformer_impl, fp8
DRY_RUN_SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
PROMPT = "The quick brown fox"
SPECIALS = ("<pad>", "</s>", "<unk>")  # the byte-level tokenizer's first ids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shape, float32, local spec only")
    parser.add_argument("--config", default=str(CONFIG), help="HF config.json whose shape to check")
    parser.add_argument("--rows", type=int, default=None, help="sequences per step (default 4; dry run 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; dry run 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the first (default 5; dry run 1)")
    parser.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=FP8Config.recipe)
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens generated from the export")
    parser.add_argument("--work", default=None, help="directory for the checkpoints (default: a temporary one)")
    args = parser.parse_args(argv)
    for key, gpu, dry in (("rows", 4, 2), ("seq", 2048, 64), ("steps", 5, 1)):
        if getattr(args, key) is None:
            setattr(args, key, dry if args.dry_run else gpu)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run")
    multiple = fp8_sequence_multiple(args.fp8_recipe, 1, False)
    if args.seq % multiple:
        parser.error(f"--seq {args.seq} must be a multiple of {multiple} (FP8 recipe {args.fp8_recipe})")
    return args


def model_fields(args) -> dict:
    """The HF config of the checked model: the fixture's (at the dry run's small shape on CPU) with the
    special tokens of `byte_level_tokenizer`."""
    fields = json.loads(Path(args.config).read_text())
    specials = {"pad_token_id": SPECIALS.index("<pad>"), "eos_token_id": SPECIALS.index("</s>"), "bos_token_id": None}
    return dict(fields, **specials, **(DRY_RUN_SHAPE if args.dry_run else {}))


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (specials, the 256 bytes, then
    three-byte filler tokens), so whatever a random model generates decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stepwise.tasks.tokenizer import byte_symbol

    symbols = [byte_symbol(b) for b in range(256)]
    pieces = list(SPECIALS) + symbols
    fillers = (a + b + c for a in symbols[97:123] for b in symbols for c in symbols)  # a-z, then any two bytes
    pieces += [next(fillers) for _ in range(vocab_size - len(pieces))]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def write_random_hf(fields: dict, out: Path, dtype: str, device: str) -> dict:
    """A randomly initialised HF model of `fields` with its tokenizer in `out`; returns its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_level_tokenizer(fields["vocab_size"])
    config = AutoConfig.for_model(**{k: v for k, v in fields.items() if k != "torch_dtype"})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return json.loads((out / "config.json").read_text())


def plan_gib(arch, rows: int, seq: int, dtype: str) -> float:
    """`stepwise plan`'s per-GPU estimate of this training job (TP = PP = DP = 1), in GiB."""
    from stepwise.config.schema import ModelConfig, ParallelConfig
    from stepwise.plan.estimate import megatron_peak
    from stepwise.plan.memory import LOGITS
    from stepwise.plan.sources import Model
    from stepwise.plan.stages import Layout, MegatronJob, Network

    parallel = ParallelConfig()
    layout = Layout("parallel", 1, 1, 1, 1, parallel.sequence_parallel,
                    parallel.use_distributed_optimizer and torch.cuda.is_available())
    job = MegatronJob("gpu_check", "sft", True, (Network(Model("checked", arch), (LOGITS,)),), layout, rows, 1, rows,
                      seq, dtype, False, ModelConfig.make_vocab_size_divisible_by)
    return megatron_peak(job).total / GIB


def throughput(seconds: float, args, arch, peak_flops: float | None) -> dict:
    """tokens/s, model TFLOP/s and MFU of a step taking `seconds`."""
    from stepwise.models.flops import mfu, train_flops_per_token

    tokens_per_s = args.rows * args.seq / seconds
    return {"tokens_per_s": tokens_per_s, "tflops_per_s": tokens_per_s * train_flops_per_token(arch, args.seq) / 1e12,
            "mfu": mfu(tokens_per_s, arch, args.seq, peak_flops) if peak_flops else
            f"skipped: no dense bf16 peak known for {device_name()}"}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine(impl: str, fp8: bool, fields: dict, ckpt: Path, args, context: dict):
    """(figures, engine) of one warm-up and `args.steps` timed steps starting from `ckpt`."""
    from stepwise.checkpoint.layout import CheckpointError
    from stepwise.config.schema import FP8Config, ModelConfig

    model_config = ModelConfig(dtype=context["dtype"], max_seq_len=args.seq, transformer_impl=impl,
                               fp8=FP8Config(enabled=fp8, recipe=args.fp8_recipe))
    cuda = torch.cuda.is_available()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        engine, step = engine_step(fields, model_config, args.rows, args.seq, init=ckpt)
    except CheckpointError as error:
        return {"checkpoint_load": f"error: {error}"}, None
    loss = step()["loss"]  # step 0: the converted weights, before any update
    figures = {"checkpoint_load": "ok", "dtype": context["dtype"], "fp8": args.fp8_recipe if fp8 else False,
               "loss_step0": loss, **throughput(timed(step, args.steps), args, context["arch"], context["peak"])}
    figures["plan_memory_gib"] = context["plan_gib"]
    if cuda:
        figures["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - baseline) / GIB
        figures["memory_over_plan"] = figures["peak_memory_gib"] / context["plan_gib"]
    else:
        figures["peak_memory_gib"] = figures["memory_over_plan"] = SKIPPED
    return figures, engine


def guarded(make):
    """`make()`, or an error string naming what it raised."""
    try:
        return make()
    except Exception as error:  # a check reports every failure in its JSON line instead of stopping
        return f"error: {type(error).__name__}: {error}"


def export(engine, hf_dir: Path, hf_config: dict, work: Path, dtype: str) -> Path:
    """Save `engine`'s model and export it to HF (the tokenizer beside it); returns the export dir."""
    from stepwise.checkpoint.layout import save_hf_metadata
    from stepwise.checkpoint.state import save_checkpoint
    from stepwise.convert.megatron_to_hf import convert_megatron_to_hf

    save_checkpoint(work / "trained", 1, engine.model, meta={"dtype": dtype, "model_kind": "policy"})
    save_hf_metadata(work / "trained", hf_config, hf_dir)
    convert_megatron_to_hf(work / "trained", work / "export", progress=False)
    return work / "export"


def generate(backend: str, model_dir: Path, max_tokens: int, **options) -> dict:
    """Greedy tokens from `model_dir` through `make_sampler(backend, ...)`."""
    from stepwise.sampling import SamplingParams, make_sampler

    began = time.perf_counter()
    with make_sampler(backend, model_dir, **options) as sampler:
        [[completion]] = sampler.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return {"token_ids": completion.token_ids, "finish_reason": completion.finish_reason,
            "seconds": time.perf_counter() - began}


def train_runs(fields: dict, args, context: dict, report: dict):
    """Fill report["runs"]; returns (name, engine) of the last run that trained (None if none did)."""
    last = None
    for name, impl, fp8 in RUNS:
        if impl == "te" and not torch.cuda.is_available():
            report["runs"][name] = SKIPPED
            continue
        outcome = guarded(lambda: run_engine(impl, fp8, fields, context["work"] / "converted", args, context))
        report["runs"][name], engine = outcome if isinstance(outcome, tuple) else (outcome, None)
        if engine is not None:
            last = (name, engine)  # the one before is let go
        del engine
        release()
    return last


def reference_step(fields: dict, args, context: dict) -> dict:
    """Throughput of the transformers + SDPA step (one warm-up step, then `args.steps` timed)."""
    step = transformers_step(fields, args.rows, args.seq, getattr(torch, context["dtype"]))
    step()
    return throughput(timed(step, args.steps), args, context["arch"], context["peak"])


def over_reference(run, reference):
    """tokens/s of an engine run over the transformers step's, or why there is no ratio."""
    if isinstance(run, str):
        return run
    if not isinstance(reference, dict):
        return reference
    return run["tokens_per_s"] / reference["tokens_per_s"]


def loss_gap(runs: dict, first: str, second: str):
    """|step-0 loss of `first` - that of `second`|, or why there is none."""
    for name in (first, second):
        if isinstance(runs[name], str):
            return runs[name]
    return abs(runs[first]["loss_step0"] - runs[second]["loss_step0"])


def generation(exported, args, dtype: str) -> dict:
    cuda = torch.cuda.is_available()
    if not isinstance(exported, Path):
        return {"hf": exported, "vllm": exported if cuda else SKIPPED}
    hf = guarded(lambda: generate("hf", exported, args.max_tokens, device="cuda" if cuda else "cpu", dtype=dtype))
    release()
    return {"hf": hf, "vllm": guarded(lambda: generate("vllm", exported, args.max_tokens)) if cuda else SKIPPED}


def check(args) -> dict:
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
    from stepwise.models.flops import bf16_peak_flops
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.parallel.runtime import shutdown

    began, cuda = time.perf_counter(), torch.cuda.is_available()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    dtype = "bfloat16" if cuda else "float32"
    fields = model_fields(args)
    arch = arch_from_hf_dict(fields)
    hf_config = write_random_hf(fields, work / "hf", dtype, "cuda" if cuda else "cpu")
    convert_hf_to_megatron(work / "hf", work / "converted", progress=False)
    context = {"work": work, "dtype": dtype, "arch": arch, "peak": bf16_peak_flops(device_name()) if cuda else None,
               "plan_gib": plan_gib(arch, args.rows, args.seq, dtype)}
    report = {"gpu_check": "gpu" if cuda else "dry-run", "device": device_name(), "dtype": dtype,
              "shape": {k: fields[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads")},
              "rows": args.rows, "seq": args.seq, "timed_steps": args.steps, "runs": {}}
    last = train_runs(fields, args, context, report)
    exported = guarded(lambda: export(last[1], work / "hf", hf_config, work, dtype)) if last else "error: no run trained"
    report["export"] = {"from": last[0] if last else None, "dir": str(exported)}
    last = None
    release()
    report["transformers_sdpa"] = guarded(lambda: reference_step(fields, args, context))
    release()
    report["engine_over_transformers"] = {name: over_reference(run, report["transformers_sdpa"])
                                          for name, run in report["runs"].items()}
    report["loss_gaps"] = {f"{a}-{b}": loss_gap(report["runs"], a, b) for a, b in (("te_bf16", "local"),
                                                                                  ("te_fp8", "te_bf16"))}
    shutdown()  # megatron's groups and the process group go before the samplers (vLLM starts its own)
    report["generation"] = generation(exported, args, dtype)
    report["seconds"] = time.perf_counter() - began
    return report


def errors(value) -> list[str]:
    """Every error string in the report."""
    if isinstance(value, dict):
        return [e for v in value.values() for e in errors(v)]
    return [value] if isinstance(value, str) and value.startswith("error") else []


def json_safe(value):
    """`value` with non-finite floats written as strings (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def main(argv=None) -> int:
    args = parse_args(argv)
    report = check(args)
    print(json.dumps(json_safe(report), allow_nan=False))
    return 1 if errors(report) else 0


if __name__ == "__main__":
    sys.exit(main())
