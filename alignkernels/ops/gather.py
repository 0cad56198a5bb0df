"""Sequence pooling: the last real token of each row (reward models read the EOS position there)
and masked per-sequence sums of token log-probs.

Position rule (the one ``transformers``' ``GenericForSequenceClassification`` uses, so our pooled
rewards equal ``LlamaForSequenceClassification(...).logits`` row for row): the **rightmost**
position whose mask is non-zero,

    index[b] = max_t ( t * valid[b, t] )

which is ``lengths - 1`` for right padding, ``T - 1`` for left padding, and ``0`` for a row with no
valid token (``argmax`` of an all-zero row is 0 in transformers; ``max`` gives the same number).
For packed rows (``cu_seqlens = [0, n_0, n_0 + n_1, ...]``) the last token of sequence ``s`` is
``cu_seqlens[s + 1] - 1``; an empty sequence gets its start ``cu_seqlens[s]`` (clamped into range).

Everything is vectorised (no Python loop over rows). On CUDA, ``gather_last`` with a padding mask
runs one Triton kernel (``alignkernels.kernels.gather``) that finds the index and copies the row
in the same program; its backward scatters the incoming gradient into a zero tensor.
"""
from __future__ import annotations

import torch

from .. import _cuda_backend
from .._utils import OpBackends, check_same_device, check_tensor, output_dtype
from ..kernels.gather import gather_last_fwd_kernel, pick_config


# --------------------------------------------------------------------------------------------
# Index computation (the one definition every backend and the reference follow)
# --------------------------------------------------------------------------------------------
def _rightmost_valid(valid: torch.Tensor) -> torch.Tensor:
    """``max_t t * valid[..., t]`` as int64: rightmost valid position, 0 for an all-invalid row."""
    T = valid.shape[-1]
    positions = torch.arange(T, device=valid.device, dtype=torch.int64)
    if T == 0:
        return torch.zeros(valid.shape[:-1], dtype=torch.int64, device=valid.device)
    return torch.where(valid, positions, 0).amax(dim=-1)


def _packed_last(cu_seqlens: torch.Tensor) -> torch.Tensor:
    cu = cu_seqlens.to(torch.int64)
    starts, ends = cu[:-1], cu[1:]
    # empty sequence (end == start) -> its start; never below 0 or past the last token
    last = torch.maximum(ends - 1, starts)
    return torch.minimum(last, (cu[-1] - 1).clamp(min=0)).clamp(min=0)


def _check_cu_seqlens(cu_seqlens):
    check_tensor("cu_seqlens", cu_seqlens, integer=True)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D [num_sequences + 1] (starting with 0), got shape {tuple(cu_seqlens.shape)}"
        )


def _check_mask(name, mask, leading_shape=None):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension [..., T], got a scalar")
    if leading_shape is not None and tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(
            f"{name} must have shape {tuple(leading_shape)} (x.shape[:{len(leading_shape)}]), got {tuple(mask.shape)}"
        )


def last_token_index(
    attention_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Index of the last real token of each row (int64), for right padding, left padding and
    packed sequences.

    Give exactly one of:
        attention_mask: ``[B, T]`` (bool / int / float; non-zero = real token). Returns ``[B]``:
            the rightmost non-zero position (``lengths - 1`` for right padding, ``T - 1`` for left
            padding, ``0`` for a row with no real token).
        input_ids + pad_token_id: ``[B, T]`` ids; real = ``input_ids != pad_token_id``. This is
            exactly the position ``transformers``' ``GenericForSequenceClassification`` pools
            (note: with ``pad_token_id == eos_token_id`` the EOS itself counts as padding there too).
        cu_seqlens: ``[S + 1]`` cumulative lengths of packed sequences (``[0, n_0, n_0+n_1, ...]``).
            Returns ``[S]`` = ``cu_seqlens[1:] - 1`` (an empty sequence gets ``cu_seqlens[s]``,
            clamped to ``[0, total - 1]``).
    """
    candidates = (("attention_mask", attention_mask), ("cu_seqlens", cu_seqlens), ("input_ids", input_ids))
    given = [name for name, value in candidates if value is not None]
    if len(given) != 1:
        raise ValueError(
            "last_token_index needs exactly one of attention_mask, cu_seqlens or input_ids (+ pad_token_id); "
            f"got {given or 'none'}"
        )
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens)
        return _packed_last(cu_seqlens)
    if input_ids is not None:
        check_tensor("input_ids", input_ids, integer=True, ndim_min=1)
        if pad_token_id is None:
            raise ValueError("last_token_index(input_ids=...) needs pad_token_id (the id that marks padding)")
        return _rightmost_valid(input_ids != pad_token_id)
    _check_mask("attention_mask", attention_mask)
    return _rightmost_valid(attention_mask != 0)


# --------------------------------------------------------------------------------------------
# Gather
# --------------------------------------------------------------------------------------------
def _triton_gather_last_padded(x3: torch.Tensor, valid: torch.Tensor):
    """x3: [B, T, D] (any strides, last dim contiguous); valid: [B, T] bool. -> ([B, D], index [B])."""
    B, T, D = x3.shape
    out = torch.empty((B, D), dtype=x3.dtype, device=x3.device)
    index = torch.empty(B, dtype=torch.int64, device=x3.device)
    if B == 0:
        return out, index
    mask_u8 = valid.to(torch.uint8)
    if mask_u8.stride(-1) != 1:
        mask_u8 = mask_u8.contiguous()
    block_t, block_d, num_warps = pick_config(T, D)
    gather_last_fwd_kernel[(B,)](
        x3, mask_u8, out, index,
        T, D, x3.stride(0), x3.stride(1), mask_u8.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out, index


def _cuda_gather_last_padded(x3: torch.Tensor, valid: torch.Tensor):
    """CUDA C++ extension (``csrc/gather_last.cu``): index in torch, copy in the extension."""
    index = _rightmost_valid(valid)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    return _cuda_backend.gather_last_cuda(x3, index), index


_PADDED_IMPLS = {"triton": _triton_gather_last_padded, "cuda": _cuda_gather_last_padded}
# Indexing op: "torch" is the eager path (no separate "reference" backend; the loop reference is
# alignkernels.reference.gather_last_reference). Integer x is always gathered by indexing.
GATHER_LAST = OpBackends("gather_last", ("triton", "cuda", "torch"))


class _GatherLastFunction(torch.autograd.Function):
    """Kernel forward (Triton: index + copy in one program per row; CUDA extension: copy);
    backward scatters the incoming gradient into zeros (d x[b, index[b]] = d out[b])."""

    @staticmethod
    def forward(ctx, x3, valid, backend):
        out, index = _PADDED_IMPLS[backend](x3, valid)
        ctx.save_for_backward(index)
        ctx.x_shape, ctx.x_dtype = x3.shape, x3.dtype
        ctx.mark_non_differentiable(index)
        return out, index

    @staticmethod
    def backward(ctx, grad_out, _grad_index):
        (index,) = ctx.saved_tensors
        B, T, D = ctx.x_shape
        grad_x = torch.zeros((B, T, D), dtype=ctx.x_dtype, device=grad_out.device)
        if B:
            grad_x[torch.arange(B, device=grad_out.device), index] = grad_out.to(ctx.x_dtype)
        return grad_x, None, None


def gather_last(
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    zero_empty: bool = False,
    return_index: bool = False,
    backend: str = "auto",
):
    """Pick the last real token of every row of ``x`` (hidden states, per-token values, ...).

    Args:
        x: padded ``[B, T, *rest]`` (with ``attention_mask`` / ``input_ids``, or neither = no padding,
            last position), or packed ``[N, *rest]`` / ``[1, N, *rest]`` (with ``cu_seqlens``; a
            leading size-1 batch dim is dropped when ``x`` has 3 or more dims).
        attention_mask: ``[B, T]``, non-zero = real token; left or right padding (or holes).
        cu_seqlens: ``[S + 1]`` int cumulative lengths of the packed sequences.
        input_ids, pad_token_id: ``[B, T]`` ids; real = ``input_ids != pad_token_id`` (transformers'
            sequence-classification rule).
        zero_empty: rows with no real token (and empty packed sequences) return zeros and pass no
            gradient. Default ``False`` keeps transformers' behaviour (they read position 0 / the
            sequence start).
        return_index: also return the int64 index used (see :func:`last_token_index`).
        backend: ``"auto"`` (Triton on CUDA for the padded form, PyTorch indexing elsewhere),
            ``"triton"``, ``"cuda"`` (the C++ extension's copy kernel) or ``"torch"``. Packed inputs
            and integer ``x`` always use PyTorch indexing.

    Returns:
        ``[B, *rest]`` (``[S, *rest]`` packed), dtype of ``x``; differentiable w.r.t. ``x``
        (the gradient lands on the gathered positions only). With ``return_index``:
        ``(gathered, index)``.
    """
    check_tensor("x", x, ndim_min=1)
    if attention_mask is not None and (cu_seqlens is not None or input_ids is not None) or (
        cu_seqlens is not None and input_ids is not None
    ):
        raise ValueError("gather_last takes at most one of attention_mask, cu_seqlens, input_ids")
    check_same_device(x=x, attention_mask=attention_mask, cu_seqlens=cu_seqlens, input_ids=input_ids)

    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens)
        xp = x[0] if (x.dim() >= 3 and x.shape[0] == 1) else x
        index = _packed_last(cu_seqlens)
        if xp.shape[0] == 0:
            if index.numel():
                raise ValueError("gather_last: x has no tokens but cu_seqlens describes sequences")
            return (xp[:0], index) if return_index else xp[:0]
        out = xp[index]
        if zero_empty:
            nonempty = (cu_seqlens[1:] > cu_seqlens[:-1]).view(-1, *([1] * (out.dim() - 1)))
            out = torch.where(nonempty, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return (out, index) if return_index else out

    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...] for the padded form, got shape {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[1]
    mask_like = attention_mask if attention_mask is not None else input_ids
    if isinstance(mask_like, torch.Tensor) and mask_like.dim() == 2 and x.dim() == 2 and mask_like.shape[0] == B \
            and mask_like.shape[1] != T:  # fmt: skip
        raise ValueError(
            f"x must be [B, T, ...] with T = the mask's {mask_like.shape[1]} positions; got x of shape "
            f"{tuple(x.shape)} -- hidden states [B, H] without the sequence dimension?"
        )
    if input_ids is not None:
        check_tensor("input_ids", input_ids, integer=True)
        _check_mask("input_ids", input_ids, (B, T))
        if pad_token_id is None:
            raise ValueError("gather_last(input_ids=...) needs pad_token_id")
        valid = input_ids != pad_token_id
    elif attention_mask is not None:
        _check_mask("attention_mask", attention_mask, (B, T))
        valid = attention_mask != 0
    else:
        valid = None
    if T == 0:
        raise ValueError("gather_last: x has an empty sequence dimension (T = 0)")
    if B == 0:
        empty = x[:, 0]
        index = torch.zeros(0, dtype=torch.int64, device=x.device)
        return (empty, index) if return_index else empty

    if valid is None:  # no padding: the last position of every row
        out = x[:, -1]
        index = torch.full((B,), T - 1, dtype=torch.int64, device=x.device)
        return (out, index) if return_index else out

    backend = GATHER_LAST.resolve(backend, x.device, x.dtype if x.dtype.is_floating_point else None)
    use_kernel = backend in _PADDED_IMPLS and x.dtype.is_floating_point and x.dtype != torch.float64
    if use_kernel and x[0, 0].numel() > 0:  # B >= 1 here; a kernel needs a non-empty row to copy
        x3 = x.reshape(B, T, -1) if x.dim() != 3 else x
        if x3.stride(-1) != 1:
            x3 = x3.contiguous()
        out, index = _GatherLastFunction.apply(x3, valid, backend)
        out = out.view((B,) + tuple(x.shape[2:]))
    else:
        index = _rightmost_valid(valid)
        out = x[torch.arange(B, device=x.device), index]
    if zero_empty:
        nonempty = valid.any(dim=-1).view(-1, *([1] * (out.dim() - 1)))
        out = torch.where(nonempty, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return (out, index) if return_index else out


# --------------------------------------------------------------------------------------------
# Masked per-sequence log-probs
# --------------------------------------------------------------------------------------------
def sequence_logprobs(logp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence sum (or mean) of token log-probs over the positions where ``mask`` is non-zero.

    Args:
        logp: ``[..., T]`` per-token log-probs (any float dtype).
        mask: ``[..., T]`` (bool / int / float; non-zero = counted). Masked positions contribute
            nothing and receive zero gradient, even if ``logp`` holds inf/NaN there.
        average: divide by the number of counted tokens (``clamp(min=1)``), i.e. the masked mean.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 input). A fully masked row gives 0, never NaN.
    """
    check_tensor("logp", logp, floating=True, ndim_min=1)
    _check_mask("mask", mask, tuple(logp.shape))
    check_same_device(logp=logp, mask=mask)
    valid = mask != 0
    cd = output_dtype(logp.dtype)
    total = torch.where(valid, logp.to(cd), torch.zeros((), dtype=cd, device=logp.device)).sum(dim=-1)
    if not average:
        return total
    return total / valid.sum(dim=-1).clamp(min=1).to(cd)
