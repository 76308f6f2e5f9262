"""Recipe configuration: dataclass schemas, YAML loading with `defaults`, overrides, validation."""
from stepwise.config.loader import ConfigError, load_recipe, to_yaml
from stepwise.config.schema import RecipeConfig

__all__ = ["ConfigError", "RecipeConfig", "load_recipe", "to_yaml"]
