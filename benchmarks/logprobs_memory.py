"""Peak memory of the log-prob computation (forward + backward): full fp32 logits vs chunked.

From hidden states [tokens, hidden] and an output-layer weight [vocab, hidden] (bf16 by default, as in
training) to the log-probs of the label tokens and the gradients of hidden and weight, three ways:
- `full`: bf16 logits, their fp32 copy, a masked copy, megatron's vocab-parallel cross-entropy (the
  straightforward form: what stepwise did before, and what TRL / OpenRLHF / verl do);
- `chunked_logits`: the same bf16 logits, log-softmax a chunk of positions at a time (the engine's form
  before the model handed back hidden states);
- `chunked_hidden`: only one chunk of logits ever exists (`linear_token_logprobs`: the engine's and the
  scorer's form now, `stepwise.models.hidden_output`).
The weight carries megatron DDP's fp32 `main_grad` buffer, as in training; it exists before and after
the step, so it is counted as an input for every variant alike: `full` and `chunked_logits` produce a
bf16 weight gradient that DDP's hook then adds into it (done here the same way, inside the measured
span), `chunked_hidden` adds its gradient into it chunk by chunk and returns megatron's dummy gradient.
Each variant runs in a fresh subprocess; its peak is the growth of the process's memory above what the
inputs already hold (CUDA: max_memory_allocated; CPU: the RSS high-water mark, ru_maxrss; an allocation
never written to, like the dummy gradient `torch.empty` gives, takes no RSS but does count on CUDA).
Prints one JSON line; `memory_ratio` is chunked_hidden over full.

    python benchmarks/logprobs_memory.py [--tokens 4096 --vocab 152064 --hidden 256 --fp32]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

VARIANTS = ("full", "chunked_logits", "chunked_hidden")


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ddp_grad_hook(weight: torch.Tensor) -> None:
    """What megatron DDP's backward hook does with the weight's gradient (distributed_data_parallel.py)."""
    if weight.grad is not None and not weight.grad_added_to_main_grad:
        weight.main_grad.add_(weight.grad)
    weight.grad = None


def run_variant(args) -> int:
    """Peak bytes the log-prob computation of `args.variant` adds above its inputs."""
    from stepwise.parallel.runtime import init_parallel
    from stepwise.train.logprobs import full_token_logprobs, linear_token_logprobs, token_logprobs

    init_parallel(1, 1, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden ** 0.5).to(device, dtype)
    weight.requires_grad_(True)
    weight.main_grad = torch.empty(weight.shape, dtype=torch.float32, device=device).fill_(0.0)  # resident
    weight.grad_added_to_main_grad = False
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    real_vocab = args.vocab - 64  # some padded columns, as a TP-padded vocabulary has
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before, high_water_before = current_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.variant == "chunked_hidden":
        logprobs = linear_token_logprobs(hidden, weight, labels, real_vocab)
    else:
        logits = hidden @ weight.t()
        if args.variant == "full":
            logprobs = full_token_logprobs(logits.unsqueeze(0), labels.unsqueeze(0), real_vocab)
        else:
            logprobs = token_logprobs(logits.unsqueeze(0), labels.unsqueeze(0), real_vocab)
    logprobs.sum().backward()
    ddp_grad_hook(weight)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if high_water <= high_water_before:
        raise SystemExit(f"{args.variant}: the computation stayed below the start-up high-water mark; use more --tokens")
    return high_water - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--fp32", action="store_true", help="fp32 hidden/weight/logits instead of bf16")
    parser.add_argument("--variant", choices=VARIANTS, help="(internal) measure one variant in this process")
    args = parser.parse_args()
    if args.variant:
        print(run_variant(args))
        return
    peaks = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden)] + (["--fp32"] if args.fp32 else [])
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[variant] = int(result.stdout.strip().splitlines()[-1])
    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": "fp32" if args.fp32 else "bf16",
        **{f"{variant}_peak_mib": round(peak / 2**20, 1) for variant, peak in peaks.items()},
        "chunked_logits_ratio": round(peaks["chunked_logits"] / peaks["full"], 4),
        "memory_ratio": round(peaks["chunked_hidden"] / peaks["full"], 4),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
