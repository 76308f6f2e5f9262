"""Code grading: program extraction, fixture problems (HumanEval/MBPP layout and stdin/stdout from
LiveCodeBench and TACO layouts) graded right, the pipeline's `code` grader, and the sandbox holding
against an infinite loop, a fork bomb, a 1 GB allocation, 100 MB of stdout, a write outside its
temp dir and a loopback connection, in the fallback mode always and under bubblewrap where it works."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from stepwise.tasks.code import (CodeJob, extract_program, grade_programs, io_cases_of, outputs_match,
                                 parse_test_spec, run_io_tests, run_spec, run_tests)
from stepwise.tasks.grading import grade
from stepwise.tasks.sandbox import SandboxLimits, bwrap_usable, run_python

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data" / "code"
RESPONSES = json.loads((FIXTURES / "responses.json").read_text())
TIMEOUT_SLACK_S = 2.0  # interpreter start and teardown on a loaded 2-core machine

ISOLATIONS = ["fallback", pytest.param("bwrap", marks=pytest.mark.skipif(
    not bwrap_usable(), reason="bwrap is not installed or cannot create namespaces here (bwrap-only path)"))]


def _read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


HUMANEVAL = {record["task_id"]: record for record in _read_jsonl("humaneval_sample.jsonl")}
IO_SPECS = {record["question_id"]: {"io": io_cases_of(record)} for record in _read_jsonl("livecodebench_sample.jsonl")}
IO_SPECS.update({record["name"]: {"io": io_cases_of(record)} for record in _read_jsonl("taco_sample.jsonl")})


@pytest.mark.parametrize("response, program", [
    ("```python\na = 1\n```\ntext\n```python\nb = 2\n```\n", "b = 2\n"),
    ("```python\na = 1\n```\n```text\nnot code\n```", "a = 1\n"),
    ("```Python3\na = 1\n```", "a = 1\n"),
    ("```py\na = 1\n```", "a = 1\n"),
    ("```\nfirst\n```\n```c\nint x;\n```", "int x;\n"),
    ("no fences at all\nprint(1)", "no fences at all\nprint(1)"),
    ("intro\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # truncated: never closed
    ("```python\n```", ""),
])
def test_extract_program(response, program):
    assert extract_program(response) == program


@pytest.mark.parametrize("actual, expected, equal", [
    ("4  \n", "4\n", True), ("a\nb\n\n\n", "a\nb", True), ("a \t\nb", "a\nb\n", True),
    ("4\n", "5\n", False), (" 4\n", "4\n", False), ("a\n\nb\n", "a\nb\n", False), ("", "0\n", False),
])
def test_outputs_match(actual, expected, equal):
    assert outputs_match(actual, expected) is equal


def test_io_cases_of_both_layouts():
    assert IO_SPECS["fixture_spread"]["io"][0] == {"input": "3\n1 5 2\n", "output": "4\n"}
    assert IO_SPECS["fixture-reverse"]["io"][1] == {"input": "racecar\n", "output": "racecar\n7\n"}
    assert [len(spec["io"]) for spec in IO_SPECS.values()] == [3, 3]
    with pytest.raises(ValueError, match="functional"):
        io_cases_of({"public_test_cases": json.dumps([{"input": "1", "output": "2", "testtype": "functional"}])})
    with pytest.raises(ValueError, match="neither"):
        io_cases_of({"question": "?"})


@pytest.mark.parametrize("answer, key", [
    ({"entry_point": "f"}, "'test'"), ({"test": "assert True"}, "'entry_point'"), ({"io": [{"input": "1"}]}, "'io'"),
    ({"io": []}, "'io'"), ({"io": [{"input": "", "output": ""}], "timeout_s": 0}, "'timeout_s'"),
    ("[1, 2]", "JSON object"), ("{not json", "bad JSON"),
])
def test_bad_test_spec_names_the_key(answer, key):
    with pytest.raises(ValueError, match=key):
        parse_test_spec(answer)
    with pytest.raises(ValueError, match=key):
        grade("code", "```python\npass\n```", answer)


def test_fixture_problems_graded_right_in_parallel():
    specs = {**HUMANEVAL, **IO_SPECS}
    names = [(task, kind) for task, answers in RESPONSES.items() for kind in answers]
    jobs = [CodeJob(extract_program(RESPONSES[task][kind]), specs[task], 5.0) for task, kind in names]
    verdicts = grade_programs(jobs, workers=4)
    assert dict(zip(names, verdicts)) == {(task, kind): kind != "wrong" for task, kind in names}
    canonical = [run_spec(record["canonical_solution"], record, 5.0) for record in HUMANEVAL.values()]
    assert canonical == [True, True, True]


def test_code_grader_through_grade_entry_point():
    record = HUMANEVAL["Fixture/0"]
    spec = {key: record[key] for key in ("prompt", "test", "entry_point")}
    assert grade("code", RESPONSES["Fixture/0"]["correct"], spec) is True
    assert grade("code", RESPONSES["Fixture/0"]["wrong"], json.dumps(spec)) is False
    io_spec = json.dumps({**IO_SPECS["fixture_spread"], "timeout_s": 5})
    assert grade("code", RESPONSES["fixture_spread"]["correct"], io_spec) is True
    assert grade("code", RESPONSES["fixture_spread"]["wrong"], io_spec) is False


def _live_processes(uid: int | None, session_id: int) -> list[int]:
    """Live (not zombie: those are dead, waiting for init to reap them) processes of `uid` or the session."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[4])
        except (OSError, ValueError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].strip().startswith("Z"):
            continue
        if session == session_id or (uid is not None and str(uid) in fields["Uid"].split()):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_infinite_loop_times_out(isolation):
    limits = SandboxLimits(isolation=isolation)
    started = time.monotonic()
    assert run_tests("while True:\n    pass", "", 1.0, limits) is False
    assert time.monotonic() - started < 1.0 + TIMEOUT_SLACK_S
    assert run_tests("x = sum(range(1000))", "assert x == 499500", 5.0, limits) is True  # the same path passes


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_bomb_is_contained_and_cleaned_up(isolation):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    result = run_python(bomb, "", 1.0, SandboxLimits(isolation=isolation))
    assert not result.ok and result.timed_out
    assert time.monotonic() - started < 1.0 + TIMEOUT_SLACK_S
    assert _live_processes(result.uid if os.geteuid() == 0 else None, result.session_id) == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_process_that_leaves_the_session_is_killed(isolation):
    if os.geteuid() != 0 and isolation == "fallback":
        pytest.skip("not as root the fallback cannot find a process that left the session (documented)")
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    result = run_python(program, "", 5.0, SandboxLimits(isolation=isolation))
    assert result.ok
    assert _live_processes(result.uid if os.geteuid() == 0 else None, result.session_id) == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_one_gigabyte_allocation_fails(isolation):
    limits = SandboxLimits(isolation=isolation)
    assert run_tests("x = bytearray(1 << 30)", "assert len(x) == 1 << 30", 5.0, limits) is False
    assert run_tests("x = bytearray(1 << 20)", "assert len(x) == 1 << 20", 5.0, limits) is True


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_huge_stdout_is_capped(isolation):
    limits = SandboxLimits(isolation=isolation)
    flood = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n"
    tracemalloc.start()
    try:
        result = run_python(flood, "", 10.0, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.output_exceeded and not result.ok
    assert len(result.stdout) <= limits.output_bytes
    assert peak < 3 * limits.output_bytes < 100 << 20
    assert run_io_tests(flood, [{"input": "", "output": "x"}], 10.0, limits) is False


@pytest.fixture
def world_writable_dir():
    """A dir outside the sandbox's temp dir that anyone may write to (pytest's own tmp dirs are 0700,
    which would stop the sandbox uid before the sandbox does), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="stepwise-outside-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_write_outside_temp_dir_is_stopped(isolation, world_writable_dir):
    target = world_writable_dir / "escaped.txt"
    limits = SandboxLimits(isolation=isolation)
    assert run_tests(f"open({str(target)!r}, 'w').write('escaped')", "", 5.0, limits) is False
    assert not target.exists()
    assert run_tests("open('inside.txt', 'w').write('ok')", "assert open('inside.txt').read() == 'ok'", 5.0,
                     limits) is True


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_loopback_connection_is_stopped(isolation):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        assert run_tests(program, "", 5.0, SandboxLimits(isolation=isolation)) is False
        with pytest.raises(socket.timeout):
            listener.accept()
        with socket.create_connection(("127.0.0.1", port)):  # the listener itself works
            listener.accept()[0].close()
