"""Metric sinks: metrics.jsonl always; TensorBoard scalars when asked for and importable; W&B when
WANDB_PROJECT is set and wandb imports; a missing optional package is one message, not a failure.
The optional packages are replaced by recording stand-ins (neither is installed for the tests)."""
from __future__ import annotations

import json
import sys
import types

from stepwise.train.metric_sinks import MetricSinks

STEPS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "nonfinite": False, "note": "x"}, {"step": 2, "loss": 2.0, "lr": 1e-3,
                                                                                  "nonfinite": False, "note": "y"}]


def recording_modules(monkeypatch) -> dict:
    calls = {"scalars": [], "logs": [], "init": None, "closed": []}

    class SummaryWriter:
        def __init__(self, log_dir):
            calls["log_dir"] = log_dir

        def add_scalar(self, key, value, global_step):
            calls["scalars"].append((key, value, global_step))

        def close(self):
            calls["closed"].append("tensorboard")

    class Run:
        def log(self, values, step):
            calls["logs"].append((values, step))

        def finish(self):
            calls["closed"].append("wandb")

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def test_every_sink_gets_each_steps_numeric_metrics(tmp_path, monkeypatch):
    calls = recording_modules(monkeypatch)
    monkeypatch.setenv("WANDB_PROJECT", "stepwise-test")
    sinks = MetricSinks(tmp_path, "run-policy", tensorboard=True, config={"loss": "skywork_dapo"})
    for metrics in STEPS:
        sinks.write(metrics)
    sinks.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == STEPS
    assert calls["log_dir"] == str(tmp_path / "tensorboard")
    assert calls["scalars"] == [("loss", 2.5, 1), ("lr", 1e-3, 1), ("loss", 2.0, 2), ("lr", 1e-3, 2)]
    assert calls["logs"] == [({"loss": 2.5, "lr": 1e-3}, 1), ({"loss": 2.0, "lr": 1e-3}, 2)]
    assert calls["init"]["project"] == "stepwise-test" and calls["init"]["id"] == "run-policy"
    assert calls["closed"] == ["tensorboard", "wandb"]


def test_without_the_packages_or_the_settings_only_the_jsonl_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_PROJECT", "stepwise-test")
    sinks = MetricSinks(tmp_path, "run-sft", tensorboard=True)
    sinks.write(STEPS[0])
    sinks.close()
    said = capsys.readouterr().out
    assert "TensorBoard cannot be imported" in said and "wandb cannot be imported" in said
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == STEPS[0]
    monkeypatch.delenv("WANDB_PROJECT")
    quiet = MetricSinks(tmp_path, "run-sft", tensorboard=False)
    assert quiet.tensorboard is None and quiet.wandb is None and capsys.readouterr().out == ""
