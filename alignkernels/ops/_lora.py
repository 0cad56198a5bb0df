"""LoRA on the lm_head, fused into the lm-head engine's tiles.

A LoRA-adapted head computes raw logits ``x = h·Wᵀ + s·(h·Aᵀ)·Bᵀ (+ b)`` with ``A = lora_A [r, H]``,
``B = lora_B [V, r]`` and ``s = scaling`` (PEFT's ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA);
the logit transform (logit_scale, softcap, temperature) then applies to ``x`` as without LoRA.

Algorithm (one thin extra GEMM per tile, nothing of size ``[N, V]`` or ``[V, H]``):
- Forward: ``u = s·h·Aᵀ`` (``[n, r]``) for the compact rows, one GEMM per chunk of the plan's rows
  (:func:`lora_activation`: with ``batch_invariant=True``'s padded rows every one at the same shape,
  so a row's ``u`` is independent of the batch); each logits tile
  ``h[chunk]·W[block]ᵀ`` gets ``u[chunk]·B[block]ᵀ`` added in place (``addmm`` into the same fp32
  buffer) before the fold sees it. Torch and Triton folds consume that tile unchanged.
- Backward, with ``dx = d loss / d x`` the tile the fold returns:
  ``dh = dx·W + s·dx·B·A``;  ``dA = s·(dx·B)ᵀ·h``;  ``dB = dxᵀ·u``.
  Per tile: ``dU[chunk] += dx·B[block]`` (``[n, r]``, summed over vocab blocks) and
  ``grad_B[block] += dxᵀ·u[chunk]``; after the last tile ``grad_h += s·dU·A`` (one GEMM per
  chunk, :func:`add_lora_grad_hidden`) and ``grad_A = s·dUᵀ·h`` (a sum over rows, one GEMM).
  ``u`` is recomputed in backward (``n·r·H`` FLOPs) rather than saved.
- The base weight's gradient GEMM runs only when the weight requires grad (a frozen base costs
  nothing extra: the engine skips ``grad_W`` entirely).

The three-GEMM loss head (``ops/three_gemm.py``) forms the same gradients inside its own GEMMs
instead, widened by the rank (K = H + r): :class:`LoraConcat`.

Memory: ``u`` and ``dU`` (``[n, r]`` fp32 each), a ``[V, r]`` fp32 ``grad_B`` accumulator and an
``[r, H]`` fp32 ``grad_A``. Numerics: all sums accumulate in fp32 (fp64 for fp64 inputs); on the
GPU the thin GEMMs take the inputs' dtype (``u`` and ``dU`` are rounded to it once, as PEFT's
eager ``lora_B(lora_A(x)) * s`` rounds its intermediates).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._utils import check_tensor


class LoraHead(NamedTuple):
    """A validated lm_head LoRA adapter: ``lora_A [r, H]``, ``lora_B [V, r]`` (``[V_k, r]``, a shard,
    for the vocab-parallel op), ``scaling`` a finite float."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


def _check_scaling(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"lora scaling must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"lora scaling (the third entry of lora=) must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"lora scaling must be a finite number, got {value}")
    return value


def validate_lora(lora, hidden, weight, weight_name="weight") -> LoraHead | None:
    """Check ``lora=(lora_A, lora_B, scaling)`` against the head; ``None`` passes through."""
    if lora is None:
        return None
    if isinstance(lora, LoraHead):
        lora_A, lora_B, scaling = lora
    else:
        if not isinstance(lora, (tuple, list)) or len(lora) != 3:
            raise TypeError("lora must be None or a tuple (lora_A [r, H], lora_B [V, r], scaling), got "
                            f"{type(lora).__name__}{'' if not isinstance(lora, (tuple, list)) else f' of length {len(lora)}'}")  # fmt: skip
        lora_A, lora_B, scaling = lora
    check_tensor("lora_A", lora_A, floating=True)
    check_tensor("lora_B", lora_B, floating=True)
    if lora_A.dim() != 2 or lora_A.shape[0] == 0:
        raise ValueError(f"lora_A must be 2-D [r, H] with r >= 1, got shape {tuple(lora_A.shape)}")
    rank, width = lora_A.shape
    if width != weight.shape[1]:
        raise ValueError(f"lora_A must have shape [r, H] with H = {weight_name}.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(lora_A.shape)}")  # fmt: skip
    if tuple(lora_B.shape) != (weight.shape[0], rank):
        raise ValueError(f"lora_B must have shape [V, r] = ({weight.shape[0]}, {rank}) (the rows of {weight_name}, "
                         f"lora_A's rank), got {tuple(lora_B.shape)}")  # fmt: skip
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} must have the {weight_name}'s dtype {weight.dtype}, got {t.dtype} "
                            "(cast the adapter, or run under autocast through the integrations)")  # fmt: skip
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")
    return LoraHead(lora_A.contiguous(), lora_B.contiguous(), _check_scaling(scaling))


def effective_weight(weight: torch.Tensor, lora: LoraHead | None) -> torch.Tensor:
    """``W + s·B·A`` (``[V, H]``, differentiable): the eager reference's materialised adapted head."""
    if lora is None:
        return weight
    return weight + lora.scaling * (lora.lora_B @ lora.lora_A)


def lora_activation(lora: LoraHead, h: torch.Tensor, compute_dtype, operand, addmm_into,
                    chunk_rows: int) -> torch.Tensor:  # fmt: skip
    """``u = s·h·Aᵀ`` (``[n, r]``): the adapter's low-rank activation of the compact rows ``h`` (the
    GEMM operand), accumulated in ``compute_dtype`` and returned in ``h``'s dtype (rounded once).
    One ``[chunk_rows, H] x [H, r]`` GEMM per chunk of the plan (the last one shorter unless the rows
    are padded to whole chunks), so a row's ``u`` does not depend on how many rows come with it."""
    u = torch.zeros(h.shape[0], lora.lora_A.shape[0], dtype=compute_dtype, device=h.device)
    a_t = operand(lora.lora_A).t()
    for r0 in range(0, h.shape[0], chunk_rows):
        addmm_into(u[r0 : r0 + chunk_rows], h[r0 : r0 + chunk_rows], a_t)
    u.mul_(lora.scaling)
    return u if u.dtype == h.dtype else u.to(h.dtype)


def add_lora_grad_hidden(grad_h: torch.Tensor, d_u: torch.Tensor, lora: LoraHead, chunk_rows: int) -> None:
    """``grad_h += s·dU·A`` in place (``dh = dx·W + s·(dx·B)·A``), one ``[chunk_rows, r] x [r, H]``
    GEMM per chunk of the plan, like :func:`lora_activation`."""
    a = lora.lora_A.to(grad_h.dtype)
    d_u = d_u.to(grad_h.dtype)
    for r0 in range(0, grad_h.shape[0], chunk_rows):
        grad_h[r0 : r0 + chunk_rows].addmm_(d_u[r0 : r0 + chunk_rows], a, alpha=lora.scaling)


class LoraTiles:
    """The LoRA term of the lm-head engine's tiles, for one forward or backward pass over the
    compact rows ``h [n, H]`` (already the GEMM operand: compute dtype on CPU, input dtype on CUDA).

    ``operand`` widens a parameter slice like the engine does for the weight (``HeadPrecision.operand``);
    ``addmm_into(acc, a, b)`` is the engine's ``acc += a @ b`` accumulated in ``acc``'s dtype.
    ``needs = (grad_hidden, grad_A, grad_B)`` selects what :meth:`backward_tile` accumulates."""

    def __init__(self, lora: LoraHead, h: torch.Tensor, compute_dtype, operand, addmm_into, chunk_rows: int,
                 needs=(False, False, False)):  # fmt: skip
        self.lora, self.operand, self.cd, self.addmm_into = lora, operand, compute_dtype, addmm_into
        self.chunk_rows = chunk_rows
        self.need_h, self.need_A, self.need_B = needs
        n_rows, rank = h.shape[0], lora.lora_A.shape[0]
        self.u = lora_activation(lora, h, compute_dtype, operand, addmm_into, chunk_rows)
        self.h = h
        self.d_u = torch.zeros(n_rows, rank, dtype=compute_dtype, device=h.device) \
            if (self.need_h or self.need_A) else None  # fmt: skip
        self.grad_B = torch.zeros(lora.lora_B.shape, dtype=compute_dtype, device=h.device) if self.need_B else None

    def block(self, v0, v1):
        """The GEMM operand of ``lora_B[v0:v1]`` (one widening per vocab block)."""
        return self.operand(self.lora.lora_B[v0:v1])

    def add_to_tile(self, tile, rows: slice, b_blk):
        """``tile += u[rows]·B[block]ᵀ``: the LoRA logits, in the tile's (fp32) buffer."""
        self.addmm_into(tile, self.u[rows], b_blk.t())

    def backward_tile(self, dx_gemm, rows: slice, v0, v1, b_blk):
        """Accumulate this tile's share of the LoRA gradients from ``dx`` (GEMM operand dtype)."""
        if self.d_u is not None:
            # x = ... + (s·h·Aᵀ)·Bᵀ  =>  d loss / d(s·h·Aᵀ) = dx·B, summed over the vocab blocks: dU
            self.addmm_into(self.d_u[rows], dx_gemm, b_blk)
        if self.grad_B is not None:
            self.addmm_into(self.grad_B[v0:v1], dx_gemm.t(), self.u[rows])  # dB[block] += dxᵀ·u,  u = s·h·Aᵀ

    def finish(self, grad_hidden):
        """After the last tile: ``grad_h += s·dU·A`` (in place) and return ``(grad_A, grad_B)``
        in the adapter's dtypes (``None`` where not needed)."""
        s = self.lora.scaling
        grad_A = None
        if grad_hidden is not None:
            # dh = dx·W + s·(dx·B)·A: the second term summed over all vocab blocks is s·dU·A
            add_lora_grad_hidden(grad_hidden, self.d_u, self.lora, self.chunk_rows)
        if self.need_A:
            # z = ... + s·h·Aᵀ·Bᵀ  =>  dA = s·(dx·B)ᵀ·h = s·dUᵀ·h
            d_u = self.d_u if self.d_u.dtype == self.h.dtype else self.d_u.to(self.h.dtype)
            grad_A = torch.zeros(self.lora.lora_A.shape, dtype=self.cd, device=self.h.device)
            self.addmm_into(grad_A, d_u.t().to(self.h.dtype), self.h)  # d_u: fp32 (the head's GEMM 2 output)
            grad_A = grad_A.mul_(s).to(self.lora.lora_A.dtype)
        grad_B = self.grad_B.to(self.lora.lora_B.dtype) if self.grad_B is not None else None
        return grad_A, grad_B


class LoraConcat:
    """The LoRA term of the three-GEMM head (``ops/three_gemm.py``), fused into its GEMMs by widening
    the contraction by the rank: ``hu = [h, u]`` (``[n, H + r]``, ``u = s·h·Aᵀ``) and ``wb = [W, B]``
    (``[V, H + r]``). Then, with ``dz`` the logits gradient of a chunk:

    - GEMM 1 ``hu·wbᵀ = h·Wᵀ + u·Bᵀ``: the adapted logits in one product (K = H + r);
    - GEMM 2 ``dz·wb = [dz·W, dz·B]``: grad_h's base part and ``dU = dz·B`` in one product;
    - GEMM 3 ``dzᵀ·hu = [dzᵀ·h, dzᵀ·u] = [grad_W, grad_B]`` when the base weight trains, else the
      thin ``grad_B = dzᵀ·u`` alone;

    and after the last chunk :meth:`split` forms ``grad_h = dz·W + s·dU·A`` and ``grad_A = s·dUᵀ·h``
    (the same formulas as :class:`LoraTiles`). ``operand`` widens a parameter like the engine does
    for the weight; ``addmm_into(acc, a, b)`` is the engine's ``acc += a @ b`` in ``acc``'s dtype.

    Memory: ``hu`` ``[n, H + r]`` in the GEMM operand dtype and ``wb`` ``[V, H + r]`` in the weight's
    dtype -- a copy of the head weight for the duration of the call (the price of one GEMM instead of
    two per step), widened in row blocks like the weight alone (never a whole fp32 copy of a half weight)."""

    def __init__(self, lora: LoraHead, h: torch.Tensor, w: torch.Tensor, compute_dtype, operand, addmm_into,
                 chunk_rows: int):  # fmt: skip
        self.lora, self.cd, self.addmm_into, self.h = lora, compute_dtype, addmm_into, h
        self.chunk_rows = chunk_rows
        self.u = lora_activation(lora, h, compute_dtype, operand, addmm_into, chunk_rows)
        self.b = operand(lora.lora_B).to(h.dtype)  # [V, r] GEMM operand of the thin dU = dz·B
        self.hu = torch.cat([h, self.u], dim=1)
        # in the weight's own dtype: the head widens it in row blocks as it does W alone
        self.wb = torch.cat([w, lora.lora_B.to(w.dtype)], dim=1)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def split(self, grad_hu, d_u, grad_wb, grad_B, need_A):
        """``(grad_h, grad_W, grad_A, grad_B)`` from the head's accumulators: ``grad_hu`` (GEMM 2's
        ``[dz·W, dz·B]``, or None), ``d_u`` (``dz·B`` when grad_h is not needed, or None),
        ``grad_wb`` (GEMM 3's ``[grad_W, grad_B]``, or None) and ``grad_B`` (the thin GEMM 3, or None).
        ``grad_h`` and ``grad_A`` come in the compute dtype, ``grad_W``/``grad_B`` as accumulated."""
        width, s = self.h.shape[1], self.lora.scaling
        if grad_hu is not None:
            d_u = grad_hu[:, width:]
        grad_h = None
        if grad_hu is not None:
            # dh = dz·W + s·(dz·B)·A
            grad_h = grad_hu[:, :width].to(self.cd).contiguous()
            add_lora_grad_hidden(grad_h, d_u, self.lora, self.chunk_rows)
        grad_A = None
        if need_A:
            # z = ... + s·h·Aᵀ·Bᵀ  =>  dA = s·(dz·B)ᵀ·h = s·dUᵀ·h
            grad_A = torch.zeros(self.lora.lora_A.shape, dtype=self.cd, device=self.h.device)
            self.addmm_into(grad_A, d_u.t().to(self.h.dtype), self.h)  # d_u: fp32 (the head's GEMM 2 output)
            grad_A.mul_(s)
        if grad_wb is not None:
            return grad_h, grad_wb[:, :width], grad_A, grad_wb[:, width:]
        return grad_h, None, grad_A, grad_B

