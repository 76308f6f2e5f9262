"""Loss plugins: a registry of named losses, each a pure tensor function plus a thin batch adapter.

Importing this package registers every built-in plugin.
"""
from stepwise.losses import registry
from stepwise.losses import sft as _sft  # noqa: F401  (registers "sft")
from stepwise.losses import critic_bce as _critic_bce  # noqa: F401
from stepwise.losses import skywork_dapo as _skywork_dapo  # noqa: F401
from stepwise.losses import dqo as _dqo  # noqa: F401
from stepwise.losses import dro as _dro  # noqa: F401
from stepwise.losses import dpo as _dpo  # noqa: F401
from stepwise.losses import kto as _kto  # noqa: F401

get = registry.get
names = registry.names
