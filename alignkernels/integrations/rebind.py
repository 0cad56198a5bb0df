"""Name rebinding across a framework's modules, undone exactly: the bookkeeping of the verl and
OpenRLHF drop-ins (:mod:`alignkernels.integrations.verl`, :mod:`alignkernels.integrations.openrlhf`).

A framework binds a function in two ways: as an attribute of its defining module (read at call
time, ``verl_F.entropy_from_logits(...)``, or by a lazy ``from m import f`` inside a function) and by
name in other modules (``from verl.utils.torch_functional import logprobs_from_logits`` at import).
:class:`Rebinding` replaces every binding of each original *object* (found by identity) in every
loaded module of the package, the defining module included; a module imported afterwards copies
the replacement from the defining module, so it is covered too. :meth:`Rebinding.undo` walks the
loaded modules again and puts the original back wherever a replacement is bound, which also
restores modules imported while the rebinding was in effect.

:class:`DropIn` is the state of one framework's ``apply()`` (the rebinding in effect, the options of the
last call, the adapter-call count) and :class:`Patch` the handle ``apply()`` returns.

Atomicity: :meth:`Rebinding.install` either rebinds everything or, if a ``setattr`` raises part-way,
restores what it had changed and re-raises; the caller validates and imports before installing, so
a failed ``apply()`` leaves the framework as it was.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["Swap", "Rebinding", "DropIn", "Patch", "package_modules"]


@dataclass(frozen=True)
class Swap:
    """One rebinding: every module-level name bound to ``original`` gets ``replacement``, and so does
    every attribute bound to it in ``owners`` (classes: a method such as ``Actor.forward``) and every
    value bound to it in a ``dict`` owner (a registry such as verl's ``POLICY_LOSS_REGISTRY``, changed
    in place: the same dict object)."""

    original: Any
    replacement: Any
    owners: tuple = ()


def package_modules(package: str) -> list:
    """The loaded modules of ``package`` (the package itself and its submodules), in a stable order."""
    prefix = package + "."
    return [m for n, m in sorted(list(sys.modules.items())) if (n == package or n.startswith(prefix)) and m is not None]


def _table(owner) -> dict:
    return owner if isinstance(owner, dict) else vars(owner)


def _bind(owner, name, value) -> None:
    if isinstance(owner, dict):
        owner[name] = value
    else:
        setattr(owner, name, value)


class Rebinding:
    """The swaps of one ``apply()`` over one package's loaded modules."""

    def __init__(self, package: str, swaps: list[Swap]):
        self.package = package
        self.swaps = list(swaps)

    def _bindings(self, wanted_by_id):
        owners = package_modules(self.package) + [o for s in self.swaps for o in s.owners]
        for owner in {id(o): o for o in owners}.values():  # each owner once, in order
            for name, value in list(_table(owner).items()):
                swap = wanted_by_id.get(id(value))
                if swap is not None:
                    yield owner, name, swap

    def install(self) -> int:
        """Rebind every original to its replacement; returns how many names were rebound."""
        by_original = {id(s.original): s for s in self.swaps}
        done = []
        try:
            for module, name, swap in list(self._bindings(by_original)):
                _bind(module, name, swap.replacement)
                done.append((module, name, swap))
        except BaseException:
            for module, name, swap in reversed(done):
                _bind(module, name, swap.original)
            raise
        return len(done)

    def undo(self) -> int:
        """Put every original back wherever one of the replacements is bound; returns how many."""
        by_replacement = {id(s.replacement): s for s in self.swaps}
        count = 0
        for module, name, swap in list(self._bindings(by_replacement)):
            _bind(module, name, swap.original)
            count += 1
        return count


class DropIn:
    """One framework's drop-in: the :class:`Rebinding` in effect (or ``None``), the options of the last
    ``apply()`` (read by the replacements at call time) and how many times the framework called them."""

    def __init__(self, package: str, options):
        self.package = package
        self.options = options
        self.rebinding: Rebinding | None = None
        self.calls = 0

    @property
    def applied(self) -> bool:
        return self.rebinding is not None

    def count(self) -> None:
        self.calls += 1

    def install(self, make_swaps, options) -> None:
        """Rebind (``make_swaps()`` is called only when not yet applied) and take ``options``; the
        count restarts when this call patches the framework. Nothing changes if ``make_swaps`` or the
        rebinding raises."""
        if self.rebinding is None:
            rebinding = Rebinding(self.package, make_swaps())
            rebinding.install()
            self.rebinding = rebinding
            self.calls = 0
        self.options = options

    def remove(self) -> None:
        if self.rebinding is not None:
            self.rebinding.undo()
            self.rebinding = None


class Patch:
    """What a drop-in's ``apply()`` returns: ``.remove()`` undoes it; also a context manager."""

    def __init__(self, drop_in: DropIn):
        self._drop_in = drop_in

    def remove(self) -> None:
        self._drop_in.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._drop_in.remove()
        return False
