"""What every sampling backend shares between its caller and its model: prompts in, `Completion`s out.

Prompts. A prompt is either a string (encoded with `tokenizer(prompt, add_special_tokens=False)`) or a
non-empty list of token ids used exactly as given, e.g. the ids the policy sampled, which a completer
continues without re-tokenising text. Either way its seeding key text (`sample_key`'s `prompt`) is a
string: the prompt itself, or the ids' decoding with nothing skipped or cleaned up, so with a
tokenizer that round-trips, passing a text's ids samples exactly what passing the text does.

Completions. A backend reports, per completion, its token ids, their log-probs and why it ended;
`completions_from_tokens` turns that into `Completion`s the one way every backend shares: the text
is the decoding of the ids (specials skipped, the final eos token left out), cut just before the
earliest stop string when a stop string ended it. `engine_completions` reads vLLM's `CompletionOutput`s
(their `token_ids`, `logprobs`, `finish_reason`, `stop_reason`) into those same fields.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

from stepwise.sampling.base import Completion

Prompt = Union[str, list[int]]

# Valid UTF-8 never contains the byte 0xff, so it marks token-id prompts apart from any string prompt.
_ID_PROMPT_MARK = b"\xff"


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as the model sees it (`ids`) and the text that keys its random streams (`key_text`)."""

    ids: list[int]
    key_text: str


def prompt_problem(prompt: Any) -> str | None:
    """What makes `prompt` unusable (not a string, nor a non-empty list of token ids >= 0), else None."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, (list, tuple)):
        return f"must be a string or a list of token ids, got {type(prompt).__name__}"
    if not prompt:
        return "is an empty list of token ids"
    for position, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            return f"has token id {token!r} at position {position}; token ids are integers >= 0"
    return None


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[EncodedPrompt]:
    """The ids and key text of each prompt; string prompts are encoded in one batch."""
    for index, prompt in enumerate(prompts):
        problem = prompt_problem(prompt)
        if problem:
            raise ValueError(f"prompt {index} {problem}")
    texts = [index for index, prompt in enumerate(prompts) if isinstance(prompt, str)]
    encoded = tokenizer([prompts[i] for i in texts], add_special_tokens=False)["input_ids"] if texts else []
    text_ids = dict(zip(texts, encoded))
    result = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not text_ids[index]:
                raise ValueError(f"prompt {index} encodes to no tokens; every prompt needs at least one")
            result.append(EncodedPrompt(ids=list(text_ids[index]), key_text=prompt))
        else:
            ids = [int(token) for token in prompt]
            result.append(EncodedPrompt(ids=ids, key_text=tokenizer.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)))
    return result


def prompt_digest_bytes(prompt: Prompt) -> bytes:
    """The bytes a settings digest takes for `prompt`: its UTF-8 for text (as before id prompts
    existed, so earlier runs resume), a 0xff mark and the JSON ids for token ids; NUL-terminated."""
    if isinstance(prompt, str):
        return prompt.encode("utf-8") + b"\x00"
    return _ID_PROMPT_MARK + json.dumps([int(token) for token in prompt]).encode("ascii") + b"\x00"


def eos_token_ids(tokenizer, generation_config, model_dir: str | os.PathLike) -> list[int]:
    """The ids that end a completion of `model_dir`: the tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError(f"{model_dir}: neither the tokenizer nor the generation config names an eos token")
    return sorted(int(token) for token in ids)


def load_generation_config(model_dir: str | os.PathLike):
    """`model_dir`'s generation config as `from_pretrained` gives a model: generation_config.json, else
    the one derived from config.json."""
    from transformers import AutoConfig, GenerationConfig

    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        return GenerationConfig.from_pretrained(model_dir)
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` cut just before the earliest stop string in it, or None when it holds none."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else None


def completions_from_tokens(tokenizer, token_ids: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]],
                            reasons: Sequence[str], stop: Sequence[str]) -> list[Completion]:
    """One `Completion` per row (its ids, their log-probs, its finish reason), texts decoded in one batch."""
    ids = [list(row) for row in token_ids]
    texts = tokenizer.batch_decode([row[:-1] if reason == "eos" else row for row, reason in zip(ids, reasons)],
                                   skip_special_tokens=True)
    completions = []
    for row, (text, reason) in enumerate(zip(texts, reasons)):
        if reason == "stop":
            cut = cut_at_stop(text, stop)
            if cut is None:
                raise ValueError(f"completion {row} ended on a stop string, but its decoded text {text!r} holds "
                                 f"none of {list(stop)} (the engine's detokenizer disagrees with the tokenizer)")
            text = cut
        completions.append(Completion(text=text, token_ids=ids[row], token_logprobs=[float(x) for x in logprobs[row]],
                                      finish_reason=reason))
    return completions


def engine_finish_reason(token_ids: Sequence[int], finish_reason: str | None, stop_reason: Any,
                         eos_ids: Sequence[int]) -> str:
    """Our finish reason for a vLLM completion. An eos token last means "eos" whatever vLLM says (vLLM
    reports "stop" with stop_reason None or the id; older versions "length" on the last allowed token);
    "stop" with a string stop_reason means a stop string; "length" means max_tokens."""
    if token_ids and token_ids[-1] in eos_ids:
        return "eos"
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop"
    if finish_reason == "length":
        return "length"
    raise ValueError(f"vLLM completion finished with finish_reason={finish_reason!r}, stop_reason={stop_reason!r} "
                     f"and last token {token_ids[-1] if token_ids else None} (eos ids {list(eos_ids)}): not an eos "
                     f"token, a stop string or max_tokens")


def engine_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position {token id: Logprob} entries."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned {None if logprobs is None else len(logprobs)} log-prob entries for "
                         f"{len(token_ids)} tokens; the request must ask for logprobs=0")
    return [float(logprobs[position][token].logprob) for position, token in enumerate(token_ids)]


def engine_completions(tokenizer, outputs: Sequence[Any], eos_ids: Sequence[int],
                       stop: Sequence[str]) -> list[Completion]:
    """`Completion`s of vLLM `CompletionOutput`s (anything with their `token_ids`, `logprobs`,
    `finish_reason` and `stop_reason`), mapped exactly as the HF backend builds its own."""
    token_ids = [list(output.token_ids) for output in outputs]
    reasons = [engine_finish_reason(ids, output.finish_reason, output.stop_reason, eos_ids)
               for ids, output in zip(token_ids, outputs)]
    logprobs = [engine_logprobs(ids, output.logprobs) for ids, output in zip(token_ids, outputs)]
    return completions_from_tokens(tokenizer, token_ids, logprobs, reasons, stop)
