"""The ``verl.plugins`` entry point of alignkernels: verl imports this module on every ``import verl``
(``VERL_USE_EXTERNAL_PLUGINS``, "auto" by default), in the driver and in each Ray worker.

It does nothing unless the environment asks: with ``ALIGNKERNELS_VERL=1`` (e.g. in Ray's
``runtime_env={"env_vars": {"ALIGNKERNELS_VERL": "1"}}``) it calls
:func:`alignkernels.integrations.verl.apply_from_env`, so every process that imports verl runs its
head on alignkernels before any engine is built. Installing alignkernels alone changes nothing.
The same module can be named as verl's ``actor_rollout_ref.model.external_lib``. A bad option value
is logged as an error (verl's plugin loader swallows a plugin's exception) and raised.
"""
from __future__ import annotations

import logging

from alignkernels.integrations.activation import env_switch

ENV_SWITCH = "ALIGNKERNELS_VERL"


def _activate():
    try:
        if env_switch(ENV_SWITCH):
            from alignkernels.integrations.verl import apply_from_env

            apply_from_env()
    except Exception:
        # verl's plugin loader catches and only debug-logs a plugin's exception: say it loudly first
        logging.getLogger("alignkernels").exception("alignkernels: %s is set but the verl drop-in failed", ENV_SWITCH)
        raise


_activate()
