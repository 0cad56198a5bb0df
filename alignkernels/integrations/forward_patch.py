"""A ``forward`` set on one module instance that stays with that instance when it is copied.

The drop-ins (``patch_causal_lm``, ``patch_reward_model``) give one model instance a second
forward mode without touching its class, so DDP/FSDP wrappers applied afterwards still run their
hooks around it and other instances of the class are unaffected. The obvious way to do that,
``module.forward = types.MethodType(closure, module)`` with the original forward captured in the
closure, breaks the usual ways of making a second model from the first:

- ``copy.deepcopy`` (TRL's ``create_reference_model``, hand-made reference models) rebinds the
  method to the copy but copies the closure by reference, so the copy's plain forward (and its
  ``generate``) silently runs the *original* model's weights;
- ``pickle`` stores a bound method as ``getattr(module, "forward")``, which on load resolves to
  the class forward: the copy comes back unpatched while still looking patched.

:class:`InstanceForward` is a small picklable callable object instead: it holds the module it
belongs to (``copy.deepcopy`` maps that reference to the copy through its memo, ``pickle``
through its own) and, rather than a captured bound method, the previous *instance* override if
there was one (``None`` means the class's ``forward``, looked up on every call). Subclasses
implement :meth:`__call__` and call :meth:`original` for the unpatched path.
``save_pretrained`` stores weights and config only: a reloaded model is unpatched, as any model
fresh from ``from_pretrained`` (patch it again).
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["InstanceForward"]


class _ForwardSignature:
    """``__signature__`` of an :class:`InstanceForward`: the original forward's, so ``generate``
    (which validates model kwargs against ``inspect.signature(model.forward)``) sees the model's
    real parameters. ``None`` on the class itself (``inspect.signature`` of the class still works)."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return None
        target = obj.previous if obj.previous is not None else type(obj.module).forward.__get__(obj.module)
        try:
            return inspect.signature(target)
        except (TypeError, ValueError):
            return None


class InstanceForward:
    """Base of the patched forwards: ``module.forward = Subclass(module, ...)``.

    ``previous`` is the instance-level forward that was there before (``None``: the class's).
    """

    __signature__ = _ForwardSignature()

    def __init__(self, module: torch.nn.Module, previous=None):
        self.module = module
        self.previous = previous

    @classmethod
    def install(cls, module: torch.nn.Module, *args, **kwargs) -> "InstanceForward":
        """Set ``module.forward`` to ``cls(module, previous, *args, **kwargs)``; if it already is a
        ``cls``, return the existing one (the caller updates its options)."""
        current = vars(module).get("forward")
        if isinstance(current, cls) and current.module is module:
            return current
        patched = cls(module, current, *args, **kwargs)
        module.forward = patched
        return patched

    @classmethod
    def installed(cls, module: torch.nn.Module) -> "InstanceForward | None":
        current = vars(module).get("forward")
        return current if isinstance(current, cls) and current.module is module else None

    @classmethod
    def uninstall(cls, module: torch.nn.Module) -> bool:
        """Restore the forward found by :meth:`install`; ``False`` if ``module`` is not patched by ``cls``."""
        patched = cls.installed(module)
        if patched is None:
            return False
        del vars(module)["forward"]
        if patched.previous is not None:
            module.forward = patched.previous
        return True

    def original(self, *args, **kwargs):
        """The forward this patch replaced, called on this instance."""
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({type(self.module).__name__})"
