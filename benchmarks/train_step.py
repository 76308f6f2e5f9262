"""Tokens/s of one SFT step: the stepwise megatron engine vs a plain transformers training step.

Same Qwen2 shape, batch, dtype and optimizer (Adam, grad clipping) in one process, measured in
alternating rounds (which goes first alternates too) so machine noise hits both alike. Prints both rates
and engine/transformers: the median over rounds of each round's ratio (a ratio of neighbours in time, so
slow drifts of the machine cancel), with its quartiles.
With `--cpu-time` both run on one thread and are timed by the process's CPU time, which other work on
a shared machine disturbs far less than wall-clock time (a few-percent difference needs it).

With `--prompt N` the first N positions of each row are a prompt the loss does not read, as in SFT data:
the engine then computes log-probs only at the response positions, transformers (as TRL does) logits
at every position and a cross-entropy that ignores the prompt's.

    python benchmarks/train_step.py [--hidden 256 --layers 4 --seq 128 --batch 16 --rounds 12 --steps 2]
                                    [--cpu-time] [--prompt 0]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from functools import partial

import torch

warnings.filterwarnings("ignore")


def shape(args) -> dict:
    return dict(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=4 * args.hidden,
                max_position_embeddings=args.seq * 2, tie_word_embeddings=False)


def random_batch(vocab: int, rows: int, seq: int, device, prompt: int = 0) -> dict:
    """A seeded next-token batch of `rows` x `seq` random tokens, every position after the first `prompt`
    a target."""
    if not 0 <= prompt < seq:
        raise ValueError(f"--prompt must be in [0, seq), got {prompt} for seq {seq}")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=generator)
    loss_mask = torch.ones(rows, seq, device=device)
    loss_mask[:, :prompt] = 0.0
    return {
        "input_ids": ids[:, :-1].contiguous().to(device),
        "labels": ids[:, 1:].contiguous().to(device),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(rows, -1).contiguous(),
        "normalizer": torch.tensor(float(rows * (seq - prompt)), device=device),
    }


def engine_step(fields: dict, model_config, rows: int, seq: int, init=None, prompt: int = 0):
    """(engine, one SFT step on a fixed random batch) for HF config `fields`, built as `model_config`
    (a ModelConfig) says; `init` is a checkpoint to start from (random init without)."""
    from stepwise import losses
    from stepwise.checkpoint.state import load_checkpoint
    from stepwise.config.schema import ParallelConfig, TrainConfig
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.parallel.runtime import init_parallel
    from stepwise.train.engine import build_engine

    layout = init_parallel(1, 1, seed=0)
    train = TrainConfig(global_batch_size=rows, micro_batch_size=rows)
    engine = build_engine(arch_from_hf_dict(fields), model_config, ParallelConfig(), train, layout, total_steps=1000)
    if init is not None:
        load_checkpoint(init, engine.model)
        engine.optimizer.reload_model_params()
    plugin = losses.get("sft")
    loss_fn = partial(plugin.compute, plugin.parse_options({}))
    data = [random_batch(fields["vocab_size"], rows, seq, layout.device, prompt)]
    return engine, lambda: engine.train_step(data, loss_fn)


def transformers_step(fields: dict, rows: int, seq: int, dtype: torch.dtype, prompt: int = 0):
    """One plain transformers (SDPA attention) training step of the same shape: AdamW and clipping with
    the engine's optimizer settings (the `OptimConfig` defaults the engine is built with), AdamW in
    torch's fused kernel as transformers' Trainer runs it (its default optimizer with torch >= 2.8)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepwise.config.schema import OptimConfig
    from stepwise.parallel.cpu_shim import step_scope

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    optim = OptimConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                  eps=optim.adam_eps, weight_decay=optim.weight_decay, fused=True)
    data = random_batch(config.vocab_size, rows, seq, device, prompt)
    labels = data["labels"].masked_fill(data["loss_mask"] == 0, -100)  # cross_entropy's ignore_index

    def step():
        with step_scope():  # outside the engine's CPU shim (its torch-function mode), as a transformers run is
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=data["input_ids"], position_ids=data["position_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
            optimizer.step()

    return step


def timed(step, steps: int, clock=time.perf_counter) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = clock()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (clock() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("vocab", 1024), ("hidden", 256), ("layers", 4), ("heads", 8), ("kv_heads", 4),
                          ("seq", 128), ("batch", 16), ("rounds", 12), ("steps", 2), ("prompt", 0)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, timed by process CPU time")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the ratio's quartiles need two rounds)")
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    from stepwise.config.schema import ModelConfig

    dtype = "bfloat16" if args.bf16 else "float32"
    engine = engine_step(shape(args), ModelConfig(max_seq_len=args.seq, dtype=dtype), args.batch, args.seq,
                         prompt=args.prompt)[1]
    reference = transformers_step(shape(args), args.batch, args.seq, getattr(torch, dtype), args.prompt)
    engine(), reference()  # warm-up
    engine_times, reference_times = [], []
    for round_number in range(args.rounds):
        for step, times in ((engine, engine_times), (reference, reference_times))[::1 if round_number % 2 else -1]:
            times.append(timed(step, args.steps, clock))
    ratios = [ours / theirs for ours, theirs in zip(engine_times, reference_times)]
    tokens = args.batch * args.seq
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "shape": {k: getattr(args, k)
                  for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "seq", "batch", "prompt")},
        "dtype": "bf16" if args.bf16 else "fp32",
        "clock": "process CPU time" if args.cpu_time else "wall",
        "engine_tokens_per_s": tokens / statistics.median(engine_times),
        "transformers_tokens_per_s": tokens / statistics.median(reference_times),
    }
    result["engine_time_over_transformers_time"] = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    result["ratio_quartiles"] = [quartiles[0], quartiles[2]]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
