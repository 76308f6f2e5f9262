"""The training engine: GPTModel + megatron DDP + megatron optimizer + LR scheduler, and one step.

Gradients are *summed* over micro-batches and DP ranks (`calculate_per_token_loss=True`, DDP scaling
factor 1): loss plugins already divide by a global-batch normaliser. The step runs megatron's own
pipeline schedule (`get_forward_backward_func`), so PP > 1 uses 1F1B with p2p between stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.hf_config import ModelArch
from stepwise.parallel.runtime import Layout
from stepwise.train.logprobs import token_logprobs


def engine_options(model: ModelConfig, parallel: ParallelConfig) -> EngineOptions:
    return EngineOptions(
        tp=parallel.tp,
        pp=parallel.pp,
        dtype=model.dtype,
        sequence_parallel=parallel.sequence_parallel and torch.cuda.is_available(),
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        fp8=model.fp8.enabled,
        fp8_recipe=model.fp8.recipe,
        fp8_margin=model.fp8.margin,
        fp8_amax_history_len=model.fp8.amax_history_len,
        recompute_activations=model.recompute_activations,
    )


def _finalize_grads(models, num_tokens=None, *args, **kwargs):
    """DP all-reduce (sum) + tied-embedding / SP grad sync, without megatron's per-token rescale."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(models, None)


@dataclass
class Engine:
    model: Any  # megatron DDP-wrapped GPTModel
    optimizer: Any
    scheduler: Any
    arch: ModelArch
    layout: Layout
    seq_length_cap: int
    kind: str = "policy"  # "critic": outputs are value-head logits, not token log-probs

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Callable) -> list[dict]:
        """Accumulate gradients of `micro_batches` (summed, DP-reduced) into the grad buffers."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        return get_forward_backward_func()(
            forward_step_func=self._forward_step(loss_fn),
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["input_ids"].shape[1],
            micro_batch_size=micro_batches[0]["input_ids"].shape[0],
            forward_only=False,
        )

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Callable) -> dict[str, float]:
        """One optimizer step over `micro_batches` (this DP rank's share of a global batch)."""
        losses = self.forward_backward(micro_batches, loss_fn)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        metrics = self._reduce_metrics(losses)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["skipped"] = 0.0 if updated else 1.0
        return metrics

    def _forward_step(self, loss_fn: Callable):
        device = self.layout.device
        vocab = self.arch.vocab_size

        def forward_step(data_iterator, model):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
            output = model(batch["input_ids"], batch["position_ids"], None)

            def loss_func(logits):
                if self.kind == "critic":
                    outputs = logits.squeeze(-1)
                else:
                    outputs = token_logprobs(logits, batch["labels"], vocab)
                loss, metrics = loss_fn(batch, outputs)
                metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}
                return loss, torch.ones((), dtype=torch.int, device=device), metrics

            return output, loss_func

        return forward_step

    def _reduce_metrics(self, per_micro_batch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum metrics over micro-batches and DP ranks (last stage holds them; TP ranks agree)."""
        local: dict[str, float] = {}
        for item in per_micro_batch:
            for name, value in item.items():
                local[name] = local.get(name, 0.0) + float(value)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        names = [sorted(local)]
        dist.broadcast_object_list(names, src=dist.get_world_size() - 1)  # the last rank is a last-stage rank
        values = torch.tensor([local.get(n, 0.0) for n in names[0]], dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(values)
        return dict(zip(names[0], (values / self.layout.tp).tolist()))


def build_engine(
    arch: ModelArch, model_config: ModelConfig, parallel: ParallelConfig, train: TrainConfig, layout: Layout,
    total_steps: int, kind: str = "policy",
) -> Engine:
    """Model (policy or critic), DDP wrapper, megatron optimizer and scheduler for `total_steps` steps."""
    from stepwise.models.critic import build_critic_model
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    options = engine_options(model_config, parallel)
    builder = build_critic_model if kind == "critic" else build_gpt_model
    model = builder(arch, options, max_seq_len=model_config.max_seq_len)
    config = model.config
    distributed_optimizer = parallel.use_distributed_optimizer and torch.cuda.is_available()
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
        ),
        model,
    )
    config.finalize_model_grads_func = _finalize_grads
    optim = train.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=model_config.dtype == "bfloat16",
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    warmup = int(optim.warmup_fraction * total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.schedule != "constant" else optim.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=optim.schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return Engine(ddp, optimizer, scheduler, arch, layout, model_config.max_seq_len, kind)
