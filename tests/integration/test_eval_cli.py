"""`stepwise eval` end to end: two tiny exported models on fixture benchmarks (a launched step samples
and grades), the files, counts and tables it writes, a rerun that resumes, and a known-correct response
fed through the grading path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepwise.cli import main
from stepwise.data.jsonl import read_jsonl, write_jsonl
from tests.helpers import make_tiny_hf_qwen2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
BENCHMARKS = {"math500": FIXTURES / "benchmarks" / "math500.jsonl", "gsm8k": FIXTURES / "benchmarks" / "gsm8k.jsonl",
              "humaneval": FIXTURES / "code" / "humaneval_sample.jsonl"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    models = [make_tiny_hf_qwen2(root / "pi0", seed=0), make_tiny_hf_qwen2(root / "trained", seed=1)]
    argv = ["eval", *map(str, models), *(f"--benchmark={name}={path}" for name, path in BENCHMARKS.items()),
            "--out", str(root / "out"), "--limit", "2", "--max-tokens", "6", "--batch-size", "4", "--shard-size", "1"]
    assert main(argv) == 0
    return root / "out", argv


def test_eval_writes_samples_scores_and_tables(evaluated, capsys):
    out, _ = evaluated
    for model in ("pi0", "trained"):
        for name in BENCHMARKS:
            samples = read_jsonl(out / model / name / "samples.jsonl")
            assert [s["id"] for s in samples] == [r["id"] for r in read_jsonl(out / "benchmarks" / f"{name}.jsonl")]
            assert len(samples) == 2 and all(isinstance(s["correct"], bool) for s in samples)
            assert {"prompt", "response", "answer", "extracted"} <= set(samples[0])
            assert sorted(p.name for p in (out / model / name / "shards").glob("shard_*.jsonl")) == [
                "shard_00000.jsonl", "shard_00001.jsonl"]
            score = json.loads((out / model / name / "score.json").read_text())
            assert (score["total"], score["correct"]) == (2, sum(s["correct"] for s in samples))
        assert (out / model / "results.md").read_text().splitlines()[2].startswith(f"| {model} | ")
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0] == "| Model | MATH500 | GSM8K | HumanEval |"
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| pi0", "| trained"]
    assert "MATH500 accuracy, n=2; GSM8K accuracy, n=2; HumanEval pass@1, n=2." in table[-1]
    assert json.loads((out / "benchmarks" / "humaneval.jsonl").read_text().splitlines()[0])["task"] == "code"


def test_prompts_use_the_cot_template(evaluated):
    out, _ = evaluated
    prompt = read_jsonl(out / "pi0" / "math500" / "samples.jsonl")[0]["prompt"]
    assert prompt == "Compute $\\sqrt{16}$.\nPlease reason step by step, and put your final answer within \\boxed{}.\n"


def test_rerun_resumes_and_grades_a_known_correct_response_right(evaluated, capsys):
    out, argv = evaluated
    shard = out / "pi0" / "math500" / "shards" / "shard_00000.jsonl"
    (record,) = read_jsonl(shard)
    write_jsonl(shard, [{**record, "response": "The root is 4, so the answer is $\\boxed{4}$."}])
    (out / "pi0" / "math500" / "graded" / "shard_00000.jsonl").unlink()  # only this shard is graded again
    capsys.readouterr()
    assert main(argv) == 0
    first = read_jsonl(out / "pi0" / "math500" / "samples.jsonl")[0]
    assert (first["extracted"], first["correct"]) == ("4", True)
    assert json.loads((out / "pi0" / "math500" / "score.json").read_text())["correct"] >= 1
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| Model | MATH500 | GSM8K | HumanEval |" and "| trained |" in printed


def test_bad_model_directory_is_an_error(tmp_path, capsys):
    argv = ["eval", str(tmp_path), f"--benchmark=math500={BENCHMARKS['math500']}", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "not an exported HF model directory (no config.json)" in capsys.readouterr().err
