"""Dataset loaders on real-format fixture records: MATH (boxed answers, id subsets), GSM8K, generic
JSONL; every reference solution grades correct against itself; bad records are named by line."""
from __future__ import annotations

import json

import pytest

from stepwise.data.datasets import load_problems
from stepwise.data.jsonl import DataError, read_jsonl
from stepwise.tasks.grading import grade
from stepwise.tasks.prompts import render_prompt
from tests.conftest import FIXTURES

DATA = FIXTURES / "data"


@pytest.mark.parametrize("kind, file, solution_key", [("math", "math_sample.jsonl", "solution"),
                                                      ("gsm8k", "gsm8k_sample.jsonl", "answer")])
def test_reference_solutions_grade_correct_against_their_answers(kind, file, solution_key):
    problems = load_problems(DATA / file, kind)
    raw = read_jsonl(DATA / file)
    assert len(problems) == len(raw) == 12
    for problem, record in zip(problems, raw):
        assert grade(kind, record[solution_key], problem["answer"]), record


def test_math_answers_and_ids():
    problems = load_problems(DATA / "math_sample.jsonl", "math")
    first = read_jsonl(DATA / "math_sample.jsonl")[0]
    assert problems[0] == {"id": "test/prealgebra/1.json", "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
                           "answer": "\\frac{3}{4}", "solution": first["solution"]}
    subset = load_problems(DATA / "math_sample.jsonl", "math", id_list=DATA / "math_subset_ids.txt")
    assert [p["id"] for p in subset] == ["test/algebra/2.json", "test/geometry/6.json"]


def test_gsm8k_answers_drop_commas():
    problems = load_problems(DATA / "gsm8k_sample.jsonl", "gsm8k")
    assert [p["answer"] for p in problems][:4] == ["72", "5000", "-7", "2.25"]
    assert problems[0]["solution"] == read_jsonl(DATA / "gsm8k_sample.jsonl")[0]["answer"]  # the full worked answer


def test_bad_records_are_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x", "solution": "no box"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: no final answer"):
        load_problems(bad, "math")
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: missing key 'answer'"):
        load_problems(bad, "gsm8k")
    with pytest.raises(DataError, match="ids not found"):
        load_problems(DATA / "math_sample.jsonl", "math", id_list=DATA / "gsm8k_sample.jsonl")


def test_prompts_carry_the_papers_instructions():
    assert render_prompt("2+2?", "math").endswith("put your final answer within \\boxed{}.\n")
    assert "like '#### 0'" in render_prompt("2+2?", "gsm8k")
    assert render_prompt("Q: 1+1\n", "arith") == "Q: 1+1\n"
