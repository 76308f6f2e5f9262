"""Tokenizers: load a Hugging Face tokenizer from a model directory, or train the embedded task's
character-level sentencepiece model and save it in Hugging Face format.

The task tokenizer is trained with sentencepiece (single thread, identity normalisation, every
character its own piece, so same texts -> byte-identical model) and mirrored as a `tokenizer.json`
that `AutoTokenizer` loads with the same ids: a byte-level BPE without merges. transformers 5
forces its Qwen2Tokenizer (byte-level) on any directory whose config.json says `qwen2`, whatever
`tokenizer_config.json` declares; a byte-level mirror is the form that survives that.
"""
from __future__ import annotations

import io
from pathlib import Path

SPECIALS = ("<pad>", "</s>", "<unk>")
SPACE = "\u2581"  # sentencepiece's visible space


def _train_spm(texts: list[str], vocab_size: int | None) -> bytes:
    import sentencepiece as spm

    characters = sorted({c for text in texts for c in text} - {" "})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="char",
        vocab_size=vocab_size or len(characters) + len(SPECIALS) + 1,
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
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def train_task_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int | None = None) -> Path:
    """Train the character-level sentencepiece model on `texts`; write spm + HF files to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm_model = _train_spm(texts, vocab_size)
    (out / "tokenizer.model").write_bytes(spm_model)
    _hf_tokenizer(spm_model).save_pretrained(out)
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
