"""The task tokenizer: deterministic training, exact round trips, AutoTokenizer parity with
sentencepiece, also beside a qwen2 config.json (as in an HF export)."""
from __future__ import annotations

import filecmp

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, Qwen2Config

from stepwise.tasks.arith import ArithConfig, corpus, make_problems, make_sft_records
from stepwise.tasks.tokenizer import load_tokenizer, train_task_tokenizer


@pytest.fixture(scope="module")
def texts():
    config = ArithConfig(seed=5)
    records = make_sft_records(config, make_problems(config, 300, "train"))
    return corpus(config) + [r["prompt"] + r["response"] for r in records]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts):
    return train_task_tokenizer(texts, tmp_path_factory.mktemp("tok"))


def test_training_is_deterministic(tmp_path, texts, tokenizer_dir):
    again = train_task_tokenizer(texts, tmp_path)
    for name in ("tokenizer.model", "tokenizer.json"):
        assert filecmp.cmp(again / name, tokenizer_dir / name, shallow=False)


@pytest.mark.parametrize("beside_qwen2_config", [False, True])
def test_autotokenizer_matches_sentencepiece_and_round_trips(tmp_path, texts, tokenizer_dir, beside_qwen2_config):
    directory = tokenizer_dir
    if beside_qwen2_config:
        directory = tmp_path / "export"
        load_tokenizer(tokenizer_dir).save_pretrained(directory)
        Qwen2Config(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                    intermediate_size=8).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == processor.encode(text)
        assert tokenizer.decode(ids) == text


def test_small_vocab_with_distinct_eos_and_pad_and_no_bos(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) < 40
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer("Q: 1+2\n")["input_ids"] == tokenizer("Q: 1+2\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer("A: 3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A: 3"


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
