"""Worker: chunked log-probs (logits form and hidden-state form) against the full form, at TP = world size;
the hidden form's weight gradient into a megatron-DDP-style fp32 `main_grad` (once, with the dummy
gradient megatron's contract returns).

    python -m torch.distributed.run --nproc-per-node=N _logprobs_worker.py

Every rank builds the same random fp32 logits / hidden states / weight (real vocabulary 37, padded to 40
so the last shard holds padded columns), takes its vocabulary shard and checks values and gradients
within 1e-6 relative of `full_token_logprobs` (megatron's vocab-parallel cross-entropy); raises if not.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from stepwise.parallel.runtime import init_parallel
from stepwise.train.logprobs import full_token_logprobs, hidden_token_logprobs, linear_token_logprobs, token_logprobs

REAL_VOCAB, PADDED_VOCAB, ROWS, LENGTH, HIDDEN = 37, 40, 3, 7, 16
TOLERANCE = 1e-6  # relative to the largest magnitude compared


def close(name: str, observed: torch.Tensor, expected: torch.Tensor) -> None:
    error = (observed - expected).abs().max().item()
    scale = expected.abs().max().item()
    if not error <= TOLERANCE * scale:
        raise AssertionError(f"{name}: max error {error:.3g} > {TOLERANCE} x {scale:.3g}")


def shard(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return tensor.chunk(tp, dim=0 if tensor.dim() == 2 else -1)[rank].detach().clone().requires_grad_(True)


def check_logits_form(tp: int, rank: int, generator: torch.Generator) -> None:
    logits = torch.randn(ROWS, LENGTH, PADDED_VOCAB, generator=generator) * 4
    labels = torch.randint(0, REAL_VOCAB, (ROWS, LENGTH), generator=generator)
    positions = torch.rand(ROWS, LENGTH, generator=generator) > 0.4
    grad_out = torch.randn(ROWS, LENGTH, generator=generator)
    full_input, chunked_input = shard(logits, tp, rank), shard(logits, tp, rank)
    full = full_token_logprobs(full_input, labels, REAL_VOCAB)
    (full * grad_out * positions).sum().backward()
    for chunk in (1, 4, 1000):
        chunked_input.grad = None
        chunked = token_logprobs(chunked_input, labels, REAL_VOCAB, positions=positions, chunk=chunk)
        (chunked * grad_out).sum().backward()
        close(f"log-probs, chunk {chunk}", chunked[positions], full[positions])
        if not bool((chunked[~positions] == 0).all()):
            raise AssertionError("positions outside `positions` must be 0.0")
        close(f"logits gradient, chunk {chunk}", chunked_input.grad, full_input.grad)
    everywhere = token_logprobs(chunked_input.detach(), labels, REAL_VOCAB, chunk=5)
    close("log-probs at every position", everywhere, full.detach())


def check_hidden_form(tp: int, rank: int, generator: torch.Generator) -> None:
    hidden = torch.randn(ROWS * LENGTH, HIDDEN, generator=generator)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, REAL_VOCAB, (ROWS * LENGTH,), generator=generator)
    grad_out = torch.randn(ROWS * LENGTH, generator=generator)
    full_hidden, full_weight = hidden.clone().requires_grad_(True), shard(weight, tp, rank)
    full = full_token_logprobs(full_hidden @ full_weight.t(), labels, REAL_VOCAB)
    (full * grad_out).sum().backward()
    if tp > 1:  # what ColumnParallelLinear's input region does in backward
        dist.all_reduce(full_hidden.grad)
    for chunk in (6, ROWS * LENGTH):  # several chunks (recomputed in backward), one (kept for backward)
        chunked_hidden, chunked_weight = hidden.clone().requires_grad_(True), shard(weight, tp, rank)
        chunked = linear_token_logprobs(chunked_hidden, chunked_weight, labels, REAL_VOCAB, chunk=chunk)
        (chunked * grad_out).sum().backward()
        close(f"hidden-form log-probs, chunk {chunk}", chunked, full)
        close(f"hidden gradient, chunk {chunk}", chunked_hidden.grad, full_hidden.grad)
        close(f"weight gradient, chunk {chunk}", chunked_weight.grad, full_weight.grad)


def check_hidden_positions_and_main_grad(tp: int, rank: int, generator: torch.Generator) -> None:
    """`hidden_token_logprobs` at a packed row's positions ([actions, S] mask over one row of labels)
    equals the full form there; its weight gradient lands in `main_grad` (fp32, holding an earlier
    micro-batch's gradient) exactly once: with DDP's flag a dummy is returned (zeros under
    `zero_out_wgrad`, as DDP's hook then adds it), without the flag no gradient at all. Once with some
    positions read, once with every one (the form that skips the gather)."""
    some = torch.rand(ROWS, LENGTH, generator=generator) > 0.6
    for mask in (some, torch.ones(ROWS, LENGTH, dtype=torch.bool)):
        _check_positions(tp, rank, generator, mask)


def _check_positions(tp: int, rank: int, generator: torch.Generator, mask: torch.Tensor) -> None:
    hidden = torch.randn(1, LENGTH, HIDDEN, generator=generator)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, REAL_VOCAB, (1, LENGTH), generator=generator)
    read = mask.any(dim=0, keepdim=True)
    grad_out = torch.randn(1, LENGTH, generator=generator)
    full_hidden, full_weight = hidden.clone().requires_grad_(True), shard(weight, tp, rank)
    full = full_token_logprobs(full_hidden @ full_weight.t(), labels, REAL_VOCAB)
    (full * grad_out * read).sum().backward()
    if tp > 1:
        dist.all_reduce(full_hidden.grad)
    earlier = torch.randn(full_weight.shape, generator=generator)
    for flags in ({}, {"grad_added_to_main_grad": False}, {"grad_added_to_main_grad": False, "zero_out_wgrad": True}):
        chunked_hidden, chunked_weight = hidden.clone().requires_grad_(True), shard(weight, tp, rank)
        chunked_weight.main_grad = earlier.clone()
        for name, value in flags.items():
            setattr(chunked_weight, name, value)
        chunked = hidden_token_logprobs(chunked_hidden, chunked_weight, labels, REAL_VOCAB, positions=mask, chunk=2)
        (chunked * grad_out).sum().backward()
        close("hidden-form log-probs at the read positions", chunked[read], full[read])
        if not bool((chunked[~read] == 0).all()):
            raise AssertionError("positions nobody reads must be 0.0")
        close(f"hidden gradient, flags {flags}", chunked_hidden.grad, full_hidden.grad)
        close(f"main_grad after the weight gradient, flags {flags}", chunked_weight.main_grad, earlier + full_weight.grad)
        if not flags:
            if chunked_weight.grad is not None:
                raise AssertionError("without DDP's flag the weight gets no gradient besides main_grad")
            continue
        if chunked_weight.grad_added_to_main_grad is not True or chunked_weight.grad.shape != chunked_weight.shape:
            raise AssertionError(f"flags {flags}: grad_added_to_main_grad not set or no dummy gradient")
        if flags.get("zero_out_wgrad") and bool(chunked_weight.grad.any()):
            raise AssertionError("under zero_out_wgrad the dummy gradient must be zeros")


def main() -> None:
    torch.set_default_dtype(torch.float32)
    layout = init_parallel(tp=int(__import__("os").environ.get("WORLD_SIZE", "1")), pp=1, seed=0)
    generator = torch.Generator().manual_seed(7)
    check_logits_form(layout.tp, layout.tp_rank, generator)
    check_hidden_form(layout.tp, layout.tp_rank, generator)
    check_hidden_positions_and_main_grad(layout.tp, layout.tp_rank, generator)
    print(f"rank {layout.rank}: chunked log-probs match the full form at TP {layout.tp}")


if __name__ == "__main__":
    main()
