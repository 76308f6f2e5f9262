"""Weight table of the Llama-style decoders: Qwen2/2.5, Llama 3.x and Gemma 1.x.

The three families name their weights alike (`model.layers.{i}.self_attn.q_proj` ...) and differ in
numerics only (q/k/v biases, GeGLU, (1 + w) norms, scaled embeddings, llama3 rope), which the
megatron model reproduces itself (`stepwise.models.variants`); so one table serves all three, with
the bias and output rules following the architecture.
"""
from __future__ import annotations

from stepwise.convert.mapping import Rule
from stepwise.models.hf_config import ModelArch

ATTENTION = "model.layers.{i}.self_attn"
LAYER = "decoder.layers.{i}"


def decoder_rules(arch: ModelArch, value_head: bool = False) -> list[Rule]:
    """The table; `value_head` maps a critic (`*ForTokenClassification`, num_labels=1: `score`)."""
    rules = [
        Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab"),
        Rule(("model.layers.{i}.input_layernorm.weight",), f"{LAYER}.input_layernorm.weight"),
        Rule(tuple(f"{ATTENTION}.{p}_proj.weight" for p in "qkv"), f"{LAYER}.self_attention.linear_qkv.weight", "qkv"),
        Rule((f"{ATTENTION}.o_proj.weight",), f"{LAYER}.self_attention.linear_proj.weight"),
        Rule(("model.layers.{i}.post_attention_layernorm.weight",), f"{LAYER}.pre_mlp_layernorm.weight"),
        Rule(("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
             f"{LAYER}.mlp.linear_fc1.weight", "gate_up"),
        Rule(("model.layers.{i}.mlp.down_proj.weight",), f"{LAYER}.mlp.linear_fc2.weight"),
        Rule(("model.norm.weight",), "decoder.final_layernorm.weight"),
    ]
    if arch.qkv_bias:
        rules.append(Rule(tuple(f"{ATTENTION}.{p}_proj.bias" for p in "qkv"),
                          f"{LAYER}.self_attention.linear_qkv.bias", "qkv"))
    if value_head:
        rules += [Rule(("score.weight",), "output_layer.weight"), Rule(("score.bias",), "output_layer.bias")]
    elif not arch.tie_word_embeddings:
        rules.append(Rule(("lm_head.weight",), "output_layer.weight", "vocab"))
    return rules
