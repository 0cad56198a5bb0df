"""OpenRLHF drop-in: one call (or one environment variable in the Ray workers) and OpenRLHF's actor
computes its log-probs and entropies with alignkernels.

    import alignkernels.integrations.openrlhf as ak_openrlhf
    ak_openrlhf.apply()      # in the process that runs the actor (a Ray worker: see below)

The seams (OpenRLHF 0.11.2), rebound by :mod:`alignkernels.integrations.rebind` in every loaded
``openrlhf`` module that binds them (``openrlhf.models.actor`` imports both by name) and in the
defining module ``openrlhf.models.utils`` (so later imports get ours):

- ``log_probs_from_logits(logits, labels, temperature=1.0)`` → :func:`alignkernels.token_logprobs`:
  ``log softmax(logits / T)[label]``, fp32, one pass over the logits, O(chunk x V) extra memory.
  OpenRLHF's divides ``logits`` **in place** when ``T != 1``; ours leaves ``logits`` unchanged
  (``Actor.forward`` divides before calling it and passes ``T = 1``).
- ``compute_entropy(logits)`` → ``token_logprobs(..., return_entropy=True)``: the entropy without
  the ``[N, V]`` softmax OpenRLHF builds (and keeps for backward).

Semantics: OpenRLHF's values and gradients (fp32: ~1e-6 relative, pinned in
``tests/frameworks_integration/test_openrlhf.py`` against OpenRLHF's own functions); outputs are
fp32 whatever the logits dtype (OpenRLHF returns bf16 for bf16 logits).

Not yet: ``apply(fused_forward=True)`` (an ``Actor.forward`` on the backbone + ``linear_logprobs``,
never building the logits) and ``apply(losses=True)`` raise ``NotImplementedError``.

``import openrlhf.models`` needs ``flash_attn`` (``openrlhf/models/ring_attn_utils.py`` imports it
at module level); where it is missing :func:`apply` raises an ``ImportError`` saying so.

Worker processes: :func:`worker_setup` is a Ray ``worker_process_setup_hook`` (applies unless
``ALIGNKERNELS_OPENRLHF=0``); options from ``ALIGNKERNELS_OPENRLHF_BACKEND``
(``docs/INTEGRATION.md``, "OpenRLHF").
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from alignkernels.integrations.activation import env_choice, env_switch
from alignkernels.integrations.rebind import DropIn, Patch, Swap
from alignkernels.ops.token_logprobs import token_logprobs

__all__ = [
    "apply",
    "remove",
    "is_applied",
    "adapter_calls",
    "options",
    "worker_setup",
    "apply_from_env",
    "Patch",
    "Options",
    "log_probs_from_logits",
    "compute_entropy",
    "ENV_SWITCH",
]

# backends of token_logprobs an apply() may name
LOGITS_BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
ENV_SWITCH = "ALIGNKERNELS_OPENRLHF"


@dataclass(frozen=True)
class Options:
    """What :func:`apply` was asked for (the last call wins)."""

    backend: str = "auto"


_STATE = DropIn("openrlhf", Options())
_HANDLE = Patch(_STATE)


def adapter_calls() -> int:
    """How many times OpenRLHF called one of this module's replacements since the last :func:`apply`
    that patched it: a check that a run really uses alignkernels."""
    return _STATE.calls


def options() -> Options:
    """The options in effect (those of the last :func:`apply`)."""
    return _STATE.options


def is_applied() -> bool:
    """Whether :func:`apply` is in effect."""
    return _STATE.applied


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``openrlhf.models.utils.log_probs_from_logits`` on :func:`alignkernels.token_logprobs`:
    ``log softmax(logits / temperature)[label]``, fp32, shape of ``labels``; ``logits`` is not
    modified (OpenRLHF's divides it in place when ``temperature != 1``)."""
    _STATE.count()
    return token_logprobs(logits, labels, temperature=temperature, backend=_STATE.options.backend)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``openrlhf.models.utils.compute_entropy``: entropy of ``softmax(logits)`` over the last
    dimension, fp32, differentiable, without materialising the softmax."""
    _STATE.count()
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True, backend=_STATE.options.backend)[1]


def _swaps() -> list[Swap]:
    try:
        utils = importlib.import_module("openrlhf.models.utils")
    except ImportError as e:
        raise ImportError(
            f"alignkernels.integrations.openrlhf needs openrlhf.models importable (OpenRLHF 0.11.2 imports flash_attn "
            f"in openrlhf/models/ring_attn_utils.py): {e}"
        ) from e
    swaps = []
    for name, replacement in (("log_probs_from_logits", log_probs_from_logits), ("compute_entropy", compute_entropy)):
        original = vars(utils).get(name)
        if original is None:
            raise ImportError(f"alignkernels.integrations.openrlhf: openrlhf.models.utils.{name} not found")
        swaps.append(Swap(original, replacement))
    return swaps


def apply(*, backend: str = "auto", fused_forward: bool = False, losses: bool = False) -> Patch:
    """Make OpenRLHF compute its actor's log-probs and entropies with alignkernels (see the module
    docstring). Call in the process that runs the actor (a Ray worker: :func:`worker_setup`).
    Idempotent; the options of the last call win. A failed call leaves OpenRLHF as it was.

    Args:
        backend: :func:`alignkernels.token_logprobs` backend.
        fused_forward: not implemented yet: ``NotImplementedError``.
        losses: not implemented yet: ``NotImplementedError``.

    Returns a :class:`Patch` (``.remove()``, context manager).
    """
    if fused_forward:
        raise NotImplementedError(
            "alignkernels.integrations.openrlhf.apply(fused_forward=True): a fused Actor.forward (backbone + "
            "linear_logprobs, no [N, V] logits) is not implemented yet: it still needs the packed / ring-attention "
            "path, VLM inputs, callers that ask for the logits (return_output) and MoE aux losses handled; "
            "apply() without it swaps log_probs_from_logits and compute_entropy"
        )
    if losses:
        raise NotImplementedError(
            "alignkernels.integrations.openrlhf.apply(losses=True): swapping OpenRLHF's PolicyLoss / ValueLoss / "
            "DPOLoss is not implemented yet; apply() without it swaps the log-prob and entropy functions"
        )
    if not isinstance(backend, str) or backend not in LOGITS_BACKENDS:
        raise ValueError(f"apply(): backend must be one of {LOGITS_BACKENDS}, got {backend!r}")
    _STATE.install(_swaps, Options(backend))
    return _HANDLE


def remove() -> None:
    """Undo :func:`apply`: every OpenRLHF name bound to a replacement gets its original back
    (modules imported after :func:`apply` included)."""
    _STATE.remove()


def apply_from_env(*, required: bool = False) -> Patch | None:
    """Apply with the backend from ``ALIGNKERNELS_OPENRLHF_BACKEND`` when ``ALIGNKERNELS_OPENRLHF`` is
    on, or when ``required`` and it is not explicitly off; ``None`` when nothing was applied. A bad
    value is a ``ValueError`` naming the variable."""
    switch = env_switch(ENV_SWITCH)
    if not (switch or (required and switch is None)):
        return None
    return apply(backend=env_choice(ENV_SWITCH + "_BACKEND", LOGITS_BACKENDS, "auto"))


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: ``runtime_env={"worker_process_setup_hook":
    "alignkernels.integrations.openrlhf.worker_setup"}``. Applies in each worker unless
    ``ALIGNKERNELS_OPENRLHF=0``."""
    apply_from_env(required=True)
