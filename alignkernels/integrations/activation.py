"""Activation from environment variables, for processes alignkernels cannot reach with a function call.

verl and OpenRLHF run their actors in Ray worker processes: an ``apply()`` in the driver changes
nothing there. Three hooks run code inside each worker: Ray's
``runtime_env={"worker_process_setup_hook": "<module>.worker_setup"}``, verl's
``actor_rollout_ref.model.external_lib=<module>`` (imported by the worker) and verl's ``verl.plugins``
entry points (imported by every ``import verl``). Options travel as environment variables
(``runtime_env={"env_vars": {...}}``); this module reads them, by name, with clear errors.

A variable is read as: a switch (``1/true/yes/on`` or ``0/false/no/off``, case-insensitive; unset or
empty = unset), a positive int, or one of a set of choices. Anything else is a ``ValueError`` naming the
variable and the value: a typo in a worker's environment fails loudly instead of running stock.
"""
from __future__ import annotations

import os

__all__ = ["env_switch", "env_positive_int", "env_choice"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_switch(name: str) -> bool | None:
    """``True`` / ``False`` for a set switch, ``None`` when unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {name} must be one of {_TRUE + _FALSE}, got {os.environ[name]!r}")


def env_positive_int(name: str) -> int | None:
    """A positive int, or ``None`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"environment variable {name} must be a positive int, got {os.environ[name]!r}")
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (``default`` when unset or empty)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"environment variable {name} must be one of {choices}, got {os.environ[name]!r}")
    return raw
