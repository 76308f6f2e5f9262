"""The sampling interface shared by every generation backend.

`SamplingParams` says what to sample, `Completion` is one sampled continuation, `Sampler` is the
abstract backend (`hf` on CPU or one GPU, `vllm` on the cluster) and `make_sampler` builds one by name.

A prompt is a string or a list of token ids used as given (`sampling.requests` turns either into
model ids and a key text, in one place for every backend).

Seeding contract (every backend must honour it): completion `i` of prompt `p` under `params.seed` is
drawn from a random stream keyed by `sample_key(params.seed, key_text(p), i)` alone, where key_text
is the string prompt or the decoding of an id prompt (`requests.encode_prompts`), so it does not
depend on the batch size, on the other prompts in the call, on the shard the prompt sits in or on
the worker that runs it. A vLLM backend honours it by sending each (prompt, sample index) as its own request with
`seed=sample_key(...)`; prefix caching makes the repeated prompts cheap.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

FINISH_REASONS = ("stop", "length", "eos")


@dataclass
class SamplingParams:
    """What to sample: `n` completions per prompt of at most `max_tokens` tokens each.

    temperature 0 means greedy decoding; top_k 0 and top_p 1 switch those filters off; `stop` strings
    end a completion, and its text is cut just before the first one (like vLLM's default).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"SamplingParams.stop must be a list of strings, got {self.stop!r}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {text!r}")
        self.stop = list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SamplingParams.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"SamplingParams.{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    `token_ids` are the generated tokens, including the final eos token when `finish_reason` is "eos"
    (its text is not in `text`). `token_logprobs[i]` is the log-probability of `token_ids[i]` under the
    distribution it was sampled from (after temperature, top-k and top-p; the plain model distribution
    when greedy).
    """

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Completion.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if len(self.token_ids) != len(self.token_logprobs):
            raise ValueError(f"Completion has {len(self.token_ids)} token_ids but "
                             f"{len(self.token_logprobs)} token_logprobs")


def sample_key(seed: int, prompt: str, sample_index: int) -> int:
    """The 63-bit random-stream key of completion `sample_index` of `prompt` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}\x00{sample_index}\x00{prompt}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Sampler(ABC):
    """A generation backend; also a context manager that calls `close` on exit."""

    name: str = "abstract"

    @abstractmethod
    def generate(self, prompts: list[str | list[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each already-templated prompt (a string, or a list of token ids
        used exactly as given), in prompt order."""

    def close(self) -> None:
        """Free the model and any devices or worker processes; the sampler is unusable afterwards."""

    def check_call(self, open_: bool, params: Any) -> None:
        """Refuse a `generate` call after `close` (`open_` False) or with params that are not SamplingParams."""
        if not open_:
            raise RuntimeError(f"{type(self).__name__}.generate called after close()")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _build_hf(model_dir: str | os.PathLike, **options) -> Sampler:
    from stepwise.sampling.hf import HFSampler

    return HFSampler(model_dir, **options)


def _build_vllm(model_dir: str | os.PathLike, **options) -> Sampler:
    try:
        importlib.import_module("vllm")
    except ImportError as error:
        raise RuntimeError(f"sampling backend 'vllm' needs the vllm package, which cannot be imported here "
                           f"({error}); install requirements-cluster.txt or use backend 'hf'") from None
    from stepwise.sampling.vllm import VLLMSampler

    return VLLMSampler(model_dir, **options)


SAMPLERS: dict[str, Callable[..., Sampler]] = {"hf": _build_hf, "vllm": _build_vllm}


def register_sampler(name: str, factory: Callable[..., Sampler]) -> None:
    """Make `make_sampler(name, model_dir, **options)` call `factory(model_dir, **options)`."""
    SAMPLERS[name] = factory


def make_sampler(backend: str, model_dir: str | os.PathLike, **options) -> Sampler:
    """Build the sampler `backend` ("hf" or "vllm") for the exported HF model in `model_dir`."""
    if backend not in SAMPLERS:
        raise ValueError(f"unknown sampling backend {backend!r}; valid backends: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[backend](model_dir, **options)
