"""Built-in stages; importing this package registers them."""
from stepwise.pipeline.stages import dapo_ablation, dapo_data, dapo_train, data, model, report, sampling  # noqa: F401
from stepwise.pipeline.stages import dqo_data, dqo_process, dqo_train, scoring  # noqa: F401
