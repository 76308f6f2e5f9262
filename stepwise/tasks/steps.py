"""Step boundaries as token positions of the tokens a policy sampled, computed in one place.

A reasoning step ends after a run of separators ("3+4=7\n\n7*2=4" is the steps "3+4=7\n\n" and "7*2=4",
never an empty step for the blank line). The boundary is a token position, so that a state is a prefix
and an action a slice of the sampled token ids: re-tokenising text gives other ids wherever a BPE merge
crosses a step boundary (Qwen2.5 writes "\n\n" between steps). Where one token holds the end of a
separator run together with the text after it, the boundary moves to that token's end.
"""
from __future__ import annotations

import hashlib

LOOKBACK = 6  # tokens of context for decoding one token's text (multi-byte characters, leading spaces)


def token_end_offsets(token_ids: list[int], tokenizer) -> tuple[str, list[int]]:
    """(the decoded text, the character offset where each token's text ends). Each token's text is what it
    adds to the decoding of a few tokens before it (as incremental detokenizers do); where the pieces do
    not add up to the whole decoding, offsets come from decoding every prefix (exact, slower)."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(token_ids)
    ends, offset = [], 0
    for k in range(len(token_ids)):
        start = max(0, k - LOOKBACK)
        offset += len(decode(token_ids[start:k + 1])) - len(decode(token_ids[start:k]))
        ends.append(offset)
    if offset != len(text) or any(not text.startswith(decode(token_ids[:k + 1])) for k in _probes(len(token_ids))):
        ends = [len(decode(token_ids[:k + 1])) for k in range(len(token_ids))]
    return text, ends


def _probes(n: int) -> list[int]:
    """A few prefix lengths whose decoding is checked against the incremental offsets."""
    return sorted({0, n // 2, n - 1} - {-1}) if n else []


def separator_run_ends(text: str, separator: str) -> list[int]:
    """Character offsets just after each maximal run of `separator` (a run at the very start is no step)."""
    if not separator:
        raise ValueError("the step separator must not be empty")
    ends, position = [], text.find(separator)
    while position != -1:
        end = position + len(separator)
        while text.startswith(separator, end):
            end += len(separator)
        if position > 0:  # runs are maximal, so only a run at offset 0 has no step before it
            ends.append(end)
        position = text.find(separator, end)
    return ends


def step_ends(token_ids: list[int], tokenizer, separator: str) -> list[int]:
    """The exclusive end index in `token_ids` of each step; the last is len(token_ids) (a text ending in
    a separator run has no empty last step). Empty ids have no steps."""
    if not token_ids:
        return []
    text, ends = token_end_offsets(token_ids, tokenizer)
    boundaries, k = [], 0
    for char_end in separator_run_ends(text, separator):
        while k < len(ends) and ends[k] < char_end:  # the token holding the run's last character
            k += 1
        if k + 1 < len(token_ids) and (not boundaries or boundaries[-1] < k + 1):
            boundaries.append(k + 1)
    return boundaries + [len(token_ids)]


def encode_text(tokenizer, text: str) -> list[int]:
    """The token ids of a text the pipeline wrote (a prompt), exactly as the samplers encode prompts."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode_ids(tokenizer, token_ids: list[int]) -> str:
    """The text of token ids, byte for byte (no special-token skipping, no clean-up of spaces)."""
    return tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def ids_key(*token_ids: list[int]) -> str:
    """A stable id of one or more token-id sequences (two sequences that decode alike stay apart)."""
    digest = hashlib.sha1()
    for ids in token_ids:
        digest.update(",".join(map(str, ids)).encode() + b";")
    return digest.hexdigest()[:16]


def text_ids(sample: dict) -> list[int]:
    """A sample's sampled token ids without the eos that ended it (the ids of its text and steps)."""
    ids = sample["token_ids"]
    return ids[:-1] if sample["finish_reason"] == "eos" else ids


def target_ids(sample: dict, eos_id: int) -> list[int]:
    """A sample's sampled token ids ending in eos: the sampled one, or `eos_id` appended to a sample cut
    by `max_tokens` or a stop string (every method trains on prompt + response + eos)."""
    return sample["token_ids"] if sample["finish_reason"] == "eos" else sample["token_ids"] + [eos_id]


def step_slices(token_ids: list[int], tokenizer, separator: str) -> list[tuple[int, int]]:
    """(start, end) of each step of `token_ids` (see `step_ends`)."""
    ends = step_ends(token_ids, tokenizer, separator)
    return list(zip([0] + ends[:-1], ends))


def retokenize_pieces(ids: list[int], ends: list[int], decode, encode) -> tuple[list[int], list[int]]:
    """(ids, ends) in another tokenizer: each piece between consecutive `ends` (and the tail after the
    last) decoded by `decode` and re-encoded by `encode`, so every end stays a piece boundary. For a
    critic whose tokenizer is not the policy's (a Qwen critic of a Llama policy): a state is then the
    same text in the critic's tokens, whether it is read as a state of its solution or as a next state."""
    bounds, new_ids, new_ends = [0, *ends, len(ids)], [], []
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            new_ids += encode(decode(ids[start:end]))
        if index < len(ends):
            new_ends.append(len(new_ids))
    return new_ids, new_ends
