"""The stage registry: a stage is a function `run(ctx) -> summary` with its dependencies and the
config keys it reads (which make up its manifest key)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stepwise.registry import Registry


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    depends: tuple[str, ...]
    config_keys: tuple[str, ...]
    iterative: bool = False  # repeated per Skywork DAPO iteration (own directory per iteration)


STAGES: Registry[Stage] = Registry("stage")
get = STAGES.get


def stage(name: str, depends: tuple[str, ...] = (), config_keys: tuple[str, ...] = (), iterative: bool = False):
    """Decorator registering a stage; a duplicate name is an error."""

    def decorate(run: Callable) -> Callable:
        STAGES.add(name, Stage(name, run, tuple(depends), tuple(config_keys), iterative))
        return run

    return decorate
