"""The stage registry: a stage is a function `run(ctx) -> summary` with its dependencies and the
config keys it reads (which make up its manifest key)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    depends: tuple[str, ...]
    config_keys: tuple[str, ...]


STAGES: dict[str, Stage] = {}


def stage(name: str, depends: tuple[str, ...] = (), config_keys: tuple[str, ...] = ()):
    """Decorator registering a stage; a duplicate name is an error."""

    def decorate(run: Callable) -> Callable:
        if name in STAGES:
            raise ValueError(f"stage '{name}' is already registered")
        STAGES[name] = Stage(name, run, tuple(depends), tuple(config_keys))
        return run

    return decorate


def get(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]
