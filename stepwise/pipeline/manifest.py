"""Stage manifests: what a finished stage was made from, so a re-run can skip it.

A stage's key hashes the config keys it reads, its inputs' keys and the stepwise version; the
manifest is written atomically and last, so a stage killed midway has none and runs again.
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


def read(stage_dir: Path) -> dict | None:
    file = Path(stage_dir) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None


def write(stage_dir: Path, stage: str, key: str, summary: dict, seconds: float) -> dict:
    manifest = {"stage": stage, "key": key, "summary": summary, "seconds": round(seconds, 2),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "version": __version__}
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest
