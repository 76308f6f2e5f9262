"""The vLLM sampling backend (the cluster's): one `vllm.LLM` engine per replica.

NOT RUN HERE: this machine has no GPU and no vllm, so `VLLMSampler` itself has never been run by this
project's CI; tests/gpu/test_vllm.py checks it against the HF backend on a GPU with vllm installed.
Its logic lives in functions the CPU tests do run: `engine_requests` (what is asked of vLLM),
`replica_devices` (which GPUs a replica takes) and `requests.engine_completions` (what vLLM returns,
mapped to `Completion`s exactly as the HF backend builds its own). `vllm` is imported only when a
sampler is built, so this module imports without it.

Engine: `tensor_parallel_size` GPUs of this node (replica r takes the r-th group of the visible
GPUs, `replica_devices`), the multiprocessing executor (`distributed_executor_backend="mp"`, no Ray), prefix caching on,
the weights read from the exported HF directory on disk (no in-memory weight sync), the dtype of
the export's config.json ("auto"), and generation_config.json ignored for defaults ("vllm"): the
request says everything (no repetition penalty or top-p slips in from the model's file).

Seeding contract (`sampling.base`): every (prompt, sample index) is its own request, n=1, with
seed=sample_key(seed, key text, sample index); a prompt's requests are submitted together, one after
the other, so the prefix cache serves the prompt to all of them. Prompts go in as token ids
(`requests.encode_prompts`), never re-tokenised by vLLM. Prompt log-probs are never asked for.

Log-probs: `logprobs=0` returns the sampled token's log-prob, and the engine's
`logprobs_mode="processed_logprobs"` makes it the log-prob under the distribution the token was
drawn from -- after temperature, top-k and top-p, the plain model distribution when greedy
(temperature 0) -- which is what `Completion.token_logprobs` promises. The default "raw_logprobs"
would give the unscaled model distribution; vLLM 0.10.0 and 0.10.1 left temperature out of
"processed" (fixed in 0.10.2; requirements-cluster.txt pins a later version).

Ends: eos ids (`requests.eos_token_ids`, as the HF backend) are passed as stop_token_ids, stop
strings as `stop`; the text is rebuilt from the token ids by `requests.completions_from_tokens`, so
it is cut and decoded as the HF backend does. vLLM's own stop-string check runs on its own
tokenizer (AutoTokenizer of the directory), which for a released model is the one we use. vLLM
also ends a sequence at its max_model_len (the model's positions unless engine_args set it), as
"length", where the HF backend would go on to max_tokens.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from stepwise.sampling.base import Completion, Sampler, SamplingParams, sample_key
from stepwise.sampling.requests import (EncodedPrompt, Prompt, encode_prompts, engine_completions, eos_token_ids,
                                        load_generation_config)

# processed = after temperature, top-k and top-p (vLLM >= 0.10.2); see the module docstring
LOGPROBS_MODE = "processed_logprobs"


@dataclass(frozen=True)
class EngineRequest:
    """One vLLM request: completion `sample_index` of prompt `prompt_index`, and its SamplingParams fields."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    sampling: dict[str, Any]


def engine_requests(prompts: Sequence[EncodedPrompt], params: SamplingParams,
                    eos_ids: Sequence[int]) -> list[EngineRequest]:
    """The requests for `params.n` completions of each prompt, prompt by prompt (a prompt's requests
    adjacent), each n=1 with its own seed; `sampling` holds vllm.SamplingParams keyword arguments."""
    shared = {"n": 1, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
              "max_tokens": params.max_tokens, "stop": list(params.stop) or None,
              "stop_token_ids": [int(token) for token in eos_ids], "logprobs": 0, "prompt_logprobs": None,
              "skip_special_tokens": True, "include_stop_str_in_output": False}
    if params.greedy:  # vLLM's greedy: temperature 0, no filters
        shared.update(temperature=0.0, top_p=1.0, top_k=0)
    return [EngineRequest(p, s, prompt.ids, {**shared, "seed": sample_key(params.seed, prompt.key_text, s)})
            for p, prompt in enumerate(prompts) for s in range(params.n)]


def replica_devices(visible: str | None, device_count: int, replica: int, group_size: int) -> list[str]:
    """The GPUs (CUDA_VISIBLE_DEVICES entries) of replica `replica` of this node: the visible GPUs (the
    CUDA_VISIBLE_DEVICES list when set, else 0..device_count-1) cut into groups of `group_size`, and
    group replica % groups -- the r-th group when the process sees the whole node, its own when the
    launcher bound `group_size` GPUs to each task (as the HF replica takes local_rank % GPUs)."""
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else \
        [str(index) for index in range(device_count)]
    if replica < 0 or group_size < 1:
        raise ValueError(f"replica must be >= 0 and the group size >= 1, got replica={replica}, size={group_size}")
    groups = len(devices) // group_size
    if groups == 0:
        raise RuntimeError(f"a vLLM replica needs sampling.tensor_parallel_size={group_size} GPUs but this process "
                           f"sees {len(devices)}: {','.join(devices) or 'none'}")
    first = (replica % groups) * group_size
    return devices[first:first + group_size]


@contextlib.contextmanager
def visible_devices(devices: Sequence[str]) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES set to `devices` while vLLM starts its engine and worker processes (they
    inherit it), restored afterwards."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def recipe_defaults() -> dict[str, Any]:
    """tensor_parallel_size, gpu_memory_utilization and max_num_seqs as the recipe schema defaults them."""
    from stepwise.config.schema import SamplingConfig

    defaults = SamplingConfig()
    return {key: getattr(defaults, key) for key in ("tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs")}


class VLLMSampler(Sampler):
    """Sample from an exported HF model directory with one vLLM engine over `tensor_parallel_size` GPUs.

    `replica` is this process's index among the node's sampler replicas (it picks the GPU group);
    the engine settings default to the recipe's (`sampling.*` in stepwise/config/schema.py);
    `engine_args` go to `vllm.LLM` as they are (e.g. enforce_eager=True).
    NOT RUN HERE (no GPU, no vllm): see the module docstring.
    """

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, replica: int = 0, tensor_parallel_size: int | None = None,
                 gpu_memory_utilization: float | None = None, max_num_seqs: int | None = None,
                 dtype: str = "auto", **engine_args):
        import torch
        import vllm

        from stepwise.sampling.hf import load_tokenizer

        given = {"tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                 "max_num_seqs": max_num_seqs}
        settings = {**recipe_defaults(), **{key: value for key, value in given.items() if value is not None}}
        self.vllm = vllm
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_ids = eos_token_ids(self.tokenizer, load_generation_config(model_dir), model_dir)
        devices = replica_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count(), replica,
                                  settings["tensor_parallel_size"])
        with visible_devices(devices):
            self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
                                distributed_executor_backend="mp", enable_prefix_caching=True,
                                logprobs_mode=LOGPROBS_MODE, generation_config="vllm", **settings, **engine_args)

    def close(self) -> None:
        if self.llm is None:
            return
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:  # the engine core process and its GPU workers
            engine_core.shutdown()
        self.llm = None
        gc.collect()

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        self.check_call(self.llm is not None, params)
        if not prompts:
            return []
        requests = engine_requests(encode_prompts(self.tokenizer, prompts), params, self.eos_ids)
        outputs = self.llm.generate([{"prompt_token_ids": request.prompt_ids} for request in requests],
                                    [self.vllm.SamplingParams(**request.sampling) for request in requests],
                                    use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        completions = engine_completions(self.tokenizer, [output.outputs[0] for output in outputs], self.eos_ids,
                                         params.stop)
        results: list[list[Completion]] = [[] for _ in prompts]
        for request, completion in zip(requests, completions):
            results[request.prompt_index].append(completion)
        return results
