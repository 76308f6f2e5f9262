"""Tests for stepwise.sampling: params validation, the backend factory, the HF sampler (batched vs
unbatched vs naive greedy, seeding independent of batching, stop strings, max_tokens, logprobs) and
the resumable JSONL shard writer. Uses a tiny random Qwen2 model with a character-level tokenizer."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from stepwise.data.jsonl import DataError, read_jsonl
from stepwise.sampling import (Completion, Sampler, SamplingParams, make_sampler, read_shards, sample_key,
                               sample_to_shards)
from stepwise.sampling.hf import HFSampler, counter_uniforms, sampling_logprobs
from tests.tolerance import logits_bound, within

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-=*?.:\n"
PROMPTS = ["1+2=", "what is 12*3?\n", "a", "zz top: ", "q", "7*8=56\n9*9="]
EOS_ID = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    vocab = {"<pad>": 0, "</s>": EOS_ID, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         max_position_embeddings=256, initializer_range=0.3, eos_token_id=EOS_ID,
                         pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampler(model_dir):
    with make_sampler("hf", model_dir, batch_size=64) as built:
        yield built


def samples(completions: list[list[Completion]]) -> list[list[tuple]]:
    return [[(c.text, c.token_ids, c.finish_reason) for c in row] for row in completions]


def assert_logprobs_close(first, second, prompts, sampler, temperature=1.0):
    """Equal up to fp32 summation order (batch padding and the KV cache change the attention sums): a
    log-prob is a logit minus a logsumexp, each off by at most the logits' bound (tests/tolerance.py),
    and the logits are divided by the temperature before either."""
    config = sampler.model.config.to_dict()
    for prompt, row_a, row_b in zip(prompts, first, second):
        prompt_ids = sampler.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for a, b in zip(row_a, row_b):
            ids = torch.tensor([prompt_ids + a.token_ids])
            with torch.no_grad():
                logits = sampler.model(input_ids=ids).logits / max(temperature, 1e-30)
            observed = (torch.tensor(a.token_logprobs) - torch.tensor(b.token_logprobs)).abs().max().item()
            within(f"log-probs of {prompt!r}", observed, 2 * logits_bound(logits, config))


# --- params and factory -------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("n", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
                                          ("top_k", -1), ("max_tokens", 0), ("seed", -1), ("stop", "x"),
                                          ("stop", [""]), ("n", 1.5), ("temperature", "hot")])
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_make_sampler_errors():
    with pytest.raises(ValueError, match="valid backends: hf, vllm"):
        make_sampler("nope", "/nowhere")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(RuntimeError, match="vllm"):
            make_sampler("vllm", "/nowhere")


def test_sample_key_is_stable_and_distinct():
    assert sample_key(0, "p", 0) == sample_key(0, "p", 0)
    keys = {sample_key(s, p, i) for s in (0, 1) for p in ("p", "q") for i in (0, 1)}
    assert len(keys) == 8 and all(0 <= k < 2 ** 63 for k in keys)


def test_counter_uniforms_match_reference_splitmix64():
    def reference(key: int, step: int) -> float:
        z = (key + (step + 1) * 0x9E3779B97F4A7C15) % 2 ** 64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return ((z ^ (z >> 31)) >> 11) * 2.0 ** -53

    keys = [0, 1, 2 ** 62 + 12345, 2 ** 63 - 1]
    for step in (0, 7, 10 ** 6):
        got = counter_uniforms(torch.tensor(keys), step).tolist()
        assert got == [reference(k, step) for k in keys]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(sampling_logprobs(logits, SamplingParams(**kw)))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]
    assert kept(top_k=3, top_p=0.99) == [True, True, True, False]
    assert torch.allclose(sampling_logprobs(logits, SamplingParams(top_k=2)).exp()[0, :2], torch.tensor([0.625, 0.375]))


# --- the HF sampler ----------------------------------------------------------------------------------

def naive_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == EOS_ID:
            break
    return ids[len(prompt_ids):]


def test_greedy_batched_equals_unbatched_and_naive(model_dir, sampler):
    params = SamplingParams(temperature=0, max_tokens=16)
    batched = sampler.generate(PROMPTS, params)
    single = HFSampler(model_dir, batch_size=1).generate(PROMPTS, params)
    assert samples(batched) == samples(single)
    assert_logprobs_close(batched, single, PROMPTS, sampler)
    for prompt, (completion,) in zip(PROMPTS, batched):
        prompt_ids = sampler.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert completion.token_ids == naive_greedy(sampler.model, prompt_ids, 16)


def test_samples_do_not_depend_on_batching(model_dir, sampler):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, top_k=20, max_tokens=12, seed=7)
    reference = sampler.generate(PROMPTS, params)
    for batch_size in (1, 4):
        assert samples(HFSampler(model_dir, batch_size=batch_size).generate(PROMPTS, params)) == samples(reference)
    order = list(range(len(PROMPTS)))
    random.Random(3).shuffle(order)
    shuffled = HFSampler(model_dir, batch_size=5).generate([PROMPTS[i] for i in order], params)
    assert samples([shuffled[order.index(i)] for i in range(len(PROMPTS))]) == samples(reference)
    assert_logprobs_close([shuffled[order.index(i)] for i in range(len(PROMPTS))], reference, PROMPTS, sampler)
    # different sample indices and seeds give different samples
    assert len({tuple(c.token_ids) for row in reference for c in row}) > len(PROMPTS) * 2
    other_seed = sampler.generate(PROMPTS, SamplingParams(**{**params.to_dict(), "seed": 8}))
    assert samples(other_seed) != samples(reference)


def test_max_tokens_and_finish_reasons(sampler):
    results = sampler.generate(PROMPTS, SamplingParams(n=8, max_tokens=6, seed=1))
    reasons = {c.finish_reason for row in results for c in row}
    assert reasons == {"length", "eos"}
    for completion in (c for row in results for c in row):
        assert 1 <= len(completion.token_ids) <= 6
        if completion.finish_reason == "length":
            assert len(completion.token_ids) == 6 and EOS_ID not in completion.token_ids
        else:
            assert completion.token_ids[-1] == EOS_ID and EOS_ID not in completion.token_ids[:-1]
            assert "</s>" not in completion.text
        assert completion.text == sampler.tokenizer.decode(
            [t for t in completion.token_ids if t != EOS_ID], skip_special_tokens=True)


def test_stop_strings_cut_the_text(sampler):
    params = SamplingParams(n=4, max_tokens=20, seed=3)
    plain = sampler.generate(PROMPTS, params)
    texts = [c.text for row in plain for c in row]
    stops = ["e", "7*"]
    assert any(any(s in t for s in stops) for t in texts)
    stopped = sampler.generate(PROMPTS, SamplingParams(**{**params.to_dict(), "stop": stops}))
    n_stopped = 0
    for before, after in zip((c for row in plain for c in row), (c for row in stopped for c in row)):
        cuts = [before.text.find(s) for s in stops if s in before.text]
        if not cuts:
            assert (after.text, after.token_ids, after.finish_reason) == (
                before.text, before.token_ids, before.finish_reason)
            continue
        n_stopped += 1
        assert after.finish_reason == "stop"
        assert after.text == before.text[:min(cuts)]
        assert before.token_ids[:len(after.token_ids)] == after.token_ids
        assert any(s in sampler.tokenizer.decode(after.token_ids) for s in stops)
    assert n_stopped > 0


def test_logprobs_match_a_plain_forward_pass(sampler):
    results = sampler.generate(PROMPTS[:4], SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=5))
    for prompt, row in zip(PROMPTS, results):
        prompt_ids = sampler.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for completion in row:
            ids = torch.tensor([prompt_ids + completion.token_ids])
            with torch.no_grad():
                logits = sampler.model(input_ids=ids).logits
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            expected = logprobs[len(prompt_ids) - 1:].gather(-1, ids[0, len(prompt_ids):, None]).sum()
            # a sum of len(token_ids) log-probs, each within twice the logits' bound (tests/tolerance.py)
            bound = 2 * len(completion.token_ids) * logits_bound(logits, sampler.model.config.to_dict())
            within("sum of sampled log-probs vs one forward", abs(float(expected) - sum(completion.token_logprobs)), bound)


def test_top_k_one_is_greedy(sampler):
    greedy = sampler.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    for params in (SamplingParams(temperature=0.7, top_k=1, max_tokens=8),
                   SamplingParams(temperature=1.3, top_p=1e-6, max_tokens=8)):
        filtered = sampler.generate(PROMPTS, params)
        assert [r[0].token_ids for r in filtered] == [r[0].token_ids for r in greedy]
        assert all(lp == 0.0 for r in filtered for lp in r[0].token_logprobs)


# --- shards ------------------------------------------------------------------------------------------

class CountingSampler(Sampler):
    """Deterministic fake: completion i of a prompt is the reversed prompt plus i."""

    name = "counting"

    def __init__(self):
        self.prompts_seen: list[str] = []

    def generate(self, prompts, params):
        self.prompts_seen.extend(prompts)
        return [[Completion(text=p[::-1] + str(i), token_ids=[len(p), i], token_logprobs=[-0.5, -0.25],
                            finish_reason="length") for i in range(params.n)] for p in prompts]


def test_shards_resume_and_are_valid_jsonl(tmp_path):
    records = [{"id": f"r{i}", "problem": f"prompt {i}"} for i in range(5)]
    params = SamplingParams(n=2)
    counting = CountingSampler()
    paths = sample_to_shards(counting, records, "problem", params, tmp_path, shard_size=2)
    assert [p.name for p in paths] == ["shard_00000.jsonl", "shard_00001.jsonl", "shard_00002.jsonl"]
    assert len(counting.prompts_seen) == 5
    first = read_shards(tmp_path)
    assert [(r["id"], r["sample_index"]) for r in first] == [(f"r{i}", s) for i in range(5) for s in range(2)]
    for path in paths:
        for line in read_jsonl(path, required={"id": str, "response": str, "token_ids": list,
                                               "token_logprobs": list, "finish_reason": str, "num_tokens": int}):
            assert line["num_tokens"] == len(line["token_ids"]) == 2
            assert line["response"] == line["problem"][::-1] + str(line["sample_index"])

    paths[1].unlink()
    counting.prompts_seen.clear()
    assert sample_to_shards(counting, records, "problem", params, tmp_path, shard_size=2) == paths
    assert counting.prompts_seen == ["prompt 2", "prompt 3"]
    assert read_shards(tmp_path) == first
    counting.prompts_seen.clear()
    sample_to_shards(counting, records, "problem", params, tmp_path, shard_size=2)
    assert counting.prompts_seen == []

    with pytest.raises(DataError, match="shard_size"):
        sample_to_shards(counting, records, "problem", params, tmp_path, shard_size=3)
    with pytest.raises(DataError, match="key 'question'"):
        sample_to_shards(counting, records, "question", params, tmp_path / "other")


def test_shards_split_by_worker(tmp_path):
    records = [{"problem": f"p{i}"} for i in range(7)]
    mine = [sample_to_shards(CountingSampler(), records, "problem", SamplingParams(), tmp_path, shard_size=2,
                             rank=rank, world_size=2) for rank in (0, 1)]
    assert [[p.name for p in paths] for paths in mine] == [["shard_00000.jsonl", "shard_00002.jsonl"],
                                                           ["shard_00001.jsonl", "shard_00003.jsonl"]]
    assert [r["problem"] for r in read_shards(tmp_path)] == [f"p{i}" for i in range(7)]


def test_resharding_gives_the_same_samples(sampler, tmp_path):
    records = [{"id": i, "problem": p} for i, p in enumerate(PROMPTS)]
    params = SamplingParams(n=2, max_tokens=8, seed=11)
    sample_to_shards(sampler, records, "problem", params, tmp_path / "a", shard_size=2)
    sample_to_shards(sampler, records, "problem", params, tmp_path / "b", shard_size=5)
    drop_logprobs = lambda rows: [{k: v for k, v in r.items() if k != "token_logprobs"} for r in rows]
    assert drop_logprobs(read_shards(tmp_path / "a")) == drop_logprobs(read_shards(tmp_path / "b"))
