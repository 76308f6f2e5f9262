"""Directory layout of a stepwise checkpoint root, and its atomic publication.

    ROOT/latest                 text: the name of the newest complete iteration directory
    ROOT/iter_0000100/          megatron dist_checkpointing directory (+ stepwise.json)
    ROOT/hf/                    the source HF config.json + tokenizer files (the way back needs nothing else)

An iteration is written to `iter_XXXXXXX.tmp/` and renamed into place only when complete; `latest`
is replaced atomically after that, so a crash at any point leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from stepwise.data.jsonl import atomic_write_text

LATEST = "latest"
META = "stepwise.json"
HF_DIR = "hf"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(RuntimeError):
    """A missing, incomplete or inconsistent checkpoint (the message names the path)."""


def iteration_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_iteration(root: str | Path) -> Path | None:
    """The directory `ROOT/latest` points to, or None when ROOT has no checkpoint yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / META).is_file():
        raise CheckpointError(f"{pointer}: points to {name}, which is missing or incomplete (no {META})")
    return path


def resolve(path: str | Path) -> Path:
    """Accept a checkpoint root (follows `latest`) or an iteration directory."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = latest_iteration(path)
    if found is None:
        raise CheckpointError(f"{path}: not a stepwise checkpoint (no '{LATEST}' file and no {META})")
    return found


def read_meta(iteration_dir: str | Path) -> dict:
    file = Path(iteration_dir) / META
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (incomplete checkpoint)")
    return json.loads(file.read_text())


def staging_dir(root: str | Path, step: int) -> Path:
    """A fresh `iter_XXXXXXX.tmp/` to write into (a stale one from a crash is removed)."""
    path = Path(root) / (iteration_name(step) + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(root: str | Path, step: int, meta: dict) -> Path:
    """Finish a staged iteration: write its meta, rename it into place, repoint `latest`."""
    root = Path(root)
    staged = root / (iteration_name(step) + ".tmp")
    atomic_write_text(staged / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    final = root / iteration_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    atomic_write_text(root / LATEST, iteration_name(step) + "\n")
    return final


def save_hf_metadata(root: str | Path, hf_config: dict, tokenizer_dir: str | Path | None) -> None:
    """Keep the source HF config.json and tokenizer files beside the checkpoints."""
    target = Path(root) / HF_DIR
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target / "config.json", json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, target / name)


def hf_metadata_dir(path: str | Path) -> Path:
    """`ROOT/hf` for a checkpoint root or one of its iteration directories."""
    path = Path(path)
    for candidate in (path / HF_DIR, path.parent / HF_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: no {HF_DIR}/config.json beside the checkpoint")
