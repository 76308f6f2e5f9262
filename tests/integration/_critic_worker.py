"""Worker: a random tiny critic saved as a megatron checkpoint (with hf/ metadata) in OUT/critic,
and (ids, head logits) in OUT/logits.pt.   python _critic_worker.py OUT"""
import sys
from pathlib import Path

import torch

from stepwise.checkpoint.layout import save_hf_metadata
from stepwise.checkpoint.state import save_checkpoint
from stepwise.models.builder import EngineOptions
from stepwise.models.critic import build_critic_model
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel

HF = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=40, hidden_size=32, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
          initializer_range=0.2, rms_norm_eps=1e-6, rope_theta=10000.0)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    init_parallel(1, 1, seed=5)
    model = build_critic_model(arch_from_hf_dict(HF), EngineOptions())
    with torch.no_grad():
        model.output_layer.bias.fill_(0.3)
    save_checkpoint(out / "critic", 1, model, meta={"model_kind": "critic", "dtype": "float32"})
    save_hf_metadata(out / "critic", HF, None)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, torch.arange(12)[None].expand(2, -1), None)[..., 0]
    torch.save((ids, logits), out / "logits.pt")
