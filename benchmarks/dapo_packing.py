"""Skywork DAPO policy and advantage stages, shared-prefix packed vs one row per (state, action) padded
to the batch maximum, on a synthetic data set shaped like the paper's: solutions x steps states, each
with up to 16 unique actions, a prompt of ~300 tokens and steps of ~60.

Policy stage: same model, same samples, same global batches, one process, alternating rounds; tokens
per epoch (computed: rows x padded length; and real: without padding) and the step time.
Advantage stage: its two forward-only scorings of the whole set (`score.score_records`, micro-batches
of `--micro-batch` records as `score_micro_batch_size` sets them): (a) the critic's value of every
next state (state + action), one branched record per state vs one record per next state; (b) pi_ref's
summed log-prob of every action, prefix-packed rows vs one row per action. Each form is scored in a
fresh process (the same seeded random model in each), the forms alternating for `--advantage-rounds`
rounds: the computed tokens, the scoring's seconds, and its peak memory: the growth of the RSS
high-water mark (VmHWM, reset through /proc/self/clear_refs as the scoring starts; Linux) above the
process's memory once model and data are built. Packed and unpacked scores are checked to agree.
Ends with one JSON line.

    python benchmarks/dapo_packing.py [--solutions 6 --steps 12 --actions 16 --prompt 300 --step 60]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from functools import cache, partial

warnings.filterwarnings("ignore")


def synthetic_records(args) -> list[dict]:
    """Token records: per solution, state t = prompt + its first t steps; 1..`actions` unique next
    steps of `step` +-25% tokens each, random advantages and reference log-probs."""
    rng = random.Random(0)
    token = lambda: rng.randrange(3, args.vocab)  # noqa: E731
    prompt = [token() for _ in range(args.prompt)]
    records = []
    for solution in range(args.solutions):
        steps = [[token() for _ in range(rng.randint(3 * args.step // 4, 5 * args.step // 4))] for _ in range(args.steps)]
        for t in range(args.steps):
            state = prompt + [i for s in steps[:t] for i in s]
            for _ in range(rng.randint(max(1, args.actions // 4), args.actions)):
                action = [token() for _ in range(rng.randint(3 * args.step // 4, 5 * args.step // 4))]
                records.append({"ids": state + action, "mask": [0] * len(state) + [1] * len(action),
                                "state": f"{solution}/{t}", "advantage": rng.gauss(0, 0.05), "ref_logp": -rng.random() * 50})
    return records


def epoch_tokens(batches, order) -> tuple[int, int]:
    """(computed, real) tokens of one epoch: every micro-batch's rows x length, and `batches.tokens`."""
    computed = real = 0
    for _ in range(order.steps_per_epoch):
        indices = order.next_global_batch()
        computed += sum(m["input_ids"].numel() for m in batches.micro_batches(indices, 0, 1))
        real += batches.tokens(indices)
    return computed, real


@cache
def single_process_layout():
    """TP 1, PP 1 in this process (initialised once, however many engines are built)."""
    from stepwise.parallel.runtime import init_parallel

    return init_parallel(1, 1, seed=0)


def model_arch(args):
    """The tiny qwen2 model of `args.vocab`, `args.hidden`, `args.layers`."""
    from stepwise.models.hf_config import arch_from_hf_dict

    return arch_from_hf_dict(dict(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                                  num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=4 * args.hidden, max_position_embeddings=args.max_seq_len))


def alternating_step_seconds(args, loss: str, forms: dict, kind: str = "policy",
                             options: dict | None = None) -> dict[str, list[float]]:
    """Seconds of `args.rounds` optimizer steps of `loss` per form of `forms` (name -> batch builder) on a
    tiny qwen2 model (`args.vocab`, `args.hidden`, `args.layers`), the same global batch alternately in
    each form after an untimed one in each, so both share whatever else loads the machine."""
    from stepwise import losses
    from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
    from stepwise.train.engine import build_engine

    layout = single_process_layout()
    train = TrainConfig(loss=loss, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch)
    engine = build_engine(model_arch(args), ModelConfig(max_seq_len=args.max_seq_len), ParallelConfig(), train, layout,
                          1000, kind=kind)
    plugin = losses.get(loss)
    loss_fn = partial(plugin.compute, plugin.parse_options(options or {}))
    order = next(iter(forms.values())).make_order(args.global_batch, seed=0)
    steps = [order.next_global_batch() for _ in range(min(args.rounds, order.steps_per_epoch))]
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for batches in forms.values():  # a first step in each form, untimed (allocations, optimizer state)
        engine.train_step(batches.micro_batches(steps[0], 0, 1), loss_fn)
    for indices in steps:  # the same global batch, alternately in both forms
        for name, batches in forms.items():
            began = time.perf_counter()
            engine.train_step(batches.micro_batches(indices, 0, 1), loss_fn)
            seconds[name].append(time.perf_counter() - began)
    return seconds


SCORING_FORMS = ("critic/unpacked", "critic/packed", "policy/unpacked", "policy/packed")


def scoring_batches(args, records: list[dict], kind: str, packed: bool):
    """The batch builder the advantage stage scores: `critic`, the next states (`dapo_train.write_next_states`);
    `policy`, the actions (`skywork_dapo`'s records, as `kept.jsonl` holds them)."""
    from stepwise.train.action_data import ActionBatches
    from stepwise.train.value_data import ValueBatches, branched_record, state_record, tokenize_states

    if kind == "policy":
        return ActionBatches(records, 0, args.max_seq_len, args.micro_batch, pack=packed)
    next_states: dict[str, list[list[int]]] = {}
    for record in records:
        next_states.setdefault(record["state"], []).append(record["ids"])
    values = ([branched_record(group) for group in next_states.values()] if packed
              else [state_record(ids) for group in next_states.values() for ids in group])
    return ValueBatches(tokenize_states(values, None, args.max_seq_len), 0, args.max_seq_len, args.micro_batch)


def rss_high_water(reset: bool = False) -> int:
    """This process's peak resident memory in bytes (VmHWM), first reset to the current RSS if `reset`."""
    if reset:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def measure_scoring(args) -> dict:
    """(In a fresh process.) Score the whole set in form `args.measure` ("kind/packed|unpacked") on a
    seeded random model: {"tokens" computed, "seconds", "peak_bytes" (above the memory before),
    "scores" (one per next state or action, in record order)}."""
    from logprobs_memory import current_rss
    from stepwise.config.schema import ModelConfig, ParallelConfig
    from stepwise.models.builder import build_gpt_model
    from stepwise.models.critic import build_critic_model
    from stepwise.train.engine import engine_options
    from stepwise.train.score import score_records

    kind, form = args.measure.split("/")
    layout = single_process_layout()
    options = engine_options(ModelConfig(max_seq_len=args.max_seq_len), ParallelConfig(), scoring=True)
    model = (build_critic_model(model_arch(args), options, args.max_seq_len) if kind == "critic"
             else build_gpt_model(model_arch(args), options, args.max_seq_len, hidden_output=True))
    model.eval()
    batches = scoring_batches(args, synthetic_records(args), kind, form == "packed")
    indices = list(range(len(batches.sequences)))
    tokens = sum(m["input_ids"].numel() for start in range(0, len(indices), args.micro_batch)
                 for m in batches.micro_batches(indices[start : start + args.micro_batch], 0, 1))
    before, _ = current_rss(), rss_high_water(reset=True)
    began = time.perf_counter()
    scores = score_records(model, batches, indices, kind, args.vocab, layout.device)
    seconds = time.perf_counter() - began
    return {"tokens": tokens, "seconds": seconds, "scores": [v for row in scores for v in row],
            "peak_bytes": rss_high_water() - before}


def alternating_scoring(args) -> dict[str, list[dict]]:
    """`measure_scoring` of each form of SCORING_FORMS in its own process, the forms alternating for
    `args.advantage_rounds` rounds."""
    shape = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if isinstance(value, int)]
    runs: dict[str, list[dict]] = {form: [] for form in SCORING_FORMS}
    for _ in range(args.advantage_rounds):
        for form in SCORING_FORMS:
            result = subprocess.run([sys.executable, __file__, *shape, "--measure", form],
                                    capture_output=True, text=True, check=True)
            runs[form].append(json.loads(result.stdout.strip().splitlines()[-1]))
    return runs


def advantage_figures(runs: dict[str, list[dict]]) -> dict:
    """Printed per form; returned: the advantage stage's packed / unpacked ratios (both scorings
    together for tokens and time, per scoring for peak memory) and the largest score differences."""
    mean = {form: statistics.mean(r["seconds"] for r in rs) for form, rs in runs.items()}
    peak = {form: max(r["peak_bytes"] for r in rs) for form, rs in runs.items()}  # the largest of the rounds
    tokens = {form: rs[0]["tokens"] for form, rs in runs.items()}
    for form, rs in runs.items():
        rounds = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"{form:15s} tokens computed {tokens[form]:>10,}  scoring {mean[form]:.2f} s (rounds: {rounds})  "
              f"peak {peak[form] / 2**20:.1f} MiB")
    total = lambda of, form: sum(of[f"{kind}/{form}"] for kind in ("critic", "policy"))  # noqa: E731
    figures = {"advantage_tokens_ratio": round(total(tokens, "packed") / total(tokens, "unpacked"), 4),
               "advantage_time_ratio": round(total(mean, "packed") / total(mean, "unpacked"), 4),
               "advantage_unpacked_s": round(total(mean, "unpacked"), 3), "advantage_packed_s": round(total(mean, "packed"), 3)}
    for kind in ("critic", "policy"):
        packed, unpacked = runs[f"{kind}/packed"][0]["scores"], runs[f"{kind}/unpacked"][0]["scores"]
        if len(packed) != len(unpacked):
            raise SystemExit(f"{kind}: {len(packed)} packed scores, {len(unpacked)} unpacked")
        figures[f"{kind}_max_score_diff"] = max(abs(a - b) for a, b in zip(packed, unpacked))
        figures[f"{kind}_max_abs_score"] = max(abs(a) for a in unpacked)
        figures[f"{kind}_peak_mib"] = {form: round(peak[f"{kind}/{form}"] / 2**20, 1) for form in ("unpacked", "packed")}
        figures[f"{kind}_peak_ratio"] = round(peak[f"{kind}/packed"] / peak[f"{kind}/unpacked"], 4)
    print(f"max |packed - unpacked|: values {figures['critic_max_score_diff']:.3g}, log-probs "
          f"{figures['policy_max_score_diff']:.3g} (largest |log-prob| {figures['policy_max_abs_score']:.1f})")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("solutions", 6), ("steps", 12), ("actions", 16), ("prompt", 300), ("step", 60),
                          ("vocab", 512), ("hidden", 128), ("layers", 2), ("global_batch", 32), ("micro_batch", 4),
                          ("max_seq_len", 2048), ("rounds", 2), ("advantage_rounds", 2)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--measure", choices=SCORING_FORMS, help="(internal) score one form in this process")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_scoring(args)))
        return

    from stepwise.train.action_data import ActionBatches

    records = synthetic_records(args)
    forms = {name: ActionBatches(records, 0, args.max_seq_len, args.micro_batch, pack=name == "packed")
             for name in ("unpacked", "packed")}
    tokens = {name: epoch_tokens(b, b.make_order(args.global_batch, seed=0)) for name, b in forms.items()}
    seconds = alternating_step_seconds(args, "skywork_dapo", forms)
    for name in forms:
        print(f"{name:9s} tokens/epoch computed {tokens[name][0]:>10,} real {tokens[name][1]:>10,}  "
              f"step {statistics.mean(seconds[name]):.2f} s (steps: {', '.join(f'{s:.2f}' for s in seconds[name])})")
    advantage = advantage_figures(alternating_scoring(args))
    ratio = lambda key, at: at(key["packed"]) / at(key["unpacked"])  # noqa: E731
    print(json.dumps({
        "records": len(records), "states": len({r["state"] for r in records}), "global_batch": args.global_batch,
        "tokens_ratio": round(ratio(tokens, lambda t: t[0]), 4), "real_tokens_ratio": round(ratio(tokens, lambda t: t[1]), 4),
        "step_time_ratio": round(ratio(seconds, statistics.mean), 4),
        "unpacked_step_s": round(statistics.mean(seconds["unpacked"]), 3),
        "packed_step_s": round(statistics.mean(seconds["packed"]), 3), **advantage}))


if __name__ == "__main__":
    main()
