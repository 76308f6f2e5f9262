"""CPU tests of the vLLM backend's logic (stepwise.sampling.vllm and requests.engine_completions):
vLLM-shaped outputs built from the HF backend's own completions map back to exactly those
completions (eos, stop strings, max tokens), the requests honour the seeding contract, replicas take
their own GPUs, the recipe's settings reach the engine, and `VLLMSampler` glues it together (run here
against a stand-in `vllm` module whose engine replays the HF sampler: vllm itself needs a GPU)."""
from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest

from stepwise.config.schema import SamplingConfig
from stepwise.sampling import SAMPLERS, Completion, SamplingParams, make_sampler, sample_key
from stepwise.sampling.requests import encode_prompts, engine_completions
from stepwise.sampling.vllm import LOGPROBS_MODE, VLLMSampler, engine_requests, replica_devices
from tests.helpers import make_tiny_hf_qwen2

PROMPTS = ["1+2=", "what is 12*3? ", "a", "zz top: ", "7*8=56; 9*9="]
STOPS = ["e", "a", "1", "Q", "%"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def sampler(model_dir):
    with make_sampler("hf", model_dir) as built:
        yield built


def engine_output(completion: Completion, stop: list[str], eos_reason=None, length_on_eos=False):
    """What vLLM reports for `completion`: its ids, {id: Logprob} per position (the sampled token and a
    higher-ranked other one, as logprobs=0 may return), finish_reason and stop_reason."""
    ids = completion.token_ids
    logprobs = [{token: SimpleNamespace(logprob=lp), (token + 1) % 97: SimpleNamespace(logprob=0.0)}
                for token, lp in zip(ids, completion.token_logprobs)]
    if completion.finish_reason == "eos":
        reason = ("length", None) if length_on_eos else ("stop", eos_reason)
    elif completion.finish_reason == "stop":
        reason = ("stop", stop[0])  # vLLM names the stop string it matched; only its being a string matters
    else:
        reason = ("length", None)
    return SimpleNamespace(token_ids=tuple(ids), logprobs=logprobs, finish_reason=reason[0], stop_reason=reason[1])


def flat(results):
    return [c for row in results for c in row]


def test_engine_outputs_map_to_the_hf_completions(sampler):
    params = SamplingParams(n=6, temperature=1.0, max_tokens=12, seed=3, stop=STOPS)
    hf = flat(sampler.generate(PROMPTS, params))
    assert {c.finish_reason for c in hf} == {"eos", "stop", "length"}
    eos_ids = sampler.eos_ids.tolist()
    for variant in ({}, {"eos_reason": eos_ids[0]}, {"length_on_eos": True}):  # eos as vLLM's eos / stop id / old cap
        outputs = [engine_output(c, STOPS, **variant) for c in hf]
        assert engine_completions(sampler.tokenizer, outputs, eos_ids, STOPS) == hf
    greedy = flat(sampler.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20)))
    assert engine_completions(sampler.tokenizer, [engine_output(c, []) for c in greedy], eos_ids, []) == greedy


def test_engine_outputs_that_do_not_fit_are_refused(sampler):
    eos_ids = sampler.eos_ids.tolist()
    ids = sampler.tokenizer("xyz", add_special_tokens=False)["input_ids"]
    fine = SimpleNamespace(token_ids=ids, logprobs=[{t: SimpleNamespace(logprob=-1.0)} for t in ids],
                           finish_reason="length", stop_reason=None)
    assert engine_completions(sampler.tokenizer, [fine], eos_ids, ["q"])[0].text == "xyz"
    cases = [({"finish_reason": "abort"}, "finish_reason='abort'"),
             ({"finish_reason": "stop"}, "not an eos token, a stop string or max_tokens"),
             ({"finish_reason": "stop", "stop_reason": "q"}, "holds none of \\['q'\\]"),
             ({"logprobs": None}, "None log-prob entries for 3 tokens")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            engine_completions(sampler.tokenizer, [SimpleNamespace(**{**vars(fine), **change})], eos_ids, ["q"])


def test_requests_follow_the_seeding_contract(sampler):
    prompts = ["ab", sampler.tokenizer("cd", add_special_tokens=False)["input_ids"]]
    encoded = encode_prompts(sampler.tokenizer, prompts)
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=9, seed=4, stop=["x"])
    requests = engine_requests(encoded, params, [1, 7])
    assert [(r.prompt_index, r.sample_index) for r in requests] == [(p, s) for p in (0, 1) for s in range(3)]
    assert [r.prompt_ids for r in requests] == [e.ids for e in encoded for _ in range(3)]
    assert [r.sampling["seed"] for r in requests] == [sample_key(4, text, s) for text in ("ab", "cd") for s in range(3)]
    for request in requests:
        assert {k: v for k, v in request.sampling.items() if k != "seed"} == {
            "n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_tokens": 9, "stop": ["x"],
            "stop_token_ids": [1, 7], "logprobs": 0, "prompt_logprobs": None, "skip_special_tokens": True,
            "include_stop_str_in_output": False}
    greedy = engine_requests(encoded, SamplingParams(temperature=0, top_p=0.5, top_k=3), [1])[0].sampling
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["stop"]) == (0.0, 1.0, 0, None)


def test_replica_devices():
    assert replica_devices(None, 8, 1, 4) == ["4", "5", "6", "7"]
    assert replica_devices("3,5,6,7", 0, 1, 2) == ["6", "7"]
    assert replica_devices("2,3", 8, 3, 2) == ["2", "3"]  # the launcher bound this task's GPUs
    assert replica_devices(None, 8, 0, 8) == [str(i) for i in range(8)]
    with pytest.raises(RuntimeError, match="tensor_parallel_size=4 GPUs but this process sees 2: 0,1"):
        replica_devices("0,1", 8, 0, 4)
    with pytest.raises(RuntimeError, match="sees 0: none"):
        replica_devices(None, 0, 0, 1)


def test_make_replica_passes_the_recipe_settings(monkeypatch):
    from stepwise.pipeline.stages.sampling import make_replica

    built = []
    monkeypatch.setitem(SAMPLERS, "vllm", lambda model_dir, **options: built.append((model_dir, options)))
    config = SamplingConfig(backend="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.5, max_num_seqs=8)
    make_replica(SimpleNamespace(config=SimpleNamespace(sampling=config), local_rank=3), "/m", batch_size=5)
    assert built == [("/m", {"replica": 3, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                             "max_num_seqs": 8})]


class ReplayEngine:
    """Stand-in for vllm.LLM: records how it was built and answers each request with the HF sampler's
    completion of the same prompt ids and settings (greedy), in vLLM's output shape."""

    def __init__(self, **kwargs):
        self.kwargs, self.visible = kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")
        self.hf = make_sampler("hf", kwargs["model"])
        self.calls = []

    def generate(self, prompts, sampling, use_tqdm):
        self.calls.append((prompts, sampling))
        outputs = []
        for prompt, request in zip(prompts, sampling):
            params = SamplingParams(temperature=request.temperature, max_tokens=request.max_tokens,
                                    stop=request.stop or [])
            (completion,), = self.hf.generate([prompt["prompt_token_ids"]], params)
            outputs.append(SimpleNamespace(outputs=[engine_output(completion, params.stop)]))
        return outputs


def test_vllm_sampler_glue(model_dir, sampler, monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = ReplayEngine, SimpleNamespace
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    engine = VLLMSampler(model_dir, replica=1, tensor_parallel_size=2, max_num_seqs=4)
    assert engine.llm.visible == "2,3" and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    defaults = SamplingConfig()
    assert engine.llm.kwargs == {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": "auto",
                                 "distributed_executor_backend": "mp", "enable_prefix_caching": True,
                                 "logprobs_mode": LOGPROBS_MODE, "generation_config": "vllm",
                                 "tensor_parallel_size": 2, "max_num_seqs": 4,
                                 "gpu_memory_utilization": defaults.gpu_memory_utilization}
    params = SamplingParams(n=2, temperature=0, max_tokens=10, stop=["e", "a"])
    prompts = [PROMPTS[0], sampler.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"], PROMPTS[3]]
    results = engine.generate(prompts, params)
    single = SamplingParams(**{**params.to_dict(), "n": 1})  # what the replay engine runs per request
    expected = [[sampler.generate([p], single)[0][0]] * 2 for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]
    assert results == expected
    assert len(engine.llm.calls) == 1 and len(engine.llm.calls[0][0]) == 6  # one call, a request per sample
    with pytest.raises(TypeError, match="params must be SamplingParams, got dict"):
        engine.generate(prompts, params.to_dict())
    engine.close()
    with pytest.raises(RuntimeError, match="after close"):
        engine.generate(prompts, params)
