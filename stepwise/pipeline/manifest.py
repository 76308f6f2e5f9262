"""Stage manifests: what a finished stage was made from, so a re-run can skip it.

A stage's key hashes the config keys it reads, its inputs' keys and the stepwise version; the
manifest is written atomically and last, so a stage killed midway has none and runs again.

Paths inside the run directory are stored relative to it (`${run}/sft/checkpoints`) and re-rooted when
read, so a run directory that is moved or copied (scratch to project storage, another mount point)
keeps working: its stages are still up to date and read their inputs from where the run now is.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from stepwise import __version__
from stepwise.data.jsonl import atomic_write_json

MANIFEST = "manifest.json"
RUN_MARK = "${run}"


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) else value


def select(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return _plain(value)


def stage_key(stage: str, config: Any, config_keys: tuple[str, ...], input_keys: dict[str, str]) -> str:
    payload = {
        "stage": stage,
        "config": {key: select(config, key) for key in config_keys},
        "inputs": input_keys,
        "version": __version__,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _map_strings(value: Any, change) -> Any:
    if isinstance(value, dict):
        return {key: _map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_strings(item, change) for item in value]
    return change(value) if isinstance(value, str) else value


def _run_relative(value: Any, run_dir: Path) -> Any:
    """Every string naming `run_dir` or a path below it, as `${run}` + the rest."""
    roots = sorted({str(Path(run_dir)), str(Path(run_dir).resolve())}, key=len, reverse=True)

    def relative(text: str) -> str:
        for root in roots:
            if text == root or text.startswith(root + "/"):
                return RUN_MARK + text[len(root):]
        return text

    return _map_strings(value, relative)


def _rooted(value: Any, run_dir: Path) -> Any:
    root = str(Path(run_dir))
    return _map_strings(value, lambda text: root + text[len(RUN_MARK):] if text.startswith(RUN_MARK) else text)


def read(stage_dir: Path, run_dir: Path) -> dict | None:
    """The finished stage's manifest with its paths rooted at `run_dir`; None if it has none (or a torn one)."""
    file = Path(stage_dir) / MANIFEST
    if not file.is_file():
        return None
    try:
        found = json.loads(file.read_text())
    except json.JSONDecodeError:
        return None
    return {**found, "summary": _rooted(found.get("summary", {}), run_dir)}


def write(stage_dir: Path, run_dir: Path, stage: str, key: str, summary: dict, seconds: float) -> dict:
    manifest = {"stage": stage, "key": key, "summary": _run_relative(summary, run_dir), "seconds": round(seconds, 2),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "version": __version__}
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return {**manifest, "summary": summary}
