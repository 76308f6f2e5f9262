"""Worker: the hidden-state form of the engine and the scorer against the logits form, at TP x PP.

For a tied and an untied TINY policy, and for a `policy` (skywork_dapo) and a `policy_value` (dqo,
value head) loss: two engines on the same weights, one built with `hidden_output` (the model hands back
hidden states; log-probs from the output weight, its gradient added straight into DDP's main_grad)
and one without (whole logits); the same global batch through both. Also the `policy` and `tokens`
scores of the action batch. Saves from rank 0 {"tie=..,case": {"gradient": (max |diff|, max |grad|),
"output_weight": (max |diff|, max |grad|) of the output weight's main_grad, "added_to_main_grad":
(hidden, logits form: 1.0 where the weight's grad_added_to_main_grad was set), "score": (max |diff|,
max |score|) or None, "tokens": batch tokens}}, each maximum over all ranks.

    python -m torch.distributed.run --nproc-per-node=N _hidden_form_worker.py OUT TP PP
"""
from __future__ import annotations

import sys
from functools import partial

import torch
import torch.distributed as dist

from stepwise import losses
from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.models.hidden_output import output_weight
from stepwise.parallel.runtime import init_parallel
from stepwise.train.engine import build_engine
from stepwise.train.score import _score_batches
from tests.integration._grad_worker import GLOBAL_BATCH, TINY, batches_for
from tests.integration._packing_worker import global_max

CASES = ("skywork_dapo", "dqo")


def largest(tensors) -> float:
    return max((t.abs().max().item() for t in tensors), default=0.0)


def compare(case: str, tie: bool, tp: int, pp: int, layout) -> dict:
    plugin = losses.get(case)
    train = TrainConfig(loss=case, global_batch_size=GLOBAL_BATCH, micro_batch_size=2)
    parallel = ParallelConfig(tp=tp, pp=pp, nproc_per_node=layout.world_size)
    arch = arch_from_hf_dict(dict(TINY, tie_word_embeddings=tie))
    engines = {form: build_engine(arch, ModelConfig(max_seq_len=32), parallel, train, layout, 10,
                                  kind=plugin.model_kind, hidden_output=form == "hidden") for form in ("hidden", "logits")}
    engines["logits"].model.module.load_state_dict(engines["hidden"].model.module.state_dict())
    batches = batches_for(plugin, train.micro_batch_size)
    indices = list(range(GLOBAL_BATCH))
    micro = batches.micro_batches(indices, layout.dp_rank, layout.dp)
    loss_fn = partial(plugin.compute, plugin.parse_options({}))
    grads, weight_grads, scores, added = {}, {}, {}, {}
    for form, engine in engines.items():
        engine.forward_backward(micro, loss_fn)
        grads[form] = {name: p.main_grad.detach().clone() for name, p in engine.model.module.named_parameters()}
        if layout.is_last_stage:
            weight_grads[form] = output_weight(engine.model).main_grad.detach().clone()
            added[form] = bool(output_weight(engine.model).grad_added_to_main_grad)
        if case == "skywork_dapo":
            engine.model.eval()
            scores[form] = [torch.tensor(sum(_score_batches(engine.model, micro, kind, TINY["vocab_size"], layout.device), []))
                            for kind in ("policy", "tokens")]
    names = grads["hidden"].keys()
    result = {"gradient": (global_max(largest(grads["hidden"][n] - grads["logits"][n] for n in names)),
                           global_max(largest(grads["logits"].values()))),
              "output_weight": (global_max(largest([weight_grads["hidden"] - weight_grads["logits"]]) if weight_grads else 0.0),
                                global_max(largest([weight_grads["logits"]]) if weight_grads else 0.0)),
              "score": None, "tokens": batches.tokens(indices), "added_to_main_grad": tuple(global_max(float(added.get(form, False))) for form in ("hidden", "logits"))}
    if case == "skywork_dapo":
        last = layout.is_last_stage
        result["score"] = (global_max(largest(h - g for h, g in zip(scores["hidden"], scores["logits"])) if last else 0.0),
                           global_max(largest(scores["logits"]) if last else 0.0))
        result["scores"] = global_max(float(sum(len(s) for s in scores["hidden"])) if last else 0.0)
    return result


def main(out: str, tp: int, pp: int) -> None:
    layout = init_parallel(tp, pp, seed=7)
    results = {f"tie={tie},{case}": compare(case, tie, tp, pp, layout) for tie in (True, False) for case in CASES}
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
