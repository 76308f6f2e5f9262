"""The engine's optimizer on CPU: torch's fused AdamW kernel, AdamW's update (to rounding), switched only
where every parameter is a floating-point CPU tensor and no step has been taken."""
from types import SimpleNamespace

import torch

from stepwise.train.fused_adam import torch_optimizers, use_fused_cpu_adam


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def trained(fuse: bool, steps: int = 6) -> list[torch.Tensor]:
    """Parameters after `steps` AdamW steps on seeded gradients, through a megatron-shaped holder."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in ((17, 9), (9,), (3, 4, 5))]
    megatron_like = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adamw(params))])
    if fuse:
        assert use_fused_cpu_adam(megatron_like) == 1
    inner = torch_optimizers(megatron_like)[0]
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        inner.step()
    return [param.detach() for param in params]


def test_the_fused_kernel_takes_adamw_s_steps(monkeypatch):
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    fused = trained(fuse=True)
    assert len(calls) == 6  # one kernel call per step, over all three tensors
    for ours, loop in zip(fused, trained(fuse=False)):
        assert not torch.equal(ours, torch.zeros_like(ours))
        # measured ~3e-8 relative (the kernel rounds in its own order): far inside 1e-6
        torch.testing.assert_close(ours, loop, rtol=1e-6, atol=1e-7)


def test_only_fresh_cpu_float_adam_is_switched():
    on_meta = adamw([torch.nn.Parameter(torch.empty(3, device="meta"))])
    stepped_params = [torch.nn.Parameter(torch.ones(3))]
    stepped = adamw(stepped_params)
    stepped_params[0].grad = torch.ones(3)
    stepped.step()
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    holder = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=o) for o in (on_meta, stepped, sgd)])
    assert use_fused_cpu_adam(holder) == 0
    assert not on_meta.param_groups[0]["fused"] and not stepped.param_groups[0]["fused"]


def test_the_engine_s_optimizer_steps_through_the_fused_kernel(monkeypatch):
    from functools import partial

    from stepwise import losses
    from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.parallel.runtime import init_parallel
    from stepwise.train.engine import build_engine

    layout = init_parallel(1, 1, seed=3)
    arch = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48))
    engine = build_engine(arch, ModelConfig(max_seq_len=16, dtype="float32"), ParallelConfig(),
                          TrainConfig(global_batch_size=2, micro_batch_size=2), layout, total_steps=10)
    assert all(group["fused"] for inner in torch_optimizers(engine.optimizer) for group in inner.param_groups)
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 8),
             "position_ids": torch.arange(8).expand(2, -1), "normalizer": torch.tensor(16.0)}
    before = [p.detach().clone() for p in engine.model.parameters()]
    plugin = losses.get("sft")
    metrics = engine.train_step([batch], partial(plugin.compute, plugin.parse_options({})))
    assert metrics["skipped"] == 0.0 and calls
    assert any(not torch.equal(old, new) for old, new in zip(before, engine.model.parameters()))
