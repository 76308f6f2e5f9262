"""Forward-only scoring at any TP/PP/DP, one process per GPU (launched like the training workers).

    python -m stepwise.train.score --recipe R.yaml --ckpt CKPT --kind critic|policy|tokens --data D.jsonl [D2.jsonl ...] \
        --tokenizer DIR --out DIR [DIR2 ...]

Several data files are scored one after the other by the same loaded model (one launch, one checkpoint
load), each into its own OUT directory.

`critic`: `values` records (as for critic training, solutions or branched; `mc` only sizes the
output) -> `values`: sigmoid(head) at the end of each state, or of each branch. `policy`: action records (as for
`skywork_dapo`) -> `logp`: log pi(action | state), summed over the action's tokens. `tokens`: records
`{"prompt", "response", "token_ids" (optional)}` -> `logprobs`: log pi of each response token, eos
included, tokenized exactly as the `trajectory` builder does (so the list can be a trajectory's
`ref_logp` / `behaviour_logp` as is, and its sum is the `pair` / `labelled` builders' sequence log-prob
of prompt + response + eos). Each DP group
scores a contiguous slice in one forward-only pipeline schedule of many micro-batches (`score_records`)
and writes `OUT/part_<dp>.jsonl` (`{"index", ...}`); `read_scores` merges.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch


def as_trajectories(records: list[dict], tokenizer) -> list[dict]:
    """`tokens` records as `trajectory` records with zero placeholders, one per response token (the
    response's `response_ids` when given, else its tokens and eos, as `trajectory_data` tokenizes them)."""
    out = []
    for record in records:
        ids = record.get("response_ids")
        n = len(ids) if ids is not None else len(tokenizer(record["response"], add_special_tokens=False)["input_ids"]) + 1
        trajectory = {"prompt": record["prompt"], "response": record["response"], "reward": 0.0,
                      "behaviour_logp": [0.0] * n, "ref_logp": [0.0] * n}
        if ids is not None:
            trajectory["response_ids"] = ids
        out.append(trajectory)
    return out


def response_token_values(values: torch.Tensor, loss_mask: torch.Tensor) -> list[list[float]]:
    """Per row of `loss_mask`, the entries of [B, S] `values` at its response positions (position t:
    token t+1); packed rows: one `loss_mask` row per record over the rows laid end to end."""
    from stepwise.train.prefix_packing import flat_rows

    mask = loss_mask.bool()
    values = flat_rows(values, loss_mask).expand(mask.shape)
    return [values[row][mask[row]].tolist() for row in range(mask.shape[0])]


def _score_batches(engine_model, micro_batches, kind: str, vocab: int, device, count: int | None = None,
                  seq_length: int | None = None) -> list[list[float]]:
    """The last stage's outputs of `micro_batches` (`count` of them, any iterable; a list by default) in
    one forward-only pipeline schedule: per row its values (`critic`) or token log-probs (`tokens`),
    per action [summed log-prob] (`policy`); empty on the other stages. Micro-batches may differ in
    length and size: at PP > 1 the stages exchange each activation's shape (megatron's
    variable_seq_lengths), so none is padded to another's length."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from stepwise.parallel.cpu_shim import step_scope
    from stepwise.train.engine import variable_shapes
    from stepwise.train.logprobs import model_token_logprobs
    from stepwise.train.prefix_packing import flat_rows, read_positions

    if count is None:
        micro_batches = list(micro_batches)
        count = len(micro_batches)
        seq_length = seq_length or (micro_batches[0]["input_ids"].shape[1] if micro_batches else 0)
    if count == 0:
        return []
    results: list[list[float]] = []

    def forward_step(data_iterator, model):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        output = model(batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))

        def collect(output):
            if kind == "critic":
                values = torch.sigmoid(output.squeeze(-1).float())
                mask = batch["value_mask"].bool()
                results.extend([values[row][mask[row]].tolist() for row in range(values.shape[0])])
            else:  # log-probs (hidden states or logits, as the model was built) only where the response is read
                mask = batch["loss_mask"]
                logp = model_token_logprobs(model, output, batch["labels"], vocab, read_positions(mask, batch["labels"]))
                if kind == "tokens":
                    results.extend(response_token_values(logp, mask))
                else:
                    results.extend([[v] for v in (flat_rows(logp, mask) * mask).sum(dim=1).tolist()])
            return torch.zeros((), device=device), torch.ones((), dtype=torch.int, device=device), {}

        return output, collect

    with variable_shapes(engine_model), torch.no_grad(), step_scope():  # p2p shapes per micro-batch
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                    model=[engine_model], num_microbatches=count, seq_length=seq_length,
                                    micro_batch_size=1, forward_only=True)
    return results


def score_records(model, batches, indices: list[int], kind: str, vocab: int, device) -> list[list[float]]:
    """The scores of records `indices` of `batches` (a batch builder), one list per record in order, on
    the last stage (empty elsewhere): one forward-only schedule over all of them, so every pipeline
    stage works on its own micro-batch at once. Micro-batches hold `batches.micro_batch_size` records
    (or one packed row) each, padded to their own length, built as the schedule asks for them."""
    size = batches.micro_batch_size
    chunks = [indices[start : start + size] for start in range(0, len(indices), size)]
    counts = [batches.micro_batch_count(chunk) for chunk in chunks]

    def stream():
        for chunk, count in zip(chunks, counts):
            micro = batches.micro_batches(chunk, 0, 1)
            if len(micro) != count:
                raise RuntimeError(f"{type(batches).__name__}.micro_batch_count gave {count} micro-batches for "
                                   f"records {chunk[0]}..{chunk[-1]}, micro_batches {len(micro)}")
            yield from micro

    outputs = _score_batches(model, stream(), kind, vocab, device, sum(counts), batches.max_seq_len)
    if kind != "critic" or not outputs:
        return outputs
    # packed rows hold several records' values (and a record may span rows): regroup them by record
    flat = [value for row in outputs for value in row]
    sizes = [len(batches.sequences[i]["targets"]) for i in indices]
    if len(flat) != sum(sizes):
        raise RuntimeError(f"scoring read {len(flat)} values for records expecting {sum(sizes)}")
    ends = list(itertools.accumulate(sizes))
    return [flat[end - n : end] for end, n in zip(ends, sizes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--recipe", "--ckpt", "--tokenizer"):
        parser.add_argument(name, required=True)
    parser.add_argument("--data", nargs="+", required=True, help="records files (JSONL), scored in turn")
    parser.add_argument("--out", nargs="+", required=True, help="one output directory per --data file")
    parser.add_argument("--kind", choices=["critic", "policy", "tokens"], required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True,
                        help="records per forward (the section's score_micro_batch_size)")
    parser.add_argument("--section", default="policy", help="the train section whose layout the scoring runs at")
    args = parser.parse_args(argv)
    if len(args.data) != len(args.out):
        parser.error(f"{len(args.data)} --data files but {len(args.out)} --out directories")

    from stepwise.checkpoint import layout as ckpt_layout
    from stepwise.checkpoint.state import load_checkpoint
    from stepwise.config.loader import load_resolved
    from stepwise.models.builder import build_gpt_model
    from stepwise.models.critic import build_critic_model
    from stepwise.models.hf_config import arch_from_hf
    from stepwise.parallel.runtime import init_parallel, shutdown
    from stepwise.tasks.tokenizer import load_tokenizer
    from stepwise.train.batches import length_multiple
    from stepwise.train.engine import engine_options

    config = load_resolved(Path(args.recipe).read_text())
    parallel = config.layout_for(args.section)
    layout = init_parallel(parallel.tp, parallel.pp, seed=config.run.seed)
    arch = arch_from_hf(ckpt_layout.hf_metadata_dir(args.ckpt))
    options = engine_options(config.model, parallel, scoring=True)
    if args.kind == "critic":
        model = build_critic_model(arch, options, max_seq_len=config.model.max_seq_len)
    else:  # log-probs from hidden states: no whole logits
        model = build_gpt_model(arch, options, max_seq_len=config.model.max_seq_len, hidden_output=True)
    load_checkpoint(args.ckpt, model)
    model.eval()
    config.sft.micro_batch_size = args.micro_batch_size
    tokenizer = load_tokenizer(args.tokenizer)
    # model.fp8.scoring: FP8's GEMMs need longer multiples
    multiple = length_multiple(config.model, parallel) if options.fp8 else None
    for data, out in zip(args.data, args.out):
        score_file(model, data, Path(out), args.kind, config, tokenizer, arch.vocab_size, multiple, layout)
    shutdown()
    return 0


def score_file(model, data: str, out: Path, kind: str, config, tokenizer, vocab_size: int, multiple: int | None,
               layout) -> None:
    """Score the records of `data` with the loaded `model` (batches padded to `multiple` tokens when given):
    this DP rank's slice into OUT/part_<dp>.jsonl."""
    from stepwise.data.jsonl import read_jsonl, write_jsonl
    from stepwise.train.batches import dp_slice
    from stepwise.train.worker import build_batches

    records = read_jsonl(data)
    if kind == "tokens":
        from stepwise.train.trajectory_data import build_batches as trajectory_batches

        batches = trajectory_batches(as_trajectories(records, tokenizer), tokenizer, config, config.sft, data)
    else:
        batches = build_batches("values" if kind == "critic" else "action", records, tokenizer, config, config.sft, data)
    if multiple is not None:
        batches.length_multiple = multiple
    mine = dp_slice(list(range(len(records))), layout.dp_rank, layout.dp)
    mine += list(range(len(records)))[len(mine) * layout.dp :] if layout.dp_rank == layout.dp - 1 else []
    scores = score_records(model, batches, mine, kind, vocab_size, layout.device)
    if layout.is_last_stage and layout.tp_rank == 0:
        key = {"critic": "values", "tokens": "logprobs"}.get(kind, "logp")
        rows = [{"index": i, key: s if kind != "policy" else s[0]} for i, s in zip(mine, scores)]
        write_jsonl(out / f"part_{layout.dp_rank:04d}.jsonl", rows)


def read_scores(out_dir: str | Path) -> list[dict]:
    """All parts of a scoring run, in record order."""
    return list(iter_scores(out_dir))


def iter_scores(out_dir: str | Path):
    """The scores of a run in record order, streamed: the DP groups score contiguous slices, so the parts
    in DP order are the records in order (checked as they come)."""
    from stepwise.data.jsonl import DataError, iter_jsonl

    expected = 0
    for part in sorted(Path(out_dir).glob("part_*.jsonl")):
        for row in iter_jsonl(part):
            if row["index"] != expected:
                raise DataError(f"{part}: score of record {row['index']} where record {expected} was due")
            expected += 1
            yield row


if __name__ == "__main__":
    sys.exit(main())
