"""GPU-only checks of the vLLM backend (marked `gpu`; skipped without CUDA or without vllm) against the
HF backend on a tiny random Qwen2 exported by transformers: greedy completions equal token for token
(eos, stop strings and max tokens mapped alike), sampled log-probs equal a forward pass of the same
model under the same temperature / top-k / top-p, and seeded samples do not depend on the batch.

Tolerance. The model stays in float32 (vLLM serves fp32 with its Triton / Flex attention), and the
engine's workers inherit VLLM_FLOAT32_MATMUL_PRECISION=highest (no TF32 in torch matmuls) and
TRITON_F32_DEFAULT=ieee (no TF32 in Triton's tl.dot), so both sides are IEEE fp32 computations of
the same network that differ in summation order (and ulp-level transcendentals): tests/tolerance.py
bounds their logits' difference (Higham's gamma_n over the decoder's chain of sums). A log-prob is a
logit over the temperature minus a logsumexp of those, each off by at most the bound over the
temperature: twice that is the tolerance. (In bf16 the unit roundoff would be 2**-8 instead of
2**-24: a 65536x wider bound, too wide to catch a wrong distribution, which is why fp32 is used.)
A greedy difference is accepted only at a near tie: where the HF model's two best logits are closer
than twice the bound, either token is a correct argmax.
"""
from __future__ import annotations

import os

import pytest
import torch

from stepwise.sampling import SamplingParams, make_sampler
from stepwise.sampling.hf import sampling_logprobs
from tests.helpers import make_tiny_char_tokenizer
from tests.tolerance import logits_bound, within

pytestmark = pytest.mark.gpu
vllm = pytest.importorskip("vllm")

PROMPTS = ["1+2=", "what is 12*3? ", "a", "zz top: ", "7*8=56; 9*9=", "The answer is"]
# head_dim 64: vLLM's attention kernels need head sizes >= 32 (tests/helpers.py's shapes use 4)
SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
             num_hidden_layers=2, tie_word_embeddings=True)
FP32_ENV = {"VLLM_FLOAT32_MATMUL_PRECISION": "highest", "TRITON_F32_DEFAULT": "ieee"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2_vllm")
    tokenizer = make_tiny_char_tokenizer(97)
    config = Qwen2Config(vocab_size=97, max_position_embeddings=256, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **SHAPE)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    with make_sampler("hf", model_dir, device="cpu", dtype="float32") as built:
        yield built


@pytest.fixture(scope="module")
def engine(model_dir):
    saved = {key: os.environ.get(key) for key in FP32_ENV}
    os.environ.update(FP32_ENV)  # inherited by the engine's worker processes
    try:
        with make_sampler("vllm", model_dir, tensor_parallel_size=1, gpu_memory_utilization=0.3, max_num_seqs=64,
                          dtype="float32", enforce_eager=True, max_model_len=256) as built:
            yield built
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def forward_logits(hf, prompt: str, token_ids: list[int]) -> torch.Tensor:
    """The HF model's logits at the positions that predicted `token_ids` after `prompt`."""
    prompt_ids = hf.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = hf.model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1:-1]


def test_greedy_equals_the_hf_backend(hf, engine):
    params = SamplingParams(temperature=0, max_tokens=24, stop=["e", "%"])
    ids_prompt = hf.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    got = engine.generate([PROMPTS[0], ids_prompt, *PROMPTS[2:]], params)
    expected = hf.generate(PROMPTS, params)
    config = hf.model.config.to_dict()
    for prompt, (ours,), (theirs,) in zip(PROMPTS, got, expected):
        if (ours.text, ours.token_ids, ours.finish_reason) != (theirs.text, theirs.token_ids, theirs.finish_reason):
            split = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b), None)
            assert split is not None, f"{prompt!r}: same tokens, different ends: {ours} vs {theirs}"
            logits = forward_logits(hf, prompt, theirs.token_ids)
            best_two = logits[split].topk(2).values
            within(f"greedy split of {prompt!r} at token {split}: top-2 logit gap (a near tie)",
                   float(best_two[0] - best_two[1]), 2 * logits_bound(logits, config))
            continue
        logits = forward_logits(hf, prompt, theirs.token_ids)
        observed = max(abs(a - b) for a, b in zip(ours.token_logprobs, theirs.token_logprobs))
        within(f"greedy log-probs of {prompt!r}", observed, 2 * logits_bound(logits, config))


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.95)])
def test_sampled_logprobs_match_a_forward_pass(hf, engine, settings):
    params = SamplingParams(n=4, max_tokens=16, seed=1, **settings)
    config = hf.model.config.to_dict()
    for prompt, row in zip(PROMPTS, engine.generate(PROMPTS, params)):
        for completion in row:
            logits = forward_logits(hf, prompt, completion.token_ids)
            expected = sampling_logprobs(logits, params).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            observed = (expected - torch.tensor(completion.token_logprobs)).abs().max().item()
            bound = 2 * logits_bound(logits / params.temperature, config)
            within(f"sampled log-probs of {prompt!r} ({settings})", observed, bound)


def test_seeded_samples_do_not_depend_on_the_batch(hf, engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=9)
    together = engine.generate(PROMPTS, params)
    alone = engine.generate([PROMPTS[2]], params)
    as_ids = engine.generate([hf.tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]], params)
    tokens = lambda row: [c.token_ids for c in row]
    assert tokens(alone[0]) == tokens(together[2]) == tokens(as_ids[0])
    assert len({tuple(c.token_ids) for c in together[2]}) > 1  # the sample indices draw different streams
