"""Batched sampling with a Hugging Face `transformers` model: the CPU / single-GPU backend.

The generation loop is written out (not `model.generate`) so that every completion draws its random
numbers from its own counter-based stream, keyed by `sample_key(seed, prompt, sample_index)` and the
step: one uniform per token, turned into a token by inverse-CDF sampling of the filtered distribution.
A completion therefore does not depend on the batch size or on which prompts share its batch.

Prompts are left-padded, position ids count real tokens only, and the KV cache (`DynamicCache`) is
filled once per distinct prompt, then copied to that prompt's `n` rows; finished rows are dropped
from the cache so later steps only compute on running rows.
"""
from __future__ import annotations

import gc
import inspect
import os

import torch

from stepwise.sampling.base import Completion, Sampler, SamplingParams, sample_key
from stepwise.sampling.requests import Prompt, completions_from_tokens, encode_prompts, eos_token_ids

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# splitmix64 constants, written as the signed int64 values torch stores.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _as_int64(value: int) -> int:
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of an int64 tensor."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1): splitmix64 output number `step` of the stream keyed by each key."""
    z = keys + _as_int64((step + 1) * _GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * 2.0 ** -53


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities (rows x vocab) of the distribution tokens are drawn from: temperature, then
    top-k, then top-p (nucleus) filtering; the plain model distribution when greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.log_softmax(logits, dim=-1)
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth_best = scores.topk(params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= params.top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def pick_tokens(logprobs: torch.Tensor, keys: torch.Tensor, step: int, greedy: bool) -> torch.Tensor:
    """One token per row: the argmax when greedy, else inverse-CDF sampling with the row's uniform."""
    if greedy:
        return logprobs.argmax(dim=-1)
    probs = logprobs.to(torch.float64).exp()
    cdf = probs.cumsum(dim=-1)
    target = (counter_uniforms(keys, step) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last_allowed = (probs > 0).cumsum(dim=-1).argmax(dim=-1)  # guards against rounding past the end
    return torch.minimum(tokens, last_allowed)


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of `model_dir`, exactly as its tokenizer.json defines it.

    transformers 5 `AutoTokenizer` picks the tokenizer class from the model type and, for e.g. qwen2,
    rebuilds the byte-level pre-tokenizer and decoder, which breaks any other tokenizer saved next
    to a Qwen2 config (such as one trained on the task corpus); loading tokenizer.json directly does not.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


class HFSampler(Sampler):
    """Sample from an exported HF model directory with `transformers` (CPU or one GPU).

    `batch_size` is the number of sequences (prompt x sample) decoded together.
    """

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 64):
        from transformers import AutoModelForCausalLM

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"HFSampler batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"HFSampler dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.eos_ids = torch.tensor(eos_token_ids(self.tokenizer, self.model.generation_config, model_dir),
                                    dtype=torch.long)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else int(self.eos_ids[0])
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name is deprecated).
        forward_args = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        self.check_call(self.model is not None, params)
        if not prompts:
            return []
        requests = encode_prompts(self.tokenizer, prompts)
        encoded = [request.ids for request in requests]
        # Longest prompts first, so each batch holds prompts of similar length (little padding).
        rows = sorted(((p, s) for p in range(len(prompts)) for s in range(params.n)),
                      key=lambda row: (-len(encoded[row[0]]), row[0], row[1]))
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            distinct = sorted({p for p, _ in batch}, key=lambda p: (-len(encoded[p]), p))
            slot = {p: i for i, p in enumerate(distinct)}
            keys = [sample_key(params.seed, requests[p].key_text, s) for p, s in batch]
            completions = self._generate_rows([encoded[p] for p in distinct], [slot[p] for p, _ in batch],
                                              keys, params)
            for (p, s), completion in zip(batch, completions):
                results[p][s] = completion
        return results  # type: ignore[return-value]

    def _prefill(self, prompt_ids: list[list[int]]):
        """Run the left-padded prompts through the model; return (last logits, cache, attention mask).

        The `DynamicCache` is filled in place; position ids count real tokens, so a prompt gets the
        same positions (and logits) whatever padding its batch needs.
        """
        from transformers import DynamicCache

        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        output = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1,
                            **{self.cache_arg: cache})
        return output.logits[:, -1], cache, mask.to(self.device)

    def _generate_rows(self, prompt_ids: list[list[int]], row_prompt: list[int], keys: list[int],
                       params: SamplingParams) -> list[Completion]:
        """Complete each row (row i continues prompt_ids[row_prompt[i]] with random stream keys[i])."""
        n_rows, max_tokens = len(row_prompt), params.max_tokens
        logits, cache, mask = self._prefill(prompt_ids)
        select = torch.tensor(row_prompt, device=self.device)
        cache.batch_select_indices(select)
        logits, mask = logits[select], mask[select]
        positions = mask.sum(dim=-1)
        row_keys = torch.tensor(keys, dtype=torch.long, device=self.device)

        active = torch.arange(n_rows)  # which rows are still running (CPU)
        tokens = torch.zeros((n_rows, max_tokens), dtype=torch.long)
        logprobs = torch.zeros((n_rows, max_tokens), dtype=torch.float32)
        lengths = torch.zeros(n_rows, dtype=torch.long)
        reasons = ["length"] * n_rows
        for step in range(max_tokens):
            step_logprobs = sampling_logprobs(logits, params)
            picked = pick_tokens(step_logprobs, row_keys, step, params.greedy)
            picked_logprobs = step_logprobs.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
            tokens[active, step] = picked.cpu()
            logprobs[active, step] = picked_logprobs.float().cpu()
            lengths[active] = step + 1
            done = torch.isin(tokens[active, step], self.eos_ids)
            for j in done.nonzero().flatten().tolist():
                reasons[int(active[j])] = "eos"
            if params.stop:
                self._check_stops(tokens, active, done, step, params.stop, reasons)
            if step + 1 == max_tokens or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().flatten()
                active = active[keep]
                keep = keep.to(self.device)
                cache.batch_select_indices(keep)
                mask, positions, row_keys, picked = mask[keep], positions[keep], row_keys[keep], picked[keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            output = self.model(input_ids=picked.unsqueeze(-1), attention_mask=mask,
                                position_ids=positions.unsqueeze(-1), use_cache=True, **{self.cache_arg: cache})
            logits = output.logits[:, -1]
            positions = positions + 1
        kept = list(enumerate(lengths.tolist()))
        return completions_from_tokens(self.tokenizer, [tokens[row, :length].tolist() for row, length in kept],
                                       [logprobs[row, :length].tolist() for row, length in kept], reasons, params.stop)

    def _check_stops(self, tokens: torch.Tensor, active: torch.Tensor, done: torch.Tensor, step: int,
                     stops: list[str], reasons: list[str]) -> None:
        """Mark running rows whose text now contains a stop string as done (reason "stop")."""
        running = (~done).nonzero().flatten()
        if len(running) == 0:
            return
        # A stop string that just appeared lies in the last few tokens (at most 4 byte-level tokens a
        # character); decode only that window, then the whole text for rows that match.
        window = 4 * max(len(s) for s in stops) + 8
        rows = active[running]
        tails = self.tokenizer.batch_decode(tokens[rows, max(0, step + 1 - window):step + 1].tolist(),
                                            skip_special_tokens=True)
        for j, row, tail in zip(running.tolist(), rows.tolist(), tails):
            if not any(stop in tail for stop in stops):
                continue
            text = self.tokenizer.decode(tokens[row, :step + 1].tolist(), skip_special_tokens=True)
            if any(stop in text for stop in stops):
                reasons[row] = "stop"
                done[j] = True
