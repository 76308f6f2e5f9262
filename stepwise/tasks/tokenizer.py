"""Tokenizers: load a Hugging Face tokenizer from a model directory, or train the embedded task's
character-level sentencepiece model and save it in Hugging Face format.

The task tokenizer is trained with sentencepiece (single thread, identity normalisation, every
character its own piece, so same texts -> byte-identical model) and mirrored as a `tokenizer.json`
that `AutoTokenizer` loads with the same ids: a byte-level BPE without merges, one id per character,
consecutive unknown characters fused into one `<unk>` as sentencepiece does. transformers 5 forces
its Qwen2Tokenizer (byte-level, no unk) on any directory whose config.json says `qwen2`, whatever
`tokenizer_config.json` declares; a byte-level mirror is the form that survives that (there, text
made of trained characters keeps its ids; unknown characters are dropped instead of `<unk>`).
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2
SPACE = "\u2581"  # sentencepiece's visible space
SPM_FILE = "tokenizer.model"


def _check_texts(texts: list[str]) -> list[str]:
    """The distinct characters of `texts`; ValueError on empty or non-ASCII input."""
    if isinstance(texts, str) or not texts:
        raise ValueError("train_task_tokenizer: `texts` must be a non-empty list of strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"train_task_tokenizer: texts[{index}] is {type(text).__name__}, not a string")
        if not text.isascii():
            bad = next(c for c in text if not c.isascii())
            raise ValueError(f"train_task_tokenizer: texts[{index}] has the non-ASCII character {bad!r}; "
                             "the task tokenizer is character-level over ASCII")
    characters = sorted({c for text in texts for c in text})
    if not "".join(characters).strip(" "):
        raise ValueError("train_task_tokenizer: `texts` hold no characters besides spaces")
    return characters


def _train_spm(texts: list[str], vocab_size: int | None) -> bytes:
    import sentencepiece as spm

    characters = _check_texts(texts)
    needed = len(SPECIALS) + len(set(characters) | {"\n"})  # "\n" is always a piece
    if vocab_size is not None and vocab_size < needed:
        raise ValueError(f"train_task_tokenizer: vocab_size={vocab_size} is too small; the texts need {needed} "
                         f"ids ({len(SPECIALS)} specials and one per character, newline included)")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="char",
        vocab_size=needed,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1,
        seed_sentencepiece_size=1000,
        minloglevel=2,
    )
    return model.getvalue()


def byte_symbol(byte: int) -> str:
    """The printable stand-in byte-level BPE uses for a byte (GPT-2 / Qwen2 convention)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if byte in printable:
        return chr(byte)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(byte))


def _piece_symbol(piece: str) -> str:
    if piece in SPECIALS:
        return piece
    text = " " if piece == SPACE else piece
    return "".join(byte_symbol(b) for b in text.encode("utf-8"))


def _hf_tokenizer(spm_model: bytes):
    """A byte-level BPE with no merges over the spm pieces: same ids, and the layout transformers'
    Qwen2Tokenizer re-creates, so a qwen2 config.json beside it changes nothing."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    vocab = {_piece_symbol(processor.id_to_piece(i)): i for i in range(processor.get_piece_size())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    # no regex split: the whole text is one word, so runs of unknown characters fuse as in spm
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def train_task_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int | None = None) -> Path:
    """Train the character-level sentencepiece model on `texts`; write spm + HF files to `out_dir`.

    One id per distinct character plus `<pad>` (0), `</s>` (1), `<unk>` (2); `vocab_size`, when given,
    is an upper bound (ValueError when the characters need more ids).
    """
    from stepwise.data.jsonl import atomic_write_bytes

    out = Path(out_dir)
    spm_model = _train_spm(texts, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-") as staging:  # each file lands whole
        _hf_tokenizer(spm_model).save_pretrained(staging)
        for file in sorted(Path(staging).iterdir()):
            os.replace(file, out / file.name)
    atomic_write_bytes(out / SPM_FILE, spm_model)
    return out


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a model or tokenizer directory (offline)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory not found")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:
        raise RuntimeError(f"{path}: cannot load a tokenizer ({error})") from error
