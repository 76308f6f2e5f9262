"""GPU-only engine checks (marked `gpu`, skipped without CUDA): bf16 + distributed optimizer, and
Transformer Engine + FP8 when TE is installed (more TE checks: test_te.py). Not run yet: no GPU was lent."""
from __future__ import annotations

import importlib.util
from functools import partial

import pytest
import torch

from stepwise import losses
from stepwise.config.schema import FP8Config, ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel
from stepwise.train.engine import build_engine
from stepwise.train.sft_data import SFTBatches

pytestmark = pytest.mark.gpu
SHAPE = dict(model_type="qwen2", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=512, tie_word_embeddings=False)


def train_losses(model_config: ModelConfig, steps: int = 8, shape: dict = SHAPE, init=None) -> list[float]:
    """The loss of each of `steps` SFT steps on a fixed random batch, from random weights or checkpoint `init`."""
    from stepwise.checkpoint.state import load_checkpoint

    layout = init_parallel(1, 1, seed=3)
    train = TrainConfig(global_batch_size=8, micro_batch_size=4)
    train.optim.lr = 1e-3
    engine = build_engine(arch_from_hf_dict(shape), model_config, ParallelConfig(), train, layout, steps)
    if init is not None:
        load_checkpoint(init, engine.model)
        engine.optimizer.reload_model_params()
    generator = torch.Generator().manual_seed(0)
    sequences = [{"ids": torch.randint(0, shape["vocab_size"], (64,), generator=generator).tolist(), "mask": [1] * 64}
                 for _ in range(8)]
    batches = SFTBatches(sequences, 0, 64, 4)
    plugin = losses.get("sft")
    loss_fn = partial(plugin.compute, plugin.parse_options({}))
    return [engine.train_step(batches.micro_batches(list(range(8)), 0, 1), loss_fn)["loss"] for _ in range(steps)]


def test_bf16_distributed_optimizer_trains():
    history = train_losses(ModelConfig(dtype="bfloat16", max_seq_len=64))
    assert history[-1] < history[0]


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="Transformer Engine not installed")
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_trains_with_transformer_engine(recipe):
    history = train_losses(ModelConfig(dtype="bfloat16", max_seq_len=64, fp8=FP8Config(enabled=True, recipe=recipe)))
    assert history[-1] < history[0]
