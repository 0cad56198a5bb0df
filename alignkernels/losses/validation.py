"""Validation of the losses' configuration values: counts, lengths and numeric hyper-parameters.

A count that is zero, negative, a bool or not an integer would otherwise reach a division and give
a zero, infinite or sign-flipped loss with no error; every loss checks its counts here so the
error names the argument. ``num_items_in_batch`` may be an int or a numeric scalar tensor (TRL
and ``transformers`` pass a tensor); checking a tensor's value costs one host sync.
"""
from __future__ import annotations

import math
import numbers

import torch

from .._utils import check_tensor


def check_count(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``: ``TypeError`` for a bool, float, str, ...; ``ValueError``
    below ``minimum``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool and not value.dtype.is_complex:  # fmt: skip
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (a count), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_num_items(name: str, value, *, device, dtype, minimum: int = 1, valid_tokens=None) -> torch.Tensor:
    """A token count given as an int ``>= minimum`` or a finite numeric scalar tensor ``>=
    minimum`` (one host sync), returned as a 0-d tensor of ``dtype`` on ``device``.

    ``valid_tokens`` (an int or a 0-d tensor: the valid tokens of this batch), with ``minimum=0``: a
    count of 0 is accepted only when that is 0 too -- TRL passes 0 when every completion of the
    batch is masked (and clamps it at 1); with valid tokens present it is a ``ValueError``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(
                f"{name} must be an int or a numeric scalar tensor (a token count), got a {value.dtype} tensor of "
                f"shape {tuple(value.shape)}"
            )
        count = value.detach().reshape(()).to(device=device, dtype=dtype)
        number = float(count.item())  # one host sync: a bad count is an error, not a wrong loss
        if not (number >= minimum and math.isfinite(number)):
            raise ValueError(f"{name} must be a token count >= {minimum}, got {number}")
    else:
        number = check_count(name, value, minimum=minimum)
        count = torch.tensor(float(number), dtype=dtype, device=device)
    if number == 0 and valid_tokens is not None and int(valid_tokens) > 0:  # a sync only for a zero count
        raise ValueError(
            f"{name} is 0 but the batch has {int(valid_tokens)} valid tokens: it must count the valid tokens of "
            "the whole batch (all processes, all accumulation steps)"
        )
    return count


def check_number(name: str, value, *, allow_none: bool = False) -> float | None:
    """A finite real number (int, float or a one-element tensor) as a float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name} must be a number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_length_tensor(name: str, t: torch.Tensor) -> None:
    """Per-sequence token counts ``[B]``: integer or float, never bool, never negative or NaN."""
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold token counts (an integer or float tensor), got {t.dtype}")
    if t.numel() and bool((~(t >= 0)).any().item()):  # one host sync; NaN fails `>= 0` too
        raise ValueError(f"{name} must be token counts >= 0, got {t.tolist() if t.numel() <= 8 else t}")


def check_token_tensors(logp, advantages, *, per_sequence: tuple[str, ...] = (), **tensors) -> tuple[int, int]:
    """A policy loss's ``[B, T]`` inputs: ``logp`` floating ``[B, T]``; each of ``tensors`` (None skipped)
    of that shape (``[B, 1]`` too for the names in ``per_sequence``), floating unless its name ends in
    ``mask``; ``advantages`` floating ``[B]``, ``[B, 1]`` or ``[B, T]``. Errors name the argument.
    Returns ``(B, T)``."""
    check_tensor("logp", logp, floating=True)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t, floating=not name.endswith("mask"))
        if tuple(t.shape) != (B, T) and not (name in per_sequence and tuple(t.shape) == (B, 1)):
            extra = f" or {(B, 1)}" if name in per_sequence else ""
            raise ValueError(f"{name} must have the shape of logp {(B, T)}{extra}, got {tuple(t.shape)}")
    check_tensor("advantages", advantages, floating=True)
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or {(B, T)}, got {tuple(advantages.shape)}")
    return B, T


def typed_value(name: str, cls, value, keywords: dict):
    """A typed value (a ``NamedTuple``, or a class listing its fields in ``_fields`` as one does) given
    whole as ``name=`` or field by field as keywords: the entries of ``keywords`` named as its fields
    are popped into a new ``cls``. Both
    at once, or a ``value`` of another type, is a ``TypeError`` naming them (as Python's "multiple
    values for argument")."""
    given = {k: keywords.pop(k) for k in cls._fields if k in keywords}
    if value is None:
        return cls(**given)
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    if given:
        raise TypeError(f"pass {name}= or its fields as keywords, not both: got {name}= and {', '.join(given)}=")
    return value


def no_other_keywords(function: str, keywords: dict) -> None:
    """What ``typed_value`` left of a ``**keywords``: anything is Python's ``TypeError`` naming it."""
    if keywords:
        raise TypeError(f"{function}() got an unexpected keyword argument {next(iter(keywords))!r}")
