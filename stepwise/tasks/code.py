"""Code grading: extract a program from a response and run it against a benchmark's tests, sandboxed.

Extraction (`extract_program`): the last ```python (also ```py / ```python3) fenced block, else the
last fenced block of any language, else the whole response; a final fence that is never closed
(a truncated response) runs to the end of the text.

Test specs (`parse_test_spec`; the `answer` of a code record, a dict or its JSON):
- HumanEval(+)/MBPP(+): {"prompt", "test", "entry_point"}. The script is the prompt, then the
  program (a completion that does not define `entry_point` at top level continues the prompt
  as it is; a full definition follows the prompt and replaces its stub), then the test code, then
  `check(entry_point)` when the test code defines `check` (HumanEval's layout; MBPP+'s test code
  calls the function itself). Passes when the script exits 0.
- stdin/stdout (LiveCodeBench, TACO): {"io": [{"input", "output"}, ...]}; each case runs the
  program on its own with the input on stdin and passes when stdout equals the expected output
  after stripping trailing whitespace on each line and trailing blank lines.
Either may hold "timeout_s" (per run; default DEFAULT_TIMEOUT_S). Every run is one sandboxed
subprocess (stepwise.tasks.sandbox); `grade_programs` runs many at once on a thread pool.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from stepwise.data.jsonl import parse_record
from stepwise.tasks.sandbox import SandboxLimits, run_python

DEFAULT_TIMEOUT_S = 10.0
PYTHON_FENCE_LANGUAGES = ("python", "py", "python3")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


class CodeJob(NamedTuple):
    program: str
    spec: Mapping[str, Any]  # a parsed test spec
    timeout_s: float | None = None  # None: the spec's timeout_s, else DEFAULT_TIMEOUT_S


def extract_program(response: str) -> str:
    """The program in a model response (see the module docstring for the rule)."""
    blocks = [(match.group(1).lower(), match.group(2)) for match in _FENCE.finditer(response)]
    python_blocks = [code for language, code in blocks if language in PYTHON_FENCE_LANGUAGES]
    if python_blocks:
        return python_blocks[-1]
    return blocks[-1][1] if blocks else response


def run_tests(program: str, tests: str, timeout_s: float, limits: SandboxLimits = SandboxLimits()) -> bool:
    """True only when `program` followed by `tests` exits 0 within the time and sandbox limits."""
    return run_python(f"{program}\n\n{tests}\n", b"", timeout_s, limits).ok


def humaneval_program(record: Mapping[str, Any], code: str) -> str:
    """The record's prompt plus `code` (a body that continues the prompt, or a full definition)."""
    prompt = record.get("prompt") or ""
    defines_entry = re.search(rf"^def\s+{re.escape(record['entry_point'])}\s*\(", code, re.M)
    return f"{prompt}\n{code}" if defines_entry else f"{prompt}{code}"


def humaneval_tests(record: Mapping[str, Any]) -> str:
    """The record's test code, plus `check(entry_point)` when it defines `check`."""
    test = record["test"]
    if re.search(r"^def\s+check\s*\(", test, re.M):
        return f"{test}\n\ncheck({record['entry_point']})"
    return test


def outputs_match(actual: str, expected: str) -> bool:
    """Equal after stripping trailing whitespace on each line and trailing blank lines."""
    def lines(text: str) -> list[str]:
        stripped = [line.rstrip() for line in text.splitlines()]
        while stripped and not stripped[-1]:
            stripped.pop()
        return stripped

    return lines(actual) == lines(expected)


def run_io_tests(program: str, cases: Iterable[Mapping[str, str]], timeout_s: float,
                 limits: SandboxLimits = SandboxLimits()) -> bool:
    """True when every case's stdout matches (one sandboxed run per case, stopping at the first miss)."""
    for case in cases:
        result = run_python(program, case["input"], timeout_s, limits)
        if not result.ok or not outputs_match(result.stdout.decode(errors="replace"), case["output"]):
            return False
    return True


def parse_test_spec(answer: str | Mapping[str, Any]) -> dict[str, Any]:
    """A code record's test spec from a dict or JSON string; ValueError naming what is wrong."""
    if isinstance(answer, str):
        answer = parse_record("code test spec", answer)
    if not isinstance(answer, Mapping):
        raise ValueError(f"code test spec: expected a JSON object, got {type(answer).__name__}")
    spec = dict(answer)
    if "io" in spec:
        cases = spec["io"]
        if not isinstance(cases, list) or not cases or not all(
                isinstance(c, Mapping) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
                for c in cases):
            raise ValueError("code test spec key 'io' must be a non-empty list of {'input': str, 'output': str}")
    else:
        for key in ("test", "entry_point"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise ValueError(f"code test spec needs key '{key}' (a string) or key 'io'; has {sorted(spec)}")
    if "timeout_s" in spec and not (isinstance(spec["timeout_s"], (int, float)) and spec["timeout_s"] > 0):
        raise ValueError(f"code test spec key 'timeout_s' must be a positive number, got {spec['timeout_s']!r}")
    return spec


def run_spec(program: str, spec: Mapping[str, Any], timeout_s: float | None = None) -> bool:
    """Whether `program` passes a parsed test spec."""
    timeout = timeout_s or spec.get("timeout_s") or DEFAULT_TIMEOUT_S
    if "io" in spec:
        return run_io_tests(program, spec["io"], timeout)
    return run_tests(humaneval_program(spec, program), humaneval_tests(spec), timeout)


def grade_programs(jobs: Sequence[CodeJob], workers: int) -> list[bool]:
    """Verdicts of `jobs`, in order, `workers` sandboxed runs at a time."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="code-grader") as pool:
        return list(pool.map(lambda job: run_spec(job.program, job.spec, job.timeout_s), jobs))


def grade_code(response: str, answer: str | Mapping[str, Any]) -> bool:
    """The `code` grader: the response's extracted program against the test spec in `answer`."""
    return run_spec(extract_program(response), parse_test_spec(answer))


def io_cases_of(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """stdin/stdout cases of a LiveCodeBench record (public_test_cases) or a TACO/APPS one (input_output)."""
    if "public_test_cases" in record:
        cases = _json_field(record, "public_test_cases")
        functional = [case for case in cases if case.get("testtype", "stdin") != "stdin"]
        if functional:
            raise ValueError("public_test_cases holds functional (call-based) tests; only stdin tests are run")
        return [{"input": case["input"], "output": case["output"]} for case in cases]
    if "input_output" in record:
        io = _json_field(record, "input_output")
        if "fn_name" in io:
            raise ValueError("input_output names fn_name (call-based tests); only stdin tests are run")
        return [{"input": _text(given), "output": _text(wanted)} for given, wanted in zip(io["inputs"], io["outputs"])]
    raise ValueError(f"record has neither 'public_test_cases' nor 'input_output'; keys: {sorted(record)}")


def _json_field(record: Mapping[str, Any], key: str) -> Any:
    value = record[key]
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise ValueError(f"record key '{key}' is not JSON: {error}") from error


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)
