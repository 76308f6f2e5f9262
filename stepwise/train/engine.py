"""The training engine: GPTModel + megatron DDP + megatron optimizer + LR scheduler, and one step.

Gradients are *summed* over micro-batches and DP ranks (`calculate_per_token_loss=True`, DDP scaling
factor 1): loss plugins already divide by a global-batch normaliser. The step runs megatron's own
pipeline schedule (`get_forward_backward_func`), so PP > 1 uses 1F1B with p2p between stages.

A step whose loss (on any rank) or gradient norm is not finite makes no update on any rank: the
flag travels in the same all-reduce as the step's metrics, before the optimizer would step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.hf_config import ModelArch
from stepwise.models.policy_value import split_policy_value
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
    kind: str = "policy"  # what loss plugins get: "policy" token log-probs, "critic" value-head logits,
    # "policy_value" {"logprobs", "values"} from one model (stepwise.models.policy_value)

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
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm() or 0.0)
        local_loss = sum(float(item["loss"]) for item in losses) if losses else 0.0
        bad = found_inf or not math.isfinite(local_loss) or not math.isfinite(grad_norm)
        metrics = self._reduce_metrics(losses, nonfinite=1.0 if bad else 0.0)
        nonfinite = metrics["nonfinite"] > 0  # any rank: every rank takes the same branch
        if not nonfinite:
            self._clip(grad_norm)
            self.optimizer.step_with_ready_grads()
            self.scheduler.step(increment=1)
        metrics["nonfinite"] = 1.0 if nonfinite else 0.0
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["skipped"] = 1.0 if nonfinite else 0.0
        return metrics

    def _clip(self, grad_norm: float) -> None:
        """Scale gradients by clip_grad / norm (megatron's own clip function, resolved at call time so
        the CPU shim's replacement applies), for each of the chained optimizers."""
        import megatron.core.optimizer.optimizer as megatron_optimizer

        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if getattr(optimizer, "is_stub_optimizer", False) or optimizer.config.clip_grad <= 0.0:
                continue
            parameters = optimizer.get_parameters()
            if parameters:
                megatron_optimizer.clip_grad_by_total_norm_fp32(
                    parameters, max_norm=optimizer.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)

    def _forward_step(self, loss_fn: Callable):
        device = self.layout.device
        vocab = self.arch.vocab_size

        def forward_step(data_iterator, model):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
            output = model(batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))

            def loss_func(logits):
                if self.kind == "critic":
                    outputs = logits.squeeze(-1)
                elif self.kind == "policy_value":
                    vocab_logits, values = split_policy_value(logits)
                    outputs = {"logprobs": token_logprobs(vocab_logits, batch["labels"], vocab), "values": values.float()}
                else:
                    outputs = token_logprobs(logits, batch["labels"], vocab)
                loss, metrics = loss_fn(batch, outputs)
                metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}
                return loss, torch.ones((), dtype=torch.int, device=device), metrics

            return output, loss_func

        return forward_step

    def _reduce_metrics(self, per_micro_batch: list[dict[str, torch.Tensor]], nonfinite: float) -> dict[str, float]:
        """Sum metrics over micro-batches and DP ranks (last stage holds them; TP ranks agree), and
        every rank's `nonfinite` flag (> 0 after the reduction when any rank raised it)."""
        local: dict[str, float] = {"nonfinite": nonfinite}
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
    total_steps: int, kind: str = "policy", value_arch: ModelArch | None = None,
) -> Engine:
    """Model (policy, critic, or policy_value: with a value head, or with a separate value network of
    `value_arch`), DDP wrapper, megatron optimizer and scheduler for `total_steps` steps."""
    from stepwise.models.critic import build_critic_model
    from stepwise.models.policy_value import build_policy_value_model, build_policy_with_value_network
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    options = engine_options(model_config, parallel)
    builder = {"critic": build_critic_model, "policy_value": build_policy_value_model}.get(kind, build_gpt_model)
    if value_arch is not None:
        model = build_policy_with_value_network(arch, value_arch, options, max_seq_len=model_config.max_seq_len)
    else:
        model = builder(arch, options, max_seq_len=model_config.max_seq_len)
    config = getattr(model, "pipeline_config", model.config)  # the schedule's p2p width comes from DDP's config
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
