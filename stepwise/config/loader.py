"""Load a recipe: YAML files with a `defaults` list (inherited, relative paths), then `key=value`
overrides, merged onto the dataclass schema; then cross-field validation.

Unknown keys and wrong types raise `ConfigError` naming the file, the line, the key path and the
closest valid name, before any process group exists.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from stepwise.config.schema import RecipeConfig


class ConfigError(ValueError):
    """A recipe that cannot run; the message names where and how to fix it."""


def _line_of(file: Path, key_path: str) -> int | None:
    """1-based line of `key_path` (dotted) in a YAML file, if it can be found."""
    try:
        node = yaml.compose(file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in key_path.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def _valid_keys(base: DictConfig, key_path: str) -> list[str]:
    parent = key_path.rsplit(".", 1)[0] if "." in key_path else ""
    node = OmegaConf.select(base, parent) if parent else base
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _explain(error: OmegaConfBaseException, base: DictConfig, where: str, file: Path | None) -> ConfigError:
    key_path = str(getattr(error, "full_key", "") or getattr(error, "key", "") or "?")
    line = _line_of(file, key_path) if file else None
    location = f"{where}:{line}" if line else where
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        leaf = key_path.rsplit(".", 1)[-1]
        valid = _valid_keys(base, key_path)
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(valid))}"
        return ConfigError(f"{location}: unknown key '{key_path}'{hint}")
    message = str(error).splitlines()[0]
    return ConfigError(f"{location}: key '{key_path}': {message}")


def _read_yaml(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ConfigError(f"{file}: no such recipe file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{file}{line}: bad YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def _layers(file: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The recipe and its `defaults`, base first (depth-first, each file once)."""
    file = file.resolve()
    if file in seen:
        raise ConfigError(f"{file}: 'defaults' cycle through {' -> '.join(str(p) for p in seen)}")
    data = _read_yaml(file)
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{file}: 'defaults' must be a list of YAML paths")
    layers: list[tuple[Path, dict[str, Any]]] = []
    for entry in defaults:
        parent = (file.parent / str(entry)).with_suffix(".yaml") if not str(entry).endswith(".yaml") else file.parent / str(entry)
        layers.extend(_layers(parent, seen + (file,)))
    layers.append((file, data))
    return layers


def _open_free_form(node: DictConfig, schema: type) -> None:
    """Struct mode everywhere except `dict[...]` fields (HF config fields, loss options)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        hint = hints[spec.name]
        child = node[spec.name]
        if typing.get_origin(hint) is dict:
            OmegaConf.set_struct(child, False)
        elif dataclasses.is_dataclass(hint) and isinstance(child, DictConfig):
            _open_free_form(child, hint)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Schema defaults <- defaults files <- the recipe <- overrides; validated."""
    from stepwise.config.validate import validate

    path = Path(path)
    merged: DictConfig = OmegaConf.structured(RecipeConfig)
    OmegaConf.set_struct(merged, True)
    _open_free_form(merged, RecipeConfig)
    for file, data in _layers(path):
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as error:
            raise _explain(error, merged, str(file), file) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise _explain(error, merged, f"override '{item}'", None) from None
    if merged.run.dir is None:
        merged.run.dir = str(Path("runs") / path.stem)
    try:
        config: RecipeConfig = OmegaConf.to_object(merged)
    except (ValueError, OmegaConfBaseException) as error:  # a section's own __post_init__ checks
        raise ConfigError(f"{path}: {str(error).splitlines()[0]}") from None
    validate(config, source=str(path))
    return config


def to_yaml(config: RecipeConfig) -> str:
    """The fully resolved recipe, as YAML (written into every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def load_resolved(text: str) -> RecipeConfig:
    """Inverse of `to_yaml` (used by stage workers launched under torchrun)."""
    merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.create(text))
    return OmegaConf.to_object(merged)
