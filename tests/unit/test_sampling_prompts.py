"""Tests for token-id prompts (stepwise.sampling.requests): a text's ids sample byte-identically to the
text with the HF backend, bad prompts are refused with the prompt or record named, and the shard
writer accepts id prompts and digests them apart from text. Tiny random Qwen2, char-level tokenizer."""
from __future__ import annotations

import hashlib
import json

import pytest

from stepwise.data.jsonl import DataError
from stepwise.sampling import SamplingParams, make_sampler, read_shards, sample_to_shards
from stepwise.sampling.requests import encode_prompts, prompt_digest_bytes
from tests.helpers import make_tiny_hf_qwen2

# printable ASCII only: the char tokenizer of tests/helpers.py maps anything else to <unk>, which
# would not decode back to the text
PROMPTS = ["1+2=", "what is 12*3? ", "a", "zz top: ", "7*8=56; 9*9="]


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    model_dir = make_tiny_hf_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))
    with make_sampler("hf", model_dir, batch_size=64) as built:
        yield built


def ids_of(sampler, text: str) -> list[int]:
    return sampler.tokenizer(text, add_special_tokens=False)["input_ids"]


def as_tuples(results):
    return [[(c.text, c.token_ids, c.token_logprobs, c.finish_reason) for c in row] for row in results]


def test_ids_of_a_text_sample_exactly_what_the_text_does(sampler):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=10, seed=4, stop=["e", "a", "1", "Q", "%"])
    from_text = sampler.generate(PROMPTS, params)
    from_ids = sampler.generate([ids_of(sampler, p) for p in PROMPTS], params)
    assert as_tuples(from_ids) == as_tuples(from_text)  # byte-identical, log-probs included
    mixed = sampler.generate([ids_of(sampler, p) if i % 2 else p for i, p in enumerate(PROMPTS)], params)
    assert as_tuples(mixed) == as_tuples(from_text)
    assert {c.finish_reason for row in from_text for c in row} >= {"stop", "length"}


def test_id_prompts_key_on_their_decoding(sampler):
    """The key text is the decoding with specials kept: an id prompt holding the eos id samples like the
    text that spells it, and differently from the same ids without it."""
    ids = ids_of(sampler, "ab") + [sampler.tokenizer.eos_token_id] + ids_of(sampler, "c")
    (request,) = encode_prompts(sampler.tokenizer, [ids])
    assert (request.ids, request.key_text) == (ids, "ab</s>c")
    params = SamplingParams(n=2, max_tokens=6, seed=2)
    assert as_tuples(sampler.generate([ids], params)) == as_tuples(sampler.generate(["ab</s>c"], params))


@pytest.mark.parametrize("prompt, message", [([], "prompt 1 is an empty list"), ([3, -1], "prompt 1 has token id -1"),
                                             ([3, 2.5], "prompt 1 has token id 2.5"),
                                             ([True], "prompt 1 has token id True"),
                                             (None, "prompt 1 must be a string or a list of token ids"),
                                             ("", "prompt 1 encodes to no tokens")])
def test_bad_prompts_are_named(sampler, prompt, message):
    with pytest.raises(ValueError, match=message):
        sampler.generate(["ok", prompt], SamplingParams(max_tokens=2))


def test_shards_take_id_prompts(sampler, tmp_path):
    params = SamplingParams(n=2, max_tokens=8, seed=11)
    text_records = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]
    id_records = [{"id": i, "prompt": ids_of(sampler, p)} for i, p in enumerate(PROMPTS)]
    sample_to_shards(sampler, text_records, "prompt", params, tmp_path / "text", shard_size=2)
    sample_to_shards(sampler, id_records, "prompt", params, tmp_path / "ids", shard_size=2)
    from_text, from_ids = read_shards(tmp_path / "text"), read_shards(tmp_path / "ids")
    assert [r["prompt"] for r in from_ids] == [ids_of(sampler, p) for p in PROMPTS for _ in range(2)]
    without_prompt = lambda rows: [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    assert without_prompt(from_ids) == without_prompt(from_text)


@pytest.mark.parametrize("prompt, message", [([], "is an empty list of token ids"),
                                             (["a"], "has token id 'a' at position 0"),
                                             ({"ids": [1]}, "must be a string or a list of token ids, got dict"),
                                             (None, "must be a string or a list of token ids, got NoneType")])
def test_shards_name_the_record_and_key_of_a_bad_prompt(tmp_path, prompt, message):
    records = [{"q": "fine"}, {"q": [4, 5]}, {"q": prompt}]
    with pytest.raises(DataError, match=f"record 2: key 'q' {message}"):
        sample_to_shards(None, records, "q", SamplingParams(), tmp_path)
    with pytest.raises(DataError, match="record 0: key 'question' is missing"):
        sample_to_shards(None, records, "question", SamplingParams(), tmp_path)
    assert not (tmp_path / "sampling.json").exists()


def test_settings_digest_covers_id_prompts(sampler, tmp_path):
    params = SamplingParams(max_tokens=2)
    sample_to_shards(sampler, [{"p": [5, 6, 7]}], "p", params, tmp_path)
    settings = json.loads((tmp_path / "sampling.json").read_text())
    assert settings["prompts_sha256"] == hashlib.sha256(b"\xff[5, 6, 7]\x00").hexdigest()
    for changed in ([5, 6, 8], [5, 6], "\xff[5, 6, 7]"):
        with pytest.raises(DataError, match="prompts_sha256"):
            sample_to_shards(sampler, [{"p": changed}], "p", params, tmp_path)
    # text prompts digest as before id prompts existed, so runs sampled earlier still resume
    assert prompt_digest_bytes("1+2=") == b"1+2=\x00"
    assert prompt_digest_bytes("ab") != prompt_digest_bytes(ids_of(sampler, "ab"))
