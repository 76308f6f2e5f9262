"""Directory layout of a stepwise checkpoint root, and its atomic publication.

    ROOT/latest                 text: the name of the newest complete iteration directory
    ROOT/iter_0000100/          megatron dist_checkpointing directory (+ stepwise.json)
    ROOT/hf/                    the source HF config.json + tokenizer files (the way back needs nothing else)

An iteration is written to `iter_XXXXXXX.tmp/`, fsynced, renamed into place only when complete, and
`latest` is replaced atomically (temporary file + rename) after that, so a crash at any point leaves
the previous checkpoint loadable. `stepwise.json` records every file's size and CRC-32; loading
checks them, so a truncated, missing or corrupted (same size, other bytes) shard is an error naming
that file, never a silent load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

from stepwise.data.jsonl import _fsync_dir, atomic_write_text
from stepwise.parallel import inject

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
    if name and (path / META).is_file():
        return path
    aside = root / (name + ".old")  # publish() was replacing this very iteration when it stopped
    if name and (aside / META).is_file():
        return aside
    raise CheckpointError(f"{pointer}: points to '{name}', which is missing or incomplete (no {META})")


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
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable ({error})") from None


def file_sizes(directory: str | Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file under `directory` (the publication manifest)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def verify_files(iteration_dir: str | Path, meta: dict) -> None:
    """Raise CheckpointError naming the first listed file that is missing or has the wrong size.

    Checkpoints published before the manifest existed (no "files" in their meta) pass unchecked."""
    iteration_dir = Path(iteration_dir)
    for name, size in (meta.get("files") or {}).items():
        path = iteration_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (incomplete or damaged checkpoint)")
        found = path.stat().st_size
        if found != size:
            raise CheckpointError(f"{path}: {found} bytes, {size} when published (truncated or corrupt)")


def crc32(path: Path, chunk_bytes: int = 1 << 24) -> str:
    """CRC-32 of a file, read in chunks (zlib: about a GB/s per process), as 8 hex digits."""
    value = 0
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def file_checksums(directory: str | Path, names: list[str]) -> dict[str, str]:
    """{name: CRC-32} of the files `names` under `directory`."""
    return {name: crc32(Path(directory) / name) for name in names}


_VERIFIED: set[tuple[str, str, int, int]] = set()  # (file, CRC-32, size, mtime) this process has checked
# A checkpoint read by many steps (pi0 for sampling, scoring and every export) is checksummed once: a
# verified file leaves a stamp (CRC-32, size, mtime) in ITER/.verified/, trusted while the file is unchanged.
VERIFIED_STAMPS = ".verified"


def verify_checksums(iteration_dir: str | Path, meta: dict, names: list[str] | None = None) -> None:
    """Raise CheckpointError naming the first of `names` (default: every file with a recorded CRC-32)
    whose bytes differ from publication. Checkpoints published without checksums pass unchecked. A
    file this process has already checked, unchanged since (same size and mtime), is not read again:
    a worker loading one checkpoint into two models, a stage exporting two parts of one."""
    recorded = meta.get("crc32") or {}
    for name in sorted(recorded) if names is None else names:
        path = Path(iteration_dir) / name
        status = path.stat()
        key = (str(path.resolve()), recorded[name], status.st_size, status.st_mtime_ns)
        stamp = Path(iteration_dir) / VERIFIED_STAMPS / name.replace("/", "%")
        seen = f"{recorded[name]} {status.st_size} {status.st_mtime_ns}\n"
        if key in _VERIFIED or (stamp.is_file() and stamp.read_text() == seen):
            continue
        found = crc32(path)
        if found != recorded[name]:
            raise CheckpointError(f"{path}: CRC-32 {found}, {recorded[name]} when published (corrupt)")
        _VERIFIED.add(key)
        try:
            atomic_write_text(stamp, seen)
        except OSError:  # a read-only checkpoint: this process still remembers
            pass


WRITER_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # torch_dist names the data files of global rank N so


def writer_rank(name: str, world_size: int) -> int:
    """The rank that wrote the checkpoint file `name` (its data files carry the writer's rank); 0 for the
    rest (metadata, common state), which rank 0 writes, and for a rank outside this world."""
    found = WRITER_FILE.fullmatch(Path(name).name)
    rank = int(found.group(1)) if found else 0
    return rank if rank < world_size else 0


def fsync_files(directory: str | Path, names: list[str], directories: bool = False) -> None:
    """fsync the files `names` under `directory` (a rank's own writes), and its directories when asked."""
    directory = Path(directory)
    for name in names:
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if directories:
        for path in sorted(directory.rglob("*")):
            if path.is_dir():
                _fsync_dir(path)
        _fsync_dir(directory)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and directory under `directory` (flushes this node's cache of the writes)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(directory)


def staging_dir(root: str | Path, step: int) -> Path:
    """A fresh `iter_XXXXXXX.tmp/` to write into (a stale one from a crash is removed)."""
    path = Path(root) / (iteration_name(step) + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(root: str | Path, step: int, meta: dict, checksums: dict[str, str] | None = None) -> Path:
    """Finish a staged (and fsynced) iteration: write its meta with the file manifest (sizes, and the
    CRC-32 of each file: `checksums`, else computed here), rename it into place, repoint `latest`. An
    existing iteration of the same step is moved aside first and deleted last; until `latest` is
    rewritten, `latest_iteration` falls back to the moved-aside copy."""
    root = Path(root)
    staged = root / (iteration_name(step) + ".tmp")
    sizes = file_sizes(staged)
    checksums = file_checksums(staged, sorted(sizes)) if checksums is None else checksums
    manifest = {**meta, "files": sizes, "crc32": checksums}
    atomic_write_text(staged / META, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    final = root / iteration_name(step)
    aside = root / (iteration_name(step) + ".old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staged, final)
    _fsync_dir(root)
    inject.kill_point("renamed", step)
    atomic_write_text(root / LATEST, iteration_name(step) + "\n")
    shutil.rmtree(aside, ignore_errors=True)
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
