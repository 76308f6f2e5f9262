"""The task tokenizer: deterministic training, exact round trips, AutoTokenizer parity with
sentencepiece, also beside a qwen2 config.json (as in an HF export); bad input is rejected."""
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
    problems = make_problems(config, 300, "train") + make_problems(config, 50, "test")
    records = make_sft_records(config, problems)
    return (corpus(config) + [r["prompt"] + r["response"] for r in records]
            + [p["problem"] + p["solution"] for p in problems])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts):
    return train_task_tokenizer(texts, tmp_path_factory.mktemp("tok"))


def test_training_is_deterministic_and_leaves_no_staging_files(tmp_path, texts, tokenizer_dir):
    again = train_task_tokenizer(texts, tmp_path)
    names = sorted(path.name for path in again.iterdir())
    assert names == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    for name in names:
        assert filecmp.cmp(again / name, tokenizer_dir / name, shallow=False), name


@pytest.mark.parametrize("beside_qwen2_config", [False, True])
def test_autotokenizer_matches_sentencepiece_and_round_trips(tmp_path, texts, tokenizer_dir, beside_qwen2_config):
    directory = tokenizer_dir
    if beside_qwen2_config:  # transformers 5 then builds a Qwen2Tokenizer from tokenizer.json
        directory = tmp_path / "export"
        load_tokenizer(tokenizer_dir).save_pretrained(directory)
        (directory / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
        Qwen2Config(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                    intermediate_size=8).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    for text in texts + ["Q:  1\n\n2 ", " A: 3\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == processor.encode(text), text
        assert tokenizer.decode(ids) == text == processor.decode(ids)


def test_small_vocab_with_distinct_eos_and_pad_and_no_bos(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == 3 + 10 + len("+-*=:QA \n")  # specials, digits, the rest: one id each
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token is None
    assert tokenizer("Q: 1+2\n")["input_ids"] == tokenizer("Q: 1+2\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer("A: 3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A: 3"


def test_unknown_characters_fuse_into_one_unk_like_sentencepiece(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    for text in ["x.y", "1 x 2", "é1", "Q: 1/2\n"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text), text
    assert tokenizer("x.y", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_other_ascii_whitespace_round_trips(tmp_path):
    directory = train_task_tokenizer(["a\tb\r\nc", "12"], tmp_path)
    tokenizer = load_tokenizer(directory)
    assert len(tokenizer) == 3 + len("a\tb\r\nc12")
    assert tokenizer.decode(tokenizer("c\t\r\n21ab", add_special_tokens=False)["input_ids"]) == "c\t\r\n21ab"


@pytest.mark.parametrize("texts, vocab_size, message", [
    ([], None, "non-empty list"),
    ("Q: 1+2", None, "non-empty list"),
    (["ok", "caf\u00e9"], None, r"texts\[1\] has the non-ASCII character 'é'"),
    (["   "], None, "no characters besides spaces"),
    (["Q: 1+2\n"], 8, "vocab_size=8 is too small; the texts need 10"),
])
def test_bad_training_input_is_rejected(tmp_path, texts, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        train_task_tokenizer(texts, tmp_path / "tok", vocab_size=vocab_size)
    assert not (tmp_path / "tok").exists()


def test_vocab_size_is_an_upper_bound(tmp_path):
    tokenizer = load_tokenizer(train_task_tokenizer(["Q: 1+2\n"], tmp_path, vocab_size=64))
    assert len(tokenizer) == 10


def test_missing_or_empty_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="empty: cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
