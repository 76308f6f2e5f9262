"""Where the planner reads each model's architecture.

The policy's: `<model.path>/config.json` (or model.path itself, a config.json file) when it exists here,
else `model.hf_config`. A cluster recipe names `/models/...`, which a laptop lacks: `stepwise plan
--model-config PATH` stands in for it (`stand_ins` turns the flags into recipe overrides before the
recipe is loaded, so validation reads the same file), and `--critic-config PATH` for the other starting
models, `skywork_dapo.critic_init` and `dqo_data.value_init`; without that flag they are planned with the
policy's architecture, which the notes say.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepwise.config.loader import ConfigError
from stepwise.config.schema import RecipeConfig
from stepwise.models.hf_config import ConfigError as HFConfigError
from stepwise.models.hf_config import ModelArch, arch_from_hf, arch_from_hf_dict
from stepwise.plan.defaults import TRAINED_TOKENIZER_VOCAB

POLICY_KEY = "model.path"
START_KEYS = ("skywork_dapo.critic_init", "dqo_data.value_init")  # other starting models: --critic-config


class PlanError(ConfigError):
    """The planner cannot compute (the message names the recipe key or flag to fix); a ConfigError, so the
    command line reports it as it reports any recipe error (exit 2)."""


@dataclass(frozen=True)
class Model:
    """An architecture to plan and the name to show for it."""

    name: str
    arch: ModelArch


@dataclass(frozen=True)
class Models:
    policy: Model
    critic: Model  # skywork_dapo.critic_init's, else the policy's
    value: Model  # dqo_data.value_init's, else the policy's


@dataclass
class StandIns:
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def has_config(path) -> bool:
    """Whether `path` is a config.json file or a directory holding one."""
    if not path:
        return False
    path = Path(path)
    return (path / "config.json").is_file() if path.is_dir() else path.is_file()


def model_name(path: str | Path) -> str:
    path = Path(path)
    return path.parent.name if path.name == "config.json" else (path.stem if path.suffix == ".json" else path.name)


def _raw_settings(recipe: str | Path, overrides: list[str]) -> dict[str, object]:
    """The model keys as the recipe, its defaults and the overrides set them, read before loading (the
    loader refuses a model path that does not exist here)."""
    from stepwise.config.loader import _layers

    keys = (POLICY_KEY, "model.hf_config", *START_KEYS)
    settings: dict[str, object] = dict.fromkeys(keys)
    for _, data in _layers(Path(recipe)):
        for key in keys:
            section, name = key.split(".")
            settings[key] = (data.get(section) or {}).get(name, settings[key])
    for item in overrides:
        key, _, value = item.partition("=")
        if key in settings:
            settings[key] = None if value in ("", "null", "None") else value
        elif key.startswith("model.hf_config."):
            settings["model.hf_config"] = True
    return settings


def stand_ins(recipe: str | Path, overrides: list[str], model_config: str | None,
              critic_config: str | None) -> StandIns:
    """Overrides putting the flags' config files in place of model paths this machine lacks."""
    result = StandIns()
    for flag, path in (("--model-config", model_config), ("--critic-config", critic_config)):
        if path and not has_config(path):
            raise PlanError(f"{flag} {path}: no config.json there (expected a config.json file or its directory)")
    settings = _raw_settings(recipe, overrides)
    policy_path = settings[POLICY_KEY]
    if has_config(policy_path) or (policy_path is None and settings["model.hf_config"]):
        if model_config:
            own = POLICY_KEY if policy_path else "model.hf_config"
            result.notes.append(f"--model-config ignored: the recipe's {own} gives the policy's architecture")
        policy_source = policy_path
    elif model_config:
        result.overrides.append(f"{POLICY_KEY}={model_config}")
        result.notes.append(f"{POLICY_KEY}={policy_path}: planned with --model-config {model_config}")
        policy_source = model_config
    else:
        where = f"{POLICY_KEY}={policy_path} has no config.json here" if policy_path else \
            f"{POLICY_KEY} is unset and model.hf_config is empty"
        raise PlanError(f"no model architecture to plan with: {where}; pass --model-config PATH "
                        f"(a config.json file or its directory)")
    for key in START_KEYS:
        path = settings[key]
        if path is None or has_config(path):
            continue
        result.overrides.append(f"{key}={critic_config or policy_source or 'null'}")
        result.notes.append(f"{key}={path}: planned with --critic-config {critic_config}" if critic_config else
                            f"{key}={path} has no config.json here and no --critic-config was given: planned "
                            f"with the policy's architecture")
    return result


def _read(path: str, key: str) -> Model:
    try:
        return Model(model_name(path), arch_from_hf(path))
    except HFConfigError as error:
        raise PlanError(f"{key}: {error}") from None


def resolve_models(config: RecipeConfig) -> Models:
    """The architectures of a loaded recipe (PlanError when one cannot be read)."""
    if config.model.path:
        policy = _read(config.model.path, POLICY_KEY)
    elif config.model.hf_config:
        fields = dict(config.model.hf_config)
        fields.setdefault("vocab_size", config.tokenizer.vocab_size or TRAINED_TOKENIZER_VOCAB)
        try:
            policy = Model("model.hf_config", arch_from_hf_dict(fields, source="model.hf_config"))
        except HFConfigError as error:
            raise PlanError(str(error)) from None
    else:
        raise PlanError(f"no model architecture to plan with: {POLICY_KEY} is unset and model.hf_config is empty")
    critic, value = (_read(path, key) if path else policy
                     for key, path in zip(START_KEYS, (config.skywork_dapo.critic_init, config.dqo_data.value_init)))
    return Models(policy, critic, value)
