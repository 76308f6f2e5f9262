"""Benchmark loaders of `stepwise eval` on fixtures in each benchmark's public layout, field overrides, and
bad files (errors name the file, the line and the key)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepwise.data.benchmarks import load_benchmark
from stepwise.data.jsonl import DataError
from stepwise.evaluate.cli import parse_benchmarks
from stepwise.tasks.grading import grade

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
BENCH = FIXTURES / "benchmarks"


@pytest.mark.parametrize("name, ids, answers", [
    ("math", ["math-0", "math-1", "math-2"], ["12", "\\frac{3}{4}", "2"]),
    ("math500", ["test/prealgebra/101.json", "test/prealgebra/102.json"], ["4", "\\frac{5}{6}"]),
    ("minerva_math", ["0", "1"], ["6e14", "9"]),
    ("olympiadbench", ["1606", "1607"], ["2, -2", "1024"]),
    ("college_math", ["1.1.1", "2.3.4"], ["1", "6"]),
])
def test_math_benchmarks_load_their_public_layouts(name, ids, answers):
    records = load_benchmark(name, BENCH / f"{name}.jsonl")
    assert [r["id"] for r in records] == ids
    assert [r["answer"] for r in records] == answers
    assert {r["task"] for r in records} == {"math"} and all(r["problem"] for r in records)


def test_the_embedded_task_reads_a_runs_test_file_with_its_raw_prompt_and_final_line_grader(tmp_path):
    from stepwise.evaluate.run import extracted_answer
    from stepwise.tasks.arith import ArithConfig, make_problems
    from stepwise.tasks.prompts import render_prompt

    problems = make_problems(ArithConfig(), 3, "test")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    records = load_benchmark("arith", tmp_path / "test.jsonl")
    assert [(r["id"], r["problem"], r["answer"], r["task"]) for r in records] == [
        (p["id"], p["problem"], p["answer"], "arith") for p in problems]
    assert render_prompt(records[0]["problem"], "arith") == problems[0]["problem"]  # as the pipeline prompts
    right, wrong = problems[0]["solution"], problems[0]["solution"][:-1] + "x"
    assert extracted_answer("arith", right) == problems[0]["answer"] and grade("arith", right, records[0]["answer"])
    assert not grade("arith", wrong, records[0]["answer"])


def test_gsm8k_keeps_the_full_solution_as_reference_and_grades_by_its_number():
    records = load_benchmark("gsm8k", BENCH / "gsm8k.jsonl")
    assert [r["task"] for r in records] == ["gsm8k", "gsm8k"]
    assert records[0]["answer"].endswith("#### 7")
    assert grade("gsm8k", "3 plus 4 is 7.\n#### 7", records[0]["answer"])
    assert not grade("gsm8k", "#### 8", records[0]["answer"])


@pytest.mark.parametrize("name, path, canonical_key", [
    ("mbpp", BENCH / "mbpp.jsonl", "code"),
    ("mbpp_plus", BENCH / "mbpp_plus.jsonl", "code"),
    ("humaneval", FIXTURES / "code" / "humaneval_sample.jsonl", "canonical_solution"),
])
def test_function_benchmarks_grade_their_canonical_solutions_right(name, path, canonical_key):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    records = load_benchmark(name, path, limit=2)
    for row, record in zip(rows, records):
        assert set(record["answer"]) == {"prompt", "test", "entry_point"}
        assert grade("code", f"```python\n{row[canonical_key]}\n```", record["answer"])
    assert not grade("code", "```python\ndef nothing():\n    pass\n```", records[0]["answer"])


def test_mbpp_entry_point_is_the_function_the_first_assert_calls():
    assert [r["answer"]["entry_point"] for r in load_benchmark("mbpp", BENCH / "mbpp.jsonl")] == ["square", "rev"]
    assert load_benchmark("mbpp_plus", BENCH / "mbpp_plus.jsonl")[0]["answer"]["entry_point"] == "similar_elements"


@pytest.mark.parametrize("name, file, answer_io", [
    ("livecodebench", "livecodebench_sample.jsonl", {"input": "3\n1 5 2\n", "output": "4\n"}),
    ("taco", "taco_sample.jsonl", {"input": "abc\n", "output": "cba\n3\n"}),
])
def test_stdin_benchmarks_map_to_io_specs(name, file, answer_io):
    record = load_benchmark(name, FIXTURES / "code" / file)[0]
    assert record["task"] == "code" and record["answer"]["io"][0] == answer_io
    assert "standard input" in record["problem"]


def test_field_overrides_read_renamed_keys(tmp_path):
    rows = [json.loads(line) for line in (BENCH / "math.jsonl").read_text().splitlines()]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"question": r["problem"], "worked": r["solution"]}) + "\n" for r in rows))
    (benchmark,) = parse_benchmarks([f"math={renamed}"], ["problem=question", "math.answer=worked"])
    assert benchmark.fields == {"problem": "question", "answer": "worked"}
    records = load_benchmark("math", renamed, benchmark.fields)
    assert [r["answer"] for r in records] == ["12", "\\frac{3}{4}", "2"]
    assert records[0]["problem"] == rows[0]["problem"]


def test_bad_benchmark_arguments_are_named():
    with pytest.raises(ValueError, match="unknown benchmark; known: arith, college_math"):
        parse_benchmarks(["mathh=x.jsonl"], [])
    with pytest.raises(ValueError, match="benchmark 'math' has no field role 'question'"):
        parse_benchmarks(["math=x.jsonl"], ["math.question=q"])
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        parse_benchmarks(["math"], [])


@pytest.mark.parametrize("name, line, message", [
    ("math", {"problem": "p", "level": "Level 1"}, "missing key 'solution'"),
    ("math", {"problem": "p", "solution": "no box here"}, "key 'solution': no \\\\boxed"),
    ("gsm8k", {"question": "q", "answer": "42"}, "key 'answer': no '#### <number>'"),
    ("olympiadbench", {"question": "q", "final_answer": []}, "key 'final_answer': expected"),
    ("mbpp", {"text": "t", "test_list": ["print(1)"]}, "key 'test_list': cannot find the function"),
    ("taco", {"question": "q", "input_output": "{\"fn_name\": \"f\", \"inputs\": [], \"outputs\": []}"}, "fn_name"),
])
def test_bad_records_name_file_line_and_key(tmp_path, name, line, message):
    path = tmp_path / f"{name}.jsonl"
    good = (BENCH / f"{name}.jsonl").read_text().splitlines()[0] if (BENCH / f"{name}.jsonl").exists() else None
    path.write_text((good + "\n" if good else "") + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=rf"{path}:{2 if good else 1}: .*{message}"):
        load_benchmark(name, path)


def test_duplicate_ids_and_bad_json_are_named(tmp_path):
    path = tmp_path / "dup.jsonl"
    row = (BENCH / "math500.jsonl").read_text().splitlines()[0]
    path.write_text(f"{row}\n{row}\n")
    with pytest.raises(DataError, match=rf"{path}:2: key 'unique_id': duplicate id"):
        load_benchmark("math500", path)
    path.write_text(f"{row}\n{{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: bad JSON"):
        load_benchmark("math500", path)
