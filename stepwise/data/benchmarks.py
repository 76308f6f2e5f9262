"""Benchmark files for `stepwise eval`, read from user-supplied JSONL or parquet in their public layouts
(no downloads), into records `{"id", "benchmark", "task", "problem", "answer"}`.

`task` picks the prompt template and the grader (stepwise.tasks.grading): "math" (the answer is a
LaTeX string compared with the response's last `\\boxed{}`), "gsm8k" (a number after `####`) or
"code" (`answer` is a test spec of stepwise.tasks.code). Each benchmark names the keys it reads by a
role ("problem", "answer", "id", ...); `fields` overrides them, e.g. {"problem": "question"} for a
copy of MATH whose problem text sits under "question". Public layouts (the defaults):

- math (MATH, the 5000 test problems): problem, solution (answer: the solution's last \\boxed{}), unique_id
- math500 (HuggingFaceH4/MATH-500): problem, answer, unique_id (also solution, subject, level)
- gsm8k: question, answer ("... #### 72")
- minerva_math: problem, solution (answer: its last \\boxed{}), idx
- olympiadbench: question, final_answer (a list of "$...$" strings, joined by ", "), id
- college_math: question, answer ("$...$"), question_number
- humaneval, humaneval_plus: task_id, prompt, test, entry_point
- mbpp (text, test_list, test_setup_code) and mbpp_plus (prompt, test_list, test): the entry point is
  the function the first `assert` of test_list calls; MBPP+'s `test` code replaces the asserts
- livecodebench: question_id, question_content, public_test_cases (stdin tests only)
- taco: name, question, input_output (stdin tests only)
- arith (the embedded task: a run's data/test.jsonl or data/validation.jsonl): problem, answer, id; the raw
  problem text is the prompt, as the pipeline's own evaluation gives it

Every error names the file, the line (or parquet row) and the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from stepwise.data.datasets import read_rows
from stepwise.data.jsonl import DataError
from stepwise.tasks.answers import gsm8k_answer, last_boxed
from stepwise.tasks.code import io_cases_of, parse_test_spec

Row = Mapping[str, Any]
STDIN_NOTE = "Read the input from standard input and write the answer to standard output."


@dataclass(frozen=True)
class BenchmarkFormat:
    """How one benchmark's file maps onto eval records: its grader task, the keys it reads by role
    (the roles in `required` must be present), and `build(values) -> (problem, answer)`."""

    title: str  # the column heading of the results table
    task: str
    fields: Mapping[str, str]
    required: Mapping[str, type | tuple[type, ...]]  # role -> the value's type(s)
    build: Callable[[dict[str, Any]], tuple[str, Any]]


def _unwrap_dollars(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if len(text) > 1 and text.startswith("$") and text.endswith("$") else text


def _boxed(values: dict) -> tuple[str, Any]:
    answer = last_boxed(values["answer"])
    if answer is None or not answer.strip():
        raise ValueError("role 'answer': no \\boxed{} answer in the solution")
    return values["problem"], answer


def _plain(values: dict) -> tuple[str, Any]:
    answer = values["answer"]
    parts = answer if isinstance(answer, list) else [answer]
    if not parts or not all(isinstance(part, (str, int, float)) for part in parts):
        raise ValueError("role 'answer': expected a string, a number or a non-empty list of them")
    text = ", ".join(_unwrap_dollars(str(part)) for part in parts)
    if not text:
        raise ValueError("role 'answer': empty answer")
    return values["problem"], text


def _gsm8k(values: dict) -> tuple[str, Any]:
    if gsm8k_answer(values["answer"]) is None:
        raise ValueError("role 'answer': no '#### <number>' final answer")
    return values["problem"], values["answer"]


def _humaneval(values: dict) -> tuple[str, Any]:
    spec = parse_test_spec({"prompt": values["prompt"], "test": values["test"], "entry_point": values["entry_point"]})
    return f"Complete the following Python function:\n```python\n{values['prompt']}```", spec


_ASSERT_CALL = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?([A-Za-z_]\w*)\s*\(")


def _mbpp(values: dict) -> tuple[str, Any]:
    tests = values["tests"]
    if not tests or not all(isinstance(test, str) for test in tests):
        raise ValueError("role 'tests': expected a non-empty list of assert statements")
    match = _ASSERT_CALL.search(tests[0])
    if match is None:
        raise ValueError(f"role 'tests': cannot find the function called by {tests[0]!r}")
    test_code = values.get("test") or "\n".join([values.get("setup") or "", *tests])
    spec = parse_test_spec({"prompt": "", "test": test_code, "entry_point": match.group(1)})
    problem = f"{values['problem']}\nYour code should pass these tests:\n" + "\n".join(tests)
    return problem, spec


def _stdin(values: dict) -> tuple[str, Any]:
    spec = parse_test_spec({"io": io_cases_of({values["tests_key"]: values["tests"]})})
    return f"{values['problem']}\n\n{STDIN_NOTE}", spec


def _as_is(values: dict) -> tuple[str, Any]:
    return values["problem"], values["answer"]


_MATH_TYPES = {"problem": str, "answer": str}
FORMATS: dict[str, BenchmarkFormat] = {
    "arith": BenchmarkFormat("Arithmetic", "arith", {"problem": "problem", "answer": "answer", "id": "id"},
                             _MATH_TYPES, _as_is),
    "math": BenchmarkFormat("MATH", "math", {"problem": "problem", "answer": "solution", "id": "unique_id"},
                            _MATH_TYPES, _boxed),
    "math500": BenchmarkFormat("MATH500", "math", {"problem": "problem", "answer": "answer", "id": "unique_id"},
                               {"problem": str, "answer": (str, int, float)}, _plain),
    "gsm8k": BenchmarkFormat("GSM8K", "gsm8k", {"problem": "question", "answer": "answer", "id": "id"},
                             _MATH_TYPES, _gsm8k),
    "minerva_math": BenchmarkFormat("Minerva Math", "math", {"problem": "problem", "answer": "solution", "id": "idx"},
                                    _MATH_TYPES, _boxed),
    "olympiadbench": BenchmarkFormat("OlympiadBench", "math", {"problem": "question", "answer": "final_answer",
                                                               "id": "id"},
                                     {"problem": str, "answer": (list, str)}, _plain),
    "college_math": BenchmarkFormat("College Math", "math", {"problem": "question", "answer": "answer",
                                                             "id": "question_number"},
                                    {"problem": str, "answer": (str, int, float)}, _plain),
    "humaneval": BenchmarkFormat("HumanEval", "code", {"prompt": "prompt", "test": "test", "entry_point": "entry_point",
                                                       "id": "task_id"},
                                 {"prompt": str, "test": str, "entry_point": str}, _humaneval),
    "mbpp": BenchmarkFormat("MBPP", "code", {"problem": "text", "tests": "test_list", "setup": "test_setup_code",
                                             "id": "task_id"},
                            {"problem": str, "tests": list}, _mbpp),
    "mbpp_plus": BenchmarkFormat("MBPP+", "code", {"problem": "prompt", "tests": "test_list", "test": "test",
                                                   "id": "task_id"},
                                 {"problem": str, "tests": list, "test": str}, _mbpp),
    "livecodebench": BenchmarkFormat("LiveCodeBench", "code", {"problem": "question_content",
                                                               "tests": "public_test_cases", "id": "question_id"},
                                     {"problem": str, "tests": (str, list)}, _stdin),
    "taco": BenchmarkFormat("TACO", "code", {"problem": "question", "tests": "input_output", "id": "name"},
                            {"problem": str, "tests": (str, dict)}, _stdin),
}
FORMATS["humaneval_plus"] = BenchmarkFormat("HumanEval+", **{k: getattr(FORMATS["humaneval"], k)
                                                             for k in ("task", "fields", "required", "build")})
_TESTS_KEYS = {"livecodebench": "public_test_cases", "taco": "input_output"}  # the key io_cases_of reads


def benchmark_fields(name: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> file key of benchmark `name`, with `overrides` applied; ValueError for an unknown role."""
    fields = dict(FORMATS[name].fields)
    for role, key in (overrides or {}).items():
        if role not in fields:
            raise ValueError(f"benchmark '{name}' has no field role '{role}'; roles: {', '.join(sorted(fields))}")
        fields[role] = key
    return fields


def load_benchmark(name: str, path: str | Path, fields: Mapping[str, str] | None = None,
                   limit: int | None = None) -> list[dict]:
    """The eval records of benchmark `name` read from `path` (JSONL or parquet); the first `limit` only when given."""
    if name not in FORMATS:
        raise ValueError(f"unknown benchmark '{name}'; known: {', '.join(sorted(FORMATS))}")
    form, keys = FORMATS[name], benchmark_fields(name, fields)
    required = {keys[role]: kind for role, kind in form.required.items()}
    records, seen = [], set()
    for where, row in read_rows(Path(path), required):
        values = {role: row.get(key) for role, key in keys.items()}
        values["tests_key"] = _TESTS_KEYS.get(name)
        try:
            problem, answer = form.build(values)
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{where}: {_name_keys(str(error), keys)}") from None
        record_id = str(row[keys["id"]]) if row.get(keys["id"]) is not None else f"{name}-{len(records)}"
        if record_id in seen:
            raise DataError(f"{where}: key '{keys['id']}': duplicate id {record_id!r}")
        seen.add(record_id)
        records.append({"id": record_id, "benchmark": name, "task": form.task, "problem": problem, "answer": answer})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _name_keys(message: str, keys: Mapping[str, str]) -> str:
    """`message` with "role 'x'" spelled as the file's key ("key 'solution'")."""
    return re.sub(r"role '(\w+)'", lambda m: f"key '{keys.get(m.group(1), m.group(1))}'", message)
