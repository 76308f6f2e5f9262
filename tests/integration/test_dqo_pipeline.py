"""The DQO smoke recipe end to end through the CLI (recipes/tiny/dqo_smoke.yaml): sampling from pi0,
process scores, per-token reference log-probs (checked against transformers on the exported pi0),
every method's data set, training, export and greedy + sampled evaluation, the report's DQO table,
and a re-run that skips every stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safetensors import safe_open
from transformers import AutoModelForTokenClassification

from stepwise.checkpoint import layout as ckpt_layout
from stepwise.config import load_recipe
from stepwise.convert.dist_io import stored_tensors
from stepwise.data.jsonl import read_jsonl
from tests.integration.test_pipeline import REPO, stepwise
from tests.tolerance import logits_bound, within

METHODS = ("sft_baseline", "rs_baseline", "dpo", "kto", "dro", "dqo")


def hf_token_logprobs(model_dir: Path, records: list[dict]) -> list[tuple[list[float], float]]:
    """(log pi0(token) of each response token and eos, the bound on their difference from megatron's)
    by transformers on the exported model: a log-prob is a logit minus a logsumexp, each off by at most
    the logits' summation-order bound (tests/tolerance.py)."""
    from transformers import AutoModelForCausalLM

    from stepwise.tasks.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for record in records:
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids).logits
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        bound = 2 * logits_bound(logits, model.config.to_dict())
        out.append((logp.gather(1, targets.unsqueeze(1)).squeeze(1)[len(prompt) - 1:].tolist(), bound))
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)  # whole pipelines: slow machines get twice the 900 s default
def test_dqo_smoke_recipe_runs_every_stage_and_skips_them_on_rerun(tmp_path):
    run_dir = tmp_path / "dqo_smoke"
    first = stepwise("run", "recipes/tiny/dqo_smoke.yaml", f"run.dir={run_dir}")
    assert f"report: {run_dir}/report.md" in first.stdout
    report = json.loads((run_dir / "report.json").read_text())["stages"]
    sample = report["dqo_sample"]
    assert sample["samples"] == 16 * 4 and sample["positives"] + sample["negatives"] == 64

    data = run_dir / "dqo_datasets"
    trajectories = read_jsonl(data / "trajectories.jsonl")
    assert len(trajectories) == report["dqo_datasets"]["trajectories"] > 0
    for t in trajectories:
        assert len(t["ref_logp"]) == len(t["behaviour_logp"]) == len(t["process_rewards"])
        assert t["reward"] in (0.0, 1.0)
        if t["reward"] == 1.0:  # a correct response: 1/n on every segment
            assert sum(t["process_rewards"]) == pytest.approx(1.0)
    expected = hf_token_logprobs(run_dir / "export" / "policy", trajectories[:6])
    for t, (hf, bound) in zip(trajectories, expected):
        within("pi0 log-probs, megatron vs transformers", max(abs(a - b) for a, b in zip(t["ref_logp"], hf)), bound)
    process = report["dqo_process"]
    rows = read_jsonl(run_dir / "dqo_process" / "process.jsonl")
    assert process["enabled"] and process["responses"] == len(rows) and process["rounds"] >= 1
    assert process["failed"] == sum(r["good_prefix"] < len(r["segments"]) for r in rows)  # i* < n: failed
    pairs = read_jsonl(data / "pairs.jsonl")
    assert len(pairs) <= round(0.5 * len(trajectories))
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"]
    assert len(read_jsonl(data / "labelled.jsonl")) == len(trajectories)
    assert len(read_jsonl(data / "gold.jsonl")) == 16

    for method in METHODS:  # pi0 samples some correct responses, so every method has at least one batch
        summary = report[method]
        assert not summary.get("skipped"), summary
        assert summary["final"]["step"] == 2
        assert summary[method]["problems"] == 32 and 0 <= summary[method]["accuracy"] <= 1
        assert len(summary["sampled"]["per_seed"]) == 2
        assert (run_dir / method / method / "model.safetensors").is_file()
    assert len(report["dqo_base_eval"]["sampled"]["per_seed"]) == 2
    for method in ("dqo", "dro"):  # the paper's separate value network (dqo_data.value_model default) is trained
        # and saved beside the policy, and left out of the HF export
        stored = stored_tensors(ckpt_layout.latest_iteration(run_dir / method / "checkpoints"))
        assert "value_network.decoder.final_layernorm.weight" in stored, method
        with safe_open(run_dir / method / method / "model.safetensors", "pt") as exported:
            assert not any("value" in key for key in exported.keys()), method
        value = AutoModelForTokenClassification.from_pretrained(report[method]["value_network"])  # V_phi, as a critic
        values = value(torch.tensor([[1, 2, 3]])).logits
        assert values.shape == (1, 3, 1) and torch.isfinite(values).all(), method
    markdown = (run_dir / "report.md").read_text()
    assert "## DQO and baselines" in markdown and "| pi0 (base) |" in markdown
    for method in METHODS:
        name = f"{method} (value separate)" if method in ("dqo", "dro") else method
        assert f"| {name} |" in markdown, method

    stages = load_recipe(REPO / "recipes/tiny/dqo_smoke.yaml").run.stages
    second = stepwise("run", "recipes/tiny/dqo_smoke.yaml", f"run.dir={run_dir}")
    assert second.stdout.count("up to date, skipped") == len(stages)
