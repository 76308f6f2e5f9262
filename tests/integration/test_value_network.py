"""DQO's separate value network (`dqo_data.value_model: separate`): it runs beside the policy stage by
stage, so PP 2 gives the loss, metrics and global gradient norm of PP 1 for the same weights; its
checkpoint keys sit under `value_network.` beside the policy's unchanged ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepwise.checkpoint import layout
from stepwise.convert.dist_io import stored_tensors
from tests.conftest import run_python, run_torchrun
from tests.integration._grad_worker import NETWORK, TINY, VALUE_TINY
from tests.tolerance import gradient_bound, within

WORKER = Path(__file__).with_name("_pipeline_value_worker.py")


@pytest.mark.slow
def test_pp2_equals_pp1_with_a_value_network_and_with_a_value_head(tmp_path):
    run_python(WORKER, tmp_path / "pp1.json", tmp_path / "ckpt", 1)
    run_torchrun(2, WORKER, tmp_path / "pp2.json", tmp_path / "ckpt", 2)
    pp1, pp2 = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("pp1", "pp2"))
    assert pp1.keys() == pp2.keys() == {"dqo" + NETWORK, "dqo"}
    for case in pp1:
        for name, value in pp1[case].items():
            # the same sums split over two pipeline stages: fp32 order only (tests/tolerance.py)
            within(f"{case} {name} PP2 vs PP1", abs(pp2[case][name] - value), gradient_bound(abs(value), TINY, 4 * 32))
        assert pp1[case]["grad_norm"] > 0 and pp1[case]["value_loss_sum"] > 0
    assert pp1["dqo" + NETWORK]["value_loss_sum"] != pp1["dqo"]["value_loss_sum"]  # two different value models

    stored = stored_tensors(layout.latest_iteration(tmp_path / "ckpt" / ("dqo" + NETWORK)))
    policy = stored_tensors(layout.latest_iteration(tmp_path / "ckpt" / "dqo"))
    value_keys = {k for k in stored if k.startswith("value_network.")}
    assert {k for k in stored if k not in value_keys} == {k for k in policy if not k.startswith("value_head.")}
    qkv = stored["value_network.decoder.layers.self_attention.linear_qkv.weight"][0]
    head_dim = VALUE_TINY["hidden_size"] // VALUE_TINY["num_attention_heads"]
    assert qkv == (VALUE_TINY["num_hidden_layers"], (4 + 2 * 2) * head_dim, VALUE_TINY["hidden_size"])
    assert stored["value_network.output_layer.weight"][0] == (1, VALUE_TINY["hidden_size"])
    assert stored["decoder.layers.self_attention.linear_qkv.weight"][0][2] == TINY["hidden_size"]
