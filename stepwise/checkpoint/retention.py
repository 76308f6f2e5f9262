"""Which published iterations of a checkpoint root to keep, and the deletion of the rest.

Kept: the newest `keep_last`, every iteration whose step is a multiple of `keep_every` (when > 0),
and always the one `latest` names. Pruning runs only after a publication (so the newest checkpoint
is complete before an older one goes), and it also clears staging leftovers of crashed saves
(`iter_*.tmp`, `iter_*.old`). Only one process (rank 0) prunes, between saves.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from stepwise.checkpoint import layout

_ITERATION = re.compile(r"^iter_(\d+)$")


def published_steps(root: str | Path) -> dict[int, Path]:
    """{step: directory} of the published iterations under `root`."""
    found = {}
    for path in Path(root).glob("iter_*"):
        match = _ITERATION.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return found


def steps_to_delete(steps: list[int], latest: int | None, keep_last: int, keep_every: int) -> list[int]:
    """The steps a prune removes (pure: the retention rule in one place)."""
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    if latest is not None:
        keep.add(latest)
    return [s for s in ordered if s not in keep]


def prune(root: str | Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete what the retention rule drops and stale staging directories; returns what went."""
    root = Path(root)
    latest_dir = layout.latest_iteration(root)
    if latest_dir is None:
        return []
    steps = published_steps(root)
    latest = next((s for s, p in steps.items() if p.name == latest_dir.name), None)
    doomed = [steps[s] for s in steps_to_delete(list(steps), latest, keep_last, keep_every)]
    doomed += [p for p in root.glob("iter_*") if p.is_dir() and p.suffix in (".tmp", ".old") and p != latest_dir]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
