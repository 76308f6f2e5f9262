"""Step boundaries at token positions (stepwise.tasks.steps) with a byte-level BPE trained here on text
where merges cross step boundaries: each step's slice decodes to the sampled text, the slices add up to
the whole, a blank line is never a step, and a token holding a separator run's end with the next step's
first characters moves the boundary to its end."""
from __future__ import annotations

import random

import pytest

from stepwise.tasks.steps import separator_run_ends, step_ends


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE without the pre-tokenizer's regex split, so "7\\n\\n7" can become one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(f"{a}+{b}={(a + b) % 10}\n\n{(a + b) % 10}*2={(a + b) * 2 % 10}\n\nA: {(a + b) * 2 % 10} é")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def decode(tokenizer, ids):
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", ["3+4=7\n\n7*2=4\n\nA: 4 é", "3+4=7\n\n\n\n7*2=4\n", "\n\n3+4=7", "3+4=7", "é\n\né"])
def test_each_steps_slice_decodes_to_its_text_and_the_slices_make_the_whole(bpe, text):
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    ends = step_ends(ids, bpe, "\n")
    assert ends[-1] == len(ids) and ends == sorted(set(ends))
    pieces = [decode(bpe, ids[start:end]) for start, end in zip([0] + ends[:-1], ends)]
    assert "".join(pieces) == text
    assert all(piece.strip("\n") for piece in pieces)  # no empty step for a blank line
    runs = separator_run_ends(text, "\n")
    assert len(pieces) <= len(runs) + 1
    for end in ends[:-1]:  # every boundary closes a token that holds the end of a separator run
        before, through = len(decode(bpe, ids[:end - 1])), len(decode(bpe, ids[:end]))
        assert any(before < run_end <= through for run_end in runs), (end, text)


def test_a_token_holding_a_runs_end_and_the_next_steps_text_moves_the_boundary_to_its_end(bpe):
    text = "3+4=7\n\n7*2=4\n\nA: 4 é"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert "*2=4\n\nA: 4 é" in [decode(bpe, [i]) for i in ids]  # this tokenizer merges across a boundary
    ends = step_ends(ids, bpe, "\n")
    steps = [decode(bpe, ids[start:end]) for start, end in zip([0] + ends[:-1], ends)]
    assert steps == ["3+4=7\n\n", "7*2=4\n\nA: 4 é"]
    apart = [i for step in ("3+4=7\n\n", "7*2=4\n\n", "A: 4 é") for i in bpe(step, add_special_tokens=False)["input_ids"]]
    assert apart != ids  # why states and actions must be slices of the sampled ids, never re-tokenised text


def test_separator_runs_and_empty_input():
    assert separator_run_ends("a\n\nb\nc\n", "\n") == [3, 5, 7]
    assert separator_run_ends("\n\na", "\n") == []
    assert step_ends([], None, "\n") == []
    with pytest.raises(ValueError, match="separator must not be empty"):
        separator_run_ends("a", "")


def test_the_embedded_tasks_tokenizer_cuts_the_steps_of_the_text(tmp_path):
    from stepwise.tasks.tokenizer import load_tokenizer, train_task_tokenizer

    response = "3+4=7\n7*2=4\n\nA: 4"
    tokenizer = load_tokenizer(train_task_tokenizer([response, "Q: 1+2\n1+2=3\nA: 3"], tmp_path / "tok", vocab_size=40))
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(response)  # character level: one token per character
    ends = step_ends(ids, tokenizer, "\n")
    assert [tokenizer.decode(ids[start:end]) for start, end in zip([0] + ends[:-1], ends)] == \
        ["3+4=7\n", "7*2=4\n\n", "A: 4"]
