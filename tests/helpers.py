"""Tiny random-weight HF models with the shape ratios of real checkpoints (no hub access needed)."""
from __future__ import annotations

from pathlib import Path

import torch

# Qwen2.5-0.5B-Instruct ratios: 14 heads / 2 KV heads (7:1 GQA), head_dim 64 scaled to 4, tied.
QWEN25_SMALL = dict(hidden_size=56, num_attention_heads=14, num_key_value_heads=2, intermediate_size=152,
                    num_hidden_layers=2, tie_word_embeddings=True)
# Qwen2-7B-Instruct ratios: 28 heads / 4 KV heads (7:1 GQA), untied.
QWEN2_7B_SMALL = dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, intermediate_size=296,
                      num_hidden_layers=2, tie_word_embeddings=False)
TOKENIZER_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2


def make_tiny_char_tokenizer(vocab_size: int):
    """A character-level tokenizer of exactly `vocab_size` ids: the specials, then printable ASCII.

    Written as a byte-level BPE without merges (one id per character), the form transformers 5
    keeps when it re-creates a Qwen2 tokenizer beside a qwen2 config.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stepwise.tasks.tokenizer import byte_symbol

    characters = [chr(c) for c in range(32, 127)][: vocab_size - len(TOKENIZER_SPECIALS)]
    pieces = list(TOKENIZER_SPECIALS) + [byte_symbol(ord(c)) for c in characters]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def make_tiny_hf_qwen2(directory: str | Path, dtype: torch.dtype = torch.float32, tie: bool = True,
                       seed: int = 0, vocab_size: int = 97) -> Path:
    """Save a random Qwen2ForCausalLM (large init so logits vary) and a char-level tokenizer to `directory`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = QWEN25_SMALL if tie else QWEN2_7B_SMALL
    tokenizer = make_tiny_char_tokenizer(vocab_size)
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=128, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so a transposed or dropped tensor shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
