"""The training engine: GPTModel + megatron DDP + megatron optimizer + LR scheduler, and one step.

Gradients are *summed* over micro-batches and DP ranks (`calculate_per_token_loss=True`, DDP scaling
factor 1): loss plugins already divide by a global-batch normaliser. The step runs megatron's own
pipeline schedule (`get_forward_backward_func`), so PP > 1 uses 1F1B with p2p between stages.

A step whose loss (on any rank) or gradient norm is not finite makes no update on any rank: the
flag travels in the same all-reduce as the step's metrics, before the optimizer would step.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist

from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.hf_config import ModelArch
from stepwise.models.policy_value import split_policy_value
from stepwise.parallel.cpu_shim import step_scope
from stepwise.parallel.runtime import Layout
from stepwise.train.fused_adam import use_fused_cpu_adam
from stepwise.train.logprobs import model_token_logprobs
from stepwise.train.prefix_packing import flat_rows, read_positions


def engine_options(model: ModelConfig, parallel: ParallelConfig, scoring: bool = False) -> EngineOptions:
    """How to build the model of `model` at `parallel`; forward-only `scoring` uses FP8 only with model.fp8.scoring."""
    return EngineOptions(
        tp=parallel.tp,
        pp=parallel.pp,
        dtype=model.dtype,
        sequence_parallel=parallel.sequence_parallel and torch.cuda.is_available(),
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        fp8=model.fp8.enabled and (model.fp8.scoring or not scoring),
        fp8_recipe=model.fp8.recipe,
        fp8_margin=model.fp8.margin,
        fp8_amax_history_len=model.fp8.amax_history_len,
        recompute_activations=model.recompute_activations,
        transformer_impl=model.transformer_impl,
    )


def _finalize_grads(models, num_tokens=None, *args, **kwargs):
    """DP all-reduce (sum) + tied-embedding / SP grad sync, without megatron's per-token rescale."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(models, None)


@contextmanager
def variable_shapes(model, needed: bool = True):
    """While inside, when `needed`, pipeline stages exchange each activation's shape before it (megatron's
    `variable_seq_lengths`), so micro-batches may differ in length and rows (no effect at PP 1)."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    before = config.variable_seq_lengths
    config.variable_seq_lengths = before or needed
    try:
        yield
    finally:
        config.variable_seq_lengths = before


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

    metric_names: tuple[str, ...] | None = None  # "loss" then the plugin's metrics, fixed by the first
    # micro-batch (and agreed across ranks at the first step): each micro-batch returns one tensor of them
    metric_names_agreed: bool = False

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Callable) -> list[torch.Tensor]:
        """Accumulate gradients of `micro_batches` (summed, DP-reduced) into the grad buffers; returns the
        metrics of each micro-batch (on the last stage) as a float64 tensor ordered as `metric_names`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not all(module.training for module in self.model.modules()):  # train() walks and sets every module
            self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        shapes = {tuple(batch["input_ids"].shape) for batch in micro_batches}
        with variable_shapes(self.model, len(shapes) > 1), step_scope():  # packed rows: the last may hold fewer
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
        with step_scope():
            return self._train_step(micro_batches, loss_fn)

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Callable) -> dict[str, float]:
        per_micro_batch = self.forward_backward(micro_batches, loss_fn)
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm() or 0.0)
        flag = 1.0 if found_inf or not math.isfinite(grad_norm) else 0.0
        metrics = self._reduce_metrics(per_micro_batch, nonfinite=flag)
        # a non-finite loss on any rank makes the summed loss non-finite: every rank takes the same branch
        nonfinite = metrics["nonfinite"] > 0 or not math.isfinite(metrics["loss"])
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

            def loss_func(output):
                mask = batch.get("loss_mask")  # every policy loss reads log-probs only there (0.0 elsewhere)
                read = None if mask is None else read_positions(mask, batch["labels"])  # packed: any segment's
                as_mask = (lambda t: t) if mask is None else partial(flat_rows, loss_mask=mask)  # stacked packed rows
                if self.kind == "critic":
                    outputs = output.squeeze(-1)
                elif self.kind == "policy_value":
                    policy, values = split_policy_value(output)
                    outputs = {"logprobs": as_mask(model_token_logprobs(model, policy, batch["labels"], vocab, read)),
                               "values": as_mask(values.float())}
                else:  # hidden states (built with hidden_output) or logits
                    outputs = as_mask(model_token_logprobs(model, output, batch["labels"], vocab, read))
                loss, metrics = loss_fn(batch, outputs)
                return loss, torch.ones((), dtype=torch.int, device=device), self._metric_tensor(loss, metrics)

            return output, loss_func

        return forward_step

    def _metric_tensor(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss and a plugin's metrics of one micro-batch as one float64 tensor (no host sync)."""
        names = ("loss", *sorted(metrics))
        if self.metric_names is None:
            self.metric_names = names
        elif names != self.metric_names:
            raise ValueError(f"the loss returned metrics {names[1:]}, earlier micro-batches {self.metric_names[1:]}")
        values = [loss.detach(), *(metrics[name].detach() for name in names[1:])]
        return torch.stack([value.to(torch.float64).reshape(()) for value in values])

    def _agree_metric_names(self) -> tuple[str, ...]:
        """Fix the metric names on every rank, once (the last rank is a last-stage rank and has them)."""
        if not self.metric_names_agreed:
            names = [self.metric_names]
            dist.broadcast_object_list(names, src=dist.get_world_size() - 1)
            self.metric_names, self.metric_names_agreed = names[0], True
        return self.metric_names

    def _reduce_metrics(self, per_micro_batch: list[torch.Tensor], nonfinite: float) -> dict[str, float]:
        """Sum metrics over micro-batches and DP ranks in one tensor and one all-reduce (last stage holds
        them; TP ranks agree), with every rank's `nonfinite` flag (> 0 after it when any rank raised it)."""
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        names = self._agree_metric_names() if distributed else self.metric_names
        flag = torch.tensor([nonfinite], dtype=torch.float64, device=self.layout.device)
        if per_micro_batch:
            local = torch.cat([flag, torch.stack(per_micro_batch).sum(dim=0)])
        else:
            local = torch.cat([flag, flag.new_zeros(len(names))])
        if distributed:
            dist.all_reduce(local)
            local[1:] /= self.layout.tp
        return dict(zip(("nonfinite", *names), local.tolist()))


def build_engine(
    arch: ModelArch, model_config: ModelConfig, parallel: ParallelConfig, train: TrainConfig, layout: Layout,
    total_steps: int, kind: str = "policy", value_arch: ModelArch | None = None, hidden_output: bool = True,
) -> Engine:
    """Model (policy, critic, or policy_value: with a value head, or with a separate value network of
    `value_arch`), DDP wrapper, megatron optimizer and scheduler for `total_steps` steps. Policies hand
    back hidden states (log-probs without whole logits) unless `hidden_output` is false (the logits
    form, kept for comparison)."""
    from stepwise.models.critic import build_critic_model
    from stepwise.models.policy_value import build_policy_value_model, build_policy_with_value_network
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    options = replace(engine_options(model_config, parallel), wgrad_into_main_grad=True)  # DDP wraps it below
    policy = {} if kind == "critic" else {"hidden_output": hidden_output}
    builder = {"critic": build_critic_model, "policy_value": build_policy_value_model}.get(kind, build_gpt_model)
    if value_arch is not None:
        model = build_policy_with_value_network(arch, value_arch, options, model_config.max_seq_len, **policy)
    else:
        model = builder(arch, options, max_seq_len=model_config.max_seq_len, **policy)
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
    use_fused_cpu_adam(optimizer)
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
