"""What every sampling backend shares between its caller and its model: prompts in, `Completion`s out.

A prompt is either a string (encoded with `tokenizer(prompt, add_special_tokens=False)`) or a
non-empty list of token ids used exactly as given, e.g. the ids the policy sampled, which a completer
continues without re-tokenising text. Either way its seeding key text (`sample_key`'s `prompt`) is a
string: the prompt itself, or the ids' decoding with nothing skipped or cleaned up, so with a
tokenizer that round-trips, passing a text's ids samples exactly what passing the text does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence, Union

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
