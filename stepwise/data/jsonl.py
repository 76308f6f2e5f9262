"""Strict JSONL reading and atomic writing.

Every error names the file, the line and the key; every write goes to a temporary file in the
same directory, is fsynced and renamed into place, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping


class DataError(ValueError):
    """Bad input data; the message starts with `path:line:`."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle whose bytes replace `path` whole when the block ends (nothing on an error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    with atomic_output(path) as handle:
        handle.write(data)


def atomic_concat(sources: Iterable[str | os.PathLike], path: str | os.PathLike) -> None:
    """`path` atomically becomes the concatenation of `sources`, streamed (never whole in memory)."""
    with atomic_output(path) as handle:
        for source in sources:
            with open(source, "rb") as part:
                shutil.copyfileobj(part, handle, 1 << 20)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Atomically write records, one JSON object per line, streamed (a generator is never held whole);
    returns the count."""
    count = 0
    with jsonl_output(path) as write:
        for record in records:
            write(record)
            count += 1
    return count


@contextlib.contextmanager
def jsonl_output(path: str | os.PathLike) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """Write a JSONL file record by record (`write(record)`); it appears atomically, whole, at the end."""
    with atomic_output(path) as handle:
        yield lambda record: handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}


def _check_field(where: str, record: Mapping[str, Any], key: str, expected: type | tuple[type, ...]) -> None:
    if key not in record:
        raise DataError(f"{where}: missing key '{key}'")
    value = record[key]
    types = expected if isinstance(expected, tuple) else (expected,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise DataError(f"{where}: key '{key}' must be {names}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, str) and str in types and not value.strip():
        raise DataError(f"{where}: key '{key}' is empty")


def iter_jsonl(
    path: str | os.PathLike, required: Mapping[str, type | tuple[type, ...]] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield records of a JSONL file; raise DataError naming `path:line` and the key on the first bad one.

    Blank lines are skipped. `required` maps keys to the type(s) their values must have.
    """
    for where, line in numbered_lines(path):
        yield parse_record(where, line, required)


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(`path:line`, text) of every non-blank line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{path}:{line_number}", line


def parse_record(where: str, line: str, required: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """One JSON object from `line`, its `required` keys checked; DataError messages start with `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: bad JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, expected in (required or {}).items():
        _check_field(where, record, key, expected)
    return record


def read_jsonl(
    path: str | os.PathLike, required: Mapping[str, type | tuple[type, ...]] | None = None
) -> list[dict[str, Any]]:
    """All records of a JSONL file (see `iter_jsonl`)."""
    return list(iter_jsonl(path, required))
