"""Problem sets read from user-supplied files (no downloads): MATH, GSM8K and generic
`{"problem", "answer"}` records, as JSONL or parquet, into `{"id", "problem", "answer", "solution"}`
(`solution`: MATH's `solution`, GSM8K's full `answer`, a generic record's optional `solution`); and
code problems with unit tests (`load_code_problems`: TACO-style stdin/stdout problems, or any code
benchmark layout of stepwise.data.benchmarks) into `{"id", "problem", "answer"}` whose answer is the
test spec as JSON (stepwise.tasks.code).

MATH records carry `problem` + `solution` (the answer is the solution's last `\\boxed{}`; an optional
`unique_id` names the record, and an id-list file selects a subset such as MATH500); GSM8K records
carry `question` + `answer` (`... #### 42`). A record without an extractable answer is an error
naming the file and line.
"""
from __future__ import annotations

import json
from pathlib import Path

from stepwise.data.jsonl import DataError, iter_jsonl
from stepwise.tasks.answers import gsm8k_answer, last_boxed

DEFAULT_CODE_LAYOUT = "taco"  # the paper's code training set (TACO problems with unit tests)
FIELDS = {"math": {"problem": str, "solution": str}, "gsm8k": {"question": str, "answer": str},
          "generic": {"problem": str, "answer": (str, int, float)}}


def read_rows(path: Path, required: dict) -> list[tuple[str, dict]]:
    """(`path:line` or `path:row`, record) pairs from JSONL or parquet, with required fields checked."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to JSONL") from None
        rows = parquet.read_table(path).to_pylist()
        for index, row in enumerate(rows, start=1):
            for key in required:
                if key not in row or row[key] in (None, ""):
                    raise DataError(f"{path}:row {index}: missing key '{key}'")
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows, start=1)]
    return [(f"{path}:{i}", row) for i, row in enumerate(iter_jsonl(path, required), start=1)]


def load_problems(path: str | Path, kind: str, id_list: str | Path | None = None) -> list[dict]:
    """Records `{"id", "problem", "answer", "solution" (when known)}` of a `kind` in {"math", "gsm8k", "generic"}."""
    if kind not in FIELDS:
        raise ValueError(f"dataset kind '{kind}' is not one of {sorted(FIELDS)}")
    path = Path(path)
    out = []
    for where, row in read_rows(path, FIELDS[kind]):
        if kind == "math":
            problem, answer = row["problem"], last_boxed(row["solution"])
        elif kind == "gsm8k":
            problem, answer = row["question"], gsm8k_answer(row["answer"])
        else:
            problem, answer = row["problem"], str(row["answer"])
        if answer is None:
            raise DataError(f"{where}: no final answer in the reference solution")
        record = {"id": str(row.get("unique_id") or row.get("id") or f"{path.stem}-{len(out)}"),
                  "problem": problem, "answer": answer}
        solution = row["solution"] if kind == "math" else row["answer"] if kind == "gsm8k" else row.get("solution")
        if isinstance(solution, str) and solution.strip():
            record["solution"] = solution  # the reference solution text (the DQO paper's SFT baseline trains on it)
        out.append(record)
    return select_ids(out, path, id_list)


def select_ids(records: list[dict], path: Path, id_list: str | Path | None) -> list[dict]:
    """`records` in the order of the id-list file (one id a line), or all of them without one."""
    if id_list is None:
        return records
    wanted = [line.strip() for line in Path(id_list).read_text().splitlines() if line.strip()]
    by_id = {r["id"]: r for r in records}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DataError(f"{id_list}: ids not found in {path}: {missing[:3]} ({len(missing)} in all)")
    return [by_id[i] for i in wanted]


def load_code_problems(path: str | Path, layout: str | None = None, id_list: str | Path | None = None) -> list[dict]:
    """Records `{"id", "problem", "answer"}` of code problems in benchmark layout `layout` (taco, the
    default; livecodebench, humaneval, mbpp, ...); `answer` is the problem's test spec as JSON."""
    from stepwise.data.benchmarks import FORMATS, load_benchmark

    layout = layout or DEFAULT_CODE_LAYOUT

    if FORMATS.get(layout) is None or FORMATS[layout].task != "code":
        raise ValueError(f"code problem layout '{layout}' is not one of {code_layouts()}")
    records = [{"id": r["id"], "problem": r["problem"], "answer": json.dumps(r["answer"])}
               for r in load_benchmark(layout, path)]
    return select_ids(records, Path(path), id_list)


def code_layouts() -> list[str]:
    """The benchmark layouts whose records are code problems with tests."""
    from stepwise.data.benchmarks import FORMATS

    return sorted(name for name, form in FORMATS.items() if form.task == "code")
