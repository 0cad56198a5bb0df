"""Step positions and ``gather_steps``: the tokens where a process reward model is read.

A process reward model (PRM) scores every reasoning step, not just the last token. TRL's PRM
trainer (``PRMTrainer.tokenize_row``, ``trl/trainer/prm_trainer.py`` in TRL 0.x, later
``trl/experimental/prm/prm_trainer.py``) appends the step separator's tokens to every step and
puts the step's label on the **last token of that step + separator**; every other token (prompt,
step body, padding from ``DataCollatorForTokenClassification``) gets ``-100``. So the step
positions of a TRL-format batch are exactly ``labels != -100``, and a step-separator mask
(``input_ids == separator_id``) marks the same tokens for a one-token separator.

Order (every backend and :func:`alignkernels.reference.step_positions_reference`): row-major --
sequence by sequence, positions ascending -- the order of ``torch.nonzero(step_mask)`` and of
``labels[labels != -100]``. So step labels taken from a TRL batch line up with gathered rows.

Layouts:
- padded ``x[B, T, ...]`` with ``step_mask[B, T]`` (left or right padding: padding is simply not
  a step; pass ``attention_mask`` too if padding tokens could look like separators);
- packed ``x[N, ...]`` / ``x[1, N, ...]`` with ``step_mask[N]`` / ``[1, N]`` and
  ``cu_seqlens[S + 1]`` (tokens outside ``[cu_seqlens[0], cu_seqlens[-1])`` are never steps).

On CUDA, ``gather_steps`` runs one Triton kernel (``alignkernels.kernels.steps``) that ranks the
steps of each sequence and copies their rows; on CPU it is vectorised PyTorch indexing. The
number of steps ``P`` fixes the output size, so both paths synchronise with the host once.
The backward scatters the incoming ``[P, ...]`` gradient into zeros (positions are unique, so no
atomics): ``d x[b, t] = d out[j]`` for the step ``j`` read at ``(b, t)``, 0 elsewhere.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._utils import KERNEL_DTYPES, OpBackends, check_same_device, check_tensor, widen_labels
from ..kernels.steps import gather_steps_fwd_kernel, pick_config

# No CUDA C++ kernel for this op; "torch" is eager indexing (the loop reference is
# alignkernels.reference.step_positions_reference).
GATHER_STEPS = OpBackends("gather_steps", ("triton", "torch"))


class StepPositions(NamedTuple):
    """Where the steps are, in row-major order (``P`` steps over ``S`` sequences).

    index: ``[P]`` int64 flat token index (``b·T + t`` padded, packed position ``n`` packed).
    seq_index: ``[P]`` int64 sequence of each step (row ``b`` padded, ``s`` packed).
    token_index: ``[P]`` int64 column ``t`` in its row (padded) / offset from the sequence start
        (packed).
    counts: ``[S]`` int64 steps per sequence (0 for a sequence without steps).
    offsets: ``[S + 1]`` int64 exclusive prefix sum of ``counts``: the steps of sequence ``s``
        are rows ``offsets[s]:offsets[s + 1]`` of the gathered tensor.
    """

    index: torch.Tensor
    seq_index: torch.Tensor
    token_index: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.index.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.counts.numel())


# --------------------------------------------------------------------------------------------
# Step flags: the one definition of "which tokens are steps"
# --------------------------------------------------------------------------------------------
def _check_token_tensor(name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def step_flags(
    step_mask=None,
    *,
    labels=None,
    input_ids=None,
    separator_id=None,
    attention_mask=None,
    ignore_index: int = -100,
    shape=None,
) -> torch.Tensor:
    """Bool ``[..., T]`` step flags from exactly one of ``step_mask`` (non-zero = step),
    ``labels`` (TRL token-classification format: ``labels != ignore_index``) or
    ``input_ids == separator_id``; AND-ed with ``attention_mask != 0`` when given."""
    given = [n for n, v in (("step_mask", step_mask), ("labels", labels), ("input_ids", input_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            "step positions need exactly one of step_mask, labels (TRL format, -100 = not a step) or "
            f"input_ids + separator_id; got {given or 'none'}"
        )
    if step_mask is not None:
        _check_token_tensor("step_mask", step_mask, shape)
        flags = step_mask != 0
    elif labels is not None:
        _check_token_tensor("labels", labels, shape)
        flags = widen_labels("labels", labels) != ignore_index  # never compared in a narrow dtype
    else:
        _check_token_tensor("input_ids", input_ids, shape)
        check_tensor("input_ids", input_ids, integer=True)
        if separator_id is None or isinstance(separator_id, bool) or not isinstance(separator_id, int):
            raise ValueError(
                "input_ids needs separator_id: the int id of the step separator token (for a multi-token "
                "separator, the id of its last token, where TRL puts the step label)"
            )
        flags = input_ids == separator_id
    if attention_mask is not None:
        _check_token_tensor("attention_mask", attention_mask, tuple(flags.shape))
        flags = flags & (attention_mask != 0)
    return flags


def _check_cu_seqlens(cu_seqlens, num_tokens):
    check_tensor("cu_seqlens", cu_seqlens, integer=True)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D [num_sequences + 1] (starting with 0), got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(torch.int64)
    if cu.numel() > 1:
        bad = bool(((cu[1:] < cu[:-1]).any() | (cu[0] < 0) | (cu[-1] > num_tokens)).item())
    else:
        bad = bool(((cu[0] < 0) | (cu[0] > num_tokens)).item())
    if bad:
        raise ValueError(
            f"cu_seqlens must be non-decreasing within [0, {num_tokens}] (the number of packed tokens), "
            f"got {cu_seqlens.tolist() if cu.numel() <= 16 else 'out-of-range values'}"
        )
    return cu


def _packed_flags(flags: torch.Tensor, name: str) -> torch.Tensor:
    if flags.dim() == 2 and flags.shape[0] == 1:
        flags = flags[0]
    if flags.dim() != 1:
        raise ValueError(f"{name} must be [N] or [1, N] for packed sequences (cu_seqlens), got {tuple(flags.shape)}")
    return flags


def _flag_name(step_mask, labels):
    return "step_mask" if step_mask is not None else ("labels" if labels is not None else "input_ids")


# --------------------------------------------------------------------------------------------
# Positions (PyTorch, vectorised)
# --------------------------------------------------------------------------------------------
def _positions_from_flags(flags: torch.Tensor, cu: torch.Tensor | None) -> StepPositions:
    """flags: [B, T] (padded) or [N] (packed, with cu [S + 1])."""
    device = flags.device
    if cu is None:
        B, T = flags.shape
        index = flags.reshape(-1).nonzero().squeeze(1)
        seq_index = torch.div(index, max(T, 1), rounding_mode="floor")
        token_index = index - seq_index * T
        counts = flags.sum(dim=1, dtype=torch.int64)
    else:
        N = flags.shape[0]
        positions = torch.arange(N, device=device)
        inside = (positions >= cu[0]) & (positions < cu[-1])
        index = (flags & inside).nonzero().squeeze(1)
        # sequence s holds tokens [cu[s], cu[s+1]); right=True skips empty sequences sharing a start
        seq_index = torch.searchsorted(cu, index, right=True) - 1
        token_index = index - cu[seq_index]
        S = cu.numel() - 1
        counts = torch.bincount(seq_index, minlength=S)[:S] if S > 0 else cu.new_zeros(0)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return StepPositions(index, seq_index, token_index, counts, offsets)


def step_positions(
    step_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    separator_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> StepPositions:
    """Positions of the PRM steps of a batch, in row-major order (see :class:`StepPositions`).

    Give exactly one of:
        step_mask: ``[B, T]`` (padded, any padding side) or ``[N]`` / ``[1, N]`` (packed);
            non-zero = step token.
        labels: the same shapes, TRL PRM format: the step label at each step token, ``ignore_index``
            (-100) everywhere else; steps = ``labels != ignore_index``.
        input_ids + separator_id: steps = ``input_ids == separator_id``.
    attention_mask: optional, same shape; padding (``0``) is never a step.
    cu_seqlens: ``[S + 1]`` cumulative lengths of packed sequences (then the mask is ``[N]``).
    """
    flags = step_flags(
        step_mask, labels=labels, input_ids=input_ids, separator_id=separator_id,
        attention_mask=attention_mask, ignore_index=ignore_index,
    )  # fmt: skip
    check_same_device(step_flags=flags, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        flags = _packed_flags(flags, _flag_name(step_mask, labels))
        return _positions_from_flags(flags, _check_cu_seqlens(cu_seqlens, flags.shape[0]))
    if flags.dim() != 2:
        raise ValueError(
            f"{_flag_name(step_mask, labels)} must be [B, T] (or [N] with cu_seqlens), got shape {tuple(flags.shape)}"
        )
    return _positions_from_flags(flags, None)


# --------------------------------------------------------------------------------------------
# Triton backend
# --------------------------------------------------------------------------------------------
def _triton_gather_steps(x3: torch.Tensor, flags_flat: torch.Tensor, seg_start: torch.Tensor, counts: torch.Tensor):
    """x3 [B, T, D] (D contiguous); flags_flat [B*T] bool; seg_start [S + 1] int64 token ranges;
    counts [S] int64 steps per segment. -> (out [P, D], flat index [P], offsets [S + 1])."""
    B, T, D = x3.shape
    S = counts.numel()
    offsets = torch.zeros(S + 1, dtype=torch.int64, device=x3.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    P = int(offsets[-1].item())  # the one host sync: the output size
    out = torch.empty((P, D), dtype=x3.dtype, device=x3.device)
    index = torch.empty(P, dtype=torch.int64, device=x3.device)
    if P == 0 or D == 0:
        return out, index, offsets
    block_t, sub_t, block_d, num_warps = pick_config(D)
    grid = (S, _cdiv(D, block_d))
    gather_steps_fwd_kernel[grid](
        x3, flags_flat.to(torch.uint8), seg_start, offsets, out, index,
        T, D, x3.stride(0), x3.stride(1),
        BLOCK_T=block_t, SUB_T=sub_t, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out, index, offsets


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _GatherStepsFunction(torch.autograd.Function):
    """Triton forward (rank + copy in one program per sequence and feature tile); backward
    scatters the gradient rows back to their tokens: ``d x[r] = d out[j]`` where ``index[j] = r``
    (each token is gathered at most once, so a plain indexed store suffices), zeros elsewhere."""

    @staticmethod
    def forward(ctx, x3, flags_flat, seg_start, counts):
        out, index, offsets = _triton_gather_steps(x3, flags_flat, seg_start, counts)
        ctx.save_for_backward(index)
        ctx.x_shape, ctx.x_dtype = x3.shape, x3.dtype
        ctx.mark_non_differentiable(index, offsets)
        return out, index, offsets

    @staticmethod
    def backward(ctx, grad_out, _grad_index, _grad_offsets):
        (index,) = ctx.saved_tensors
        B, T, D = ctx.x_shape
        grad_x = torch.zeros((B * T, D), dtype=ctx.x_dtype, device=grad_out.device)
        if index.numel():
            grad_x[index] = grad_out.to(ctx.x_dtype)
        return grad_x.view(B, T, D), None, None, None


# --------------------------------------------------------------------------------------------
# Public gather
# --------------------------------------------------------------------------------------------
def gather_steps(
    x: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    separator_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_positions: bool = False,
    backend: str = "auto",
):
    """Rows of ``x`` (hidden states, per-token head outputs, ...) at the PRM step tokens.

    Args:
        x: padded ``[B, T, *rest]`` or packed ``[N, *rest]`` / ``[1, N, *rest]`` (with
            ``cu_seqlens``; a leading size-1 batch dim is dropped when ``x`` has 3+ dims).
        step_mask / labels / input_ids + separator_id: exactly one, shaped like ``x``'s token dims
            (``[B, T]``, or ``[N]`` / ``[1, N]`` packed); see :func:`step_positions`.
        attention_mask: optional, same shape; padding is never a step.
        cu_seqlens: ``[S + 1]`` int cumulative lengths of packed sequences.
        ignore_index: the "no label" value when positions come from ``labels`` (TRL: -100).
        return_positions: also return the :class:`StepPositions` used.
        backend: ``"auto"`` (Triton kernel for CUDA float tensors, PyTorch indexing otherwise),
            ``"triton"`` or ``"torch"`` (``"cuda"``/``"reference"``: a ``ValueError``, there is no
            C++ kernel nor a separate eager path for this indexing op).

    Returns:
        ``[P, *rest]`` in row-major step order (dtype of ``x``, differentiable w.r.t. ``x``: the
        gradient lands on the step tokens only, zeros elsewhere). With ``return_positions``:
        ``(gathered, positions)``.
    """
    check_tensor("x", x, ndim_min=1)
    check_same_device(
        x=x, step_mask=step_mask, labels=labels, input_ids=input_ids, attention_mask=attention_mask,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    if cu_seqlens is not None:
        xp = x[0] if (x.dim() >= 3 and x.shape[0] == 1) else x
        token_shape = (1, xp.shape[0]) if _token_mask_has_batch(step_mask, labels, input_ids) else (xp.shape[0],)
        flags = step_flags(
            step_mask, labels=labels, input_ids=input_ids, separator_id=separator_id,
            attention_mask=attention_mask, ignore_index=ignore_index, shape=token_shape,
        )  # fmt: skip
        flags = _packed_flags(flags, _flag_name(step_mask, labels))
        cu = _check_cu_seqlens(cu_seqlens, xp.shape[0])
        x3 = xp.unsqueeze(0)  # [1, N, *rest]
        B, T = 1, xp.shape[0]
        seg_start = cu
        flags_bt = flags.unsqueeze(0)
    else:
        if x.dim() < 2:
            raise ValueError(f"x must be [B, T, ...] (or [N, ...] with cu_seqlens), got shape {tuple(x.shape)}")
        B, T = x.shape[0], x.shape[1]
        flags_bt = step_flags(
            step_mask, labels=labels, input_ids=input_ids, separator_id=separator_id,
            attention_mask=attention_mask, ignore_index=ignore_index, shape=(B, T),
        )  # fmt: skip
        cu = None
        x3 = x
        seg_start = None

    backend = GATHER_STEPS.resolve(backend, x.device, x.dtype if x.dtype.is_floating_point else None)
    use_kernel = backend == "triton" and x.dtype in KERNEL_DTYPES and B * T > 0
    rest = tuple(x3.shape[2:])
    if use_kernel:
        xk = x3.reshape(B, T, -1)
        if xk.stride(-1) != 1:
            xk = xk.contiguous()
        if cu is None:
            counts = flags_bt.sum(dim=1, dtype=torch.int64)
            seg_start = torch.arange(B + 1, device=x.device, dtype=torch.int64) * T
        else:
            csum = torch.zeros(T + 1, dtype=torch.int64, device=x.device)
            torch.cumsum(flags.to(torch.int64), dim=0, out=csum[1:])
            counts = csum[cu[1:]] - csum[cu[:-1]]
        out, index, offsets = _GatherStepsFunction.apply(xk, flags_bt.reshape(-1), seg_start.contiguous(), counts)
        out = out.view((out.shape[0],) + rest)
        if not return_positions:
            return out
        P = index.numel()
        seq_index = torch.repeat_interleave(
            torch.arange(counts.numel(), device=x.device), counts, output_size=P
        )  # fmt: skip
        token_index = index - (seq_index * T if cu is None else cu[seq_index])
        return out, StepPositions(index, seq_index, token_index, counts, offsets)

    positions = _positions_from_flags(flags_bt if cu is None else flags, cu)
    if cu is None:
        out = x[positions.seq_index, positions.token_index]
    else:
        out = x3[0][positions.index]
    return (out, positions) if return_positions else out


def _token_mask_has_batch(*masks) -> bool:
    for m in masks:
        if m is not None:
            return isinstance(m, torch.Tensor) and m.dim() == 2
    return False
