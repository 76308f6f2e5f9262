"""Built-in stages; importing this package registers them."""
from stepwise.pipeline.stages import data, model, report, sampling  # noqa: F401
