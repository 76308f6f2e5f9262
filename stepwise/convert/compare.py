"""Logits parity between an HF model and a megatron checkpoint at any TP/PP.

    python conversion/compare.py --hf DIR --megatron DIR [--tp N --pp N] [--prompt TEXT]

prints JSON with `max_abs_logit_diff`, `mean_abs_logit_diff`, `top1_agreement`, the number of
positions compared and the seconds taken. It always re-launches itself under torchrun (TP x PP
processes), so the megatron run never shares a process with transformers; the megatron logits are
gathered across TP and taken from the last pipeline stage. Works for every family in
`stepwise.models.hf_config.FAMILIES`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def megatron_logits(ckpt_dir: str | Path, input_ids: torch.Tensor, tp: int = 1, pp: int = 1, dtype: str | None = None,
                    transformer_impl: str = "local"):
    """Logits [B, S, vocab] (real vocabulary, as fp32) on the logging rank (last stage, TP rank 0); None elsewhere.

    Collective: every rank of a TP x PP world calls it. `dtype` defaults to the checkpoint's own;
    `transformer_impl` "te" builds Transformer Engine's layer spec (a CUDA GPU with TE).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from stepwise.checkpoint import layout as ckpt_layout
    from stepwise.checkpoint.state import load_checkpoint
    from stepwise.convert.megatron_to_hf import saved_dtype
    from stepwise.models.builder import EngineOptions, build_gpt_model
    from stepwise.models.hf_config import arch_from_hf, load_hf_config
    from stepwise.parallel.runtime import init_parallel

    layout = init_parallel(tp, pp)
    hf_meta = ckpt_layout.hf_metadata_dir(ckpt_dir)
    arch = arch_from_hf(hf_meta)
    dtype = dtype or saved_dtype(ckpt_layout.read_meta(ckpt_layout.resolve(ckpt_dir)), load_hf_config(hf_meta))
    model = build_gpt_model(arch, EngineOptions(tp=tp, pp=pp, dtype=dtype, transformer_impl=transformer_impl))
    load_checkpoint(ckpt_dir, model)
    model.eval()
    batch, seq = input_ids.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    stash = []

    def forward_step(data_iterator, model_chunk):
        output = model_chunk(input_ids.to(layout.device), positions.to(layout.device), None)

        def keep(logits):
            stash.append(gather_from_tensor_model_parallel_region(logits).float())
            return torch.zeros(()), torch.ones((), dtype=torch.int), {}

        return output, keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True)
    if not layout.is_logging_rank:
        return None
    return stash[0][..., : arch.vocab_size].cpu()


def hf_logits(hf_dir: str | Path, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' logits [B, S, vocab] (as fp32) of the model in `hf_dir`, run in `dtype`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """max / mean absolute logit difference and the fraction of positions with the same argmax, with
    the reference's scale (largest |logit|) and sequence length, which a tolerance is relative to."""
    diff = (reference - candidate).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
            "max_abs_logit": reference.abs().max().item(), "tokens": reference.shape[-2]}


def _input_ids(hf_dir: str, prompt: str | None, vocab_size: int) -> torch.Tensor:
    if prompt:
        from stepwise.tasks.tokenizer import load_tokenizer

        return torch.tensor([load_tokenizer(hf_dir)(prompt, add_special_tokens=False)["input_ids"]])
    return torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HF vs megatron logits parity")
    parser.add_argument("--hf", required=True)
    parser.add_argument("--megatron", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--logits-out", default=None, help=argparse.SUPPRESS)  # used by the torchrun re-launch
    args = parser.parse_args(argv)
    from stepwise.models.hf_config import arch_from_hf

    ids = _input_ids(args.hf, args.prompt, arch_from_hf(args.hf).vocab_size)
    if args.logits_out:  # inside torchrun
        logits = megatron_logits(args.megatron, ids, args.tp, args.pp)
        if logits is not None:
            torch.save(logits, args.logits_out)
        return 0
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.pt"
        forwarded = sys.argv[1:] if argv is None else list(argv)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp * args.pp}",
                   "-m", "stepwise.convert.compare", *forwarded, "--logits-out", str(out)]
        subprocess.run(command, check=True)
        print(f"megatron logits at TP={args.tp} PP={args.pp} done; running transformers", file=sys.stderr)
        summary = parity(hf_logits(args.hf, ids), torch.load(out))
        summary.update(positions=int(ids.numel()), seconds=round(time.perf_counter() - began, 2))
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
