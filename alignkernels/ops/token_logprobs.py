"""``token_logprobs``: per-token log-prob of the label and entropy, from logits.

Backends (all return the same numbers; tests prove it):
- ``triton``: ``alignkernels.kernels.token_logprobs`` — one read of the logits forward, one read
  plus one gradient write backward.
- ``cuda``: the hand-written kernels in ``csrc/`` (``alignkernels._C``), same contract.
- ``torch``: the same algorithm in PyTorch over chunks of rows (CPU, fp64, anywhere), so peak
  extra memory is O(chunk x V), not O(N x V).
- ``reference``: eager ``log_softmax`` + gather (``alignkernels.reference``), autograd through it.
"""
from __future__ import annotations

import torch

from .._utils import (
    as_rows,
    check_label_range,
    check_same_device,
    check_temperature,
    check_tensor,
    labels_checking_enabled,
    output_dtype,
    resolve_backend,
)

# Rows per chunk in the torch backend: ~4M elements of fp32 temporaries per chunk.
_TORCH_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Triton backend: launchers
# --------------------------------------------------------------------------------------------
def _triton_forward(logits, labels, temperature, ignore_index):
    from ..kernels.token_logprobs import pick_config, token_logprobs_fwd_kernel

    rows, n_rows, rows_per_outer, stride_outer, stride_inner = as_rows(logits)
    V = logits.shape[-1]
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp)
    if n_rows:
        block_v, num_warps = pick_config(V)
        token_logprobs_fwd_kernel[(n_rows,)](
            rows, labels, logp, lse, entropy,
            V, rows_per_outer, stride_outer, stride_inner,
            1.0 / temperature, ignore_index,
            BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    return logp, lse, entropy


def _triton_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    from ..kernels.token_logprobs import pick_config, token_logprobs_bwd_kernel

    rows, n_rows, rows_per_outer, stride_outer, stride_inner = as_rows(logits)
    V = logits.shape[-1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n_rows:
        block_v, num_warps = pick_config(V)
        token_logprobs_bwd_kernel[(n_rows,)](
            rows, labels, lse, entropy,
            grad_logp if grad_logp is not None else lse,  # placeholder pointer, never read
            grad_entropy if grad_entropy is not None else lse,
            grad_logits,
            V, rows_per_outer, stride_outer, stride_inner,
            1.0 / temperature, ignore_index,
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    return grad_logits


# --------------------------------------------------------------------------------------------
# Torch backend: the same online algorithm, vectorised over chunks of rows
# --------------------------------------------------------------------------------------------
def _row_chunks(logits, chunk_rows):
    """Yield ``(row_start, row_end, view[rows, V])`` covering the flattened rows without copying
    the (possibly strided, e.g. ``logits[:, :-1]``) input."""
    V = logits.shape[-1]
    lead = logits.reshape(-1, V) if logits.dim() <= 2 or logits.is_contiguous() else None
    if lead is not None:
        for r0 in range(0, lead.shape[0], chunk_rows):
            yield r0, min(r0 + chunk_rows, lead.shape[0]), lead[r0 : r0 + chunk_rows]
        return
    outer = logits.reshape(-1, logits.shape[-2], V) if logits.dim() > 3 else logits
    inner = outer.shape[1]
    for o in range(outer.shape[0]):
        for i0 in range(0, inner, chunk_rows):
            i1 = min(i0 + chunk_rows, inner)
            yield o * inner + i0, o * inner + i1, outer[o, i0:i1]


def _chunk_rows(V):
    return max(1, _TORCH_CHUNK_ELEMENTS // max(V, 1))


def _torch_forward(logits, labels, temperature, ignore_index):
    cd = output_dtype(logits.dtype)
    n_rows = labels.numel()
    logp = torch.zeros(n_rows, dtype=cd, device=logits.device)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp)
    valid = labels != ignore_index
    # Out-of-range labels (possible only with check_labels=False) give NaN, like the kernels.
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe_labels = torch.where(in_range, labels, 0).long()
    nan = torch.tensor(float("nan"), dtype=cd, device=logits.device)
    for r0, r1, x in _row_chunks(logits, _chunk_rows(logits.shape[-1])):
        z = x.to(cd) / temperature if temperature != 1.0 else x.to(cd)
        # Work relative to the row max (like the kernels' running max): z_m = z - m <= 0, so
        # neither Σ p·z_m nor logp loses digits when all logits sit far from 0.
        m = z.amax(dim=-1, keepdim=True)
        z_m = z - m
        log_s = torch.logsumexp(z_m, dim=-1)
        p = torch.exp(z_m - log_s[:, None])
        z_m_label = z_m.gather(1, safe_labels[r0:r1, None]).squeeze(1)
        # Σ p·(z - m), with 0·(-inf) := 0 at z = -inf. (torch.einsum("rv,rv->r") is ~1e-4 relative
        # off on CPU for long rows; vecdot is exact.)
        mean_z_m = torch.linalg.vecdot(p, z_m.masked_fill_(p == 0, 0.0))
        v = valid[r0:r1]
        logp[r0:r1] = torch.where(v, torch.where(in_range[r0:r1], z_m_label - log_s, nan), 0.0)
        lse[r0:r1] = m.squeeze(1) + log_s  # kept for every row so backward never sees exp(z - 0)
        entropy[r0:r1] = log_s - mean_z_m  # H = lse - Σ p·z = log s - Σ p·(z - m)
    return logp, lse, entropy


def _torch_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    cd = output_dtype(logits.dtype)
    valid = labels != ignore_index
    zeros = torch.zeros_like(lse)
    g_logp = torch.where(valid, grad_logp.to(cd), 0.0) if grad_logp is not None else zeros
    g_entropy = torch.where(valid, grad_entropy.to(cd), 0.0) if grad_entropy is not None else zeros
    V = logits.shape[-1]
    in_range = (labels >= 0) & (labels < V)
    safe_labels = torch.where(in_range, labels, 0).long()
    g_onehot = torch.where(in_range, g_logp, 0.0)  # an out-of-range label has no one-hot column
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad_logits.view(-1, V)
    mean_z = lse - entropy
    for r0, r1, x in _row_chunks(logits, _chunk_rows(V)):
        z = x.to(cd) / temperature if temperature != 1.0 else x.to(cd)
        p = torch.exp(z - lse[r0:r1, None])
        no_mass = (p == 0) | ~valid[r0:r1, None]  # z = -inf (p = 0) or an ignored row: exactly 0
        # dz = g_logp (onehot - p) - g_H p (z - Σp·z)  =  -p (g_logp + g_H (z - Σp·z)) + g_logp onehot
        coef = (z - mean_z[r0:r1, None]).mul_(g_entropy[r0:r1, None]).add_(g_logp[r0:r1, None])
        dz = p.mul_(coef).neg_().masked_fill_(no_mass, 0.0)
        dz.scatter_add_(1, safe_labels[r0:r1, None], g_onehot[r0:r1, None])
        if temperature != 1.0:
            dz.div_(temperature)
        grad_rows[r0:r1] = dz
    return grad_logits


def _cuda_forward(logits, labels, temperature, ignore_index):
    from .. import _cuda_backend

    # Contract 3: (logp, row_max, log_sum, entropy). Until this module saves the centred pair
    # itself, the pair travels as one [2, N] "lse" state into _cuda_backward.
    logp, row_max, log_sum, entropy = _cuda_backend.token_logprobs_forward(logits, labels, temperature, ignore_index)
    return logp, torch.stack((row_max, log_sum)), entropy


def _cuda_backward(logits, labels, state, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    from .. import _cuda_backend

    return _cuda_backend.token_logprobs_backward(
        logits, labels, state[0], state[1], entropy, grad_logp, grad_entropy, temperature, ignore_index
    )


_IMPLS = {
    "triton": (_triton_forward, _triton_backward),
    "torch": (_torch_forward, _torch_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper shared by the triton, cuda and torch backends.

    Saves the logits (already alive for the caller), the labels and two fp32 numbers per row
    (lse, entropy); backward recomputes p from them in one pass.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, backend):
        fwd, _ = _IMPLS[backend]
        logp, lse, entropy = fwd(logits, labels, temperature, ignore_index)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
        ctx.set_materialize_grads(False)
        valid = labels != ignore_index
        return logp, torch.where(valid, entropy, 0.0)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, labels, lse, entropy = ctx.saved_tensors
        _, bwd = _IMPLS[ctx.backend]
        if grad_logp is not None:
            grad_logp = grad_logp.contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.contiguous()
        grad_logits = bwd(
            logits, labels, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.ignore_index
        )
        return grad_logits, None, None, None, None


def _validate(logits, labels, temperature, check_labels, ignore_index):
    check_tensor("logits", logits, floating=True, ndim_min=1)
    check_tensor("labels", labels, integer=True)
    check_same_device(logits=logits, labels=labels)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    temperature = check_temperature(temperature)
    if labels_checking_enabled(check_labels):
        check_label_range(labels, logits.shape[-1], ignore_index)
    return temperature


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    check_labels: bool | None = None,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
):
    """Log-probability of each label under ``softmax(logits / temperature)``, and optionally the
    entropy of that distribution, without materialising the softmax.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 (float64 on the torch and reference
            backends). The last dimension must be contiguous; leading dimensions may be strided
            (``logits[:, :-1]`` is read in place by the kernels).
        labels: ``[...]`` = ``logits.shape[:-1]``, int32 or int64, each in ``[0, V)`` or equal to
            ``ignore_index``.
        temperature: divides the logits before the softmax (fused; > 0).
        ignore_index: label value marking positions to skip: their outputs are 0 and they receive
            zero gradient (the Triton kernel does not even read their logits in the forward).
        return_entropy: also return the entropy ``-Σ p log p`` per position.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere; overridden by the
            ``ALIGNKERNELS_BACKEND`` environment variable), ``"triton"``, ``"cuda"``, ``"torch"``
            or ``"reference"``.
        check_labels: verify every label is in range. Costs one fused comparison over ``labels``
            and one host-device sync per call. ``None`` (default) follows the environment variable
            ``ALIGNKERNELS_CHECK_LABELS`` (on unless set to ``0``). With the check off, an
            out-of-range label gives ``NaN`` for that position, never an out-of-bounds read.
        process_group, vocab_start, vocab_size: vocab-parallel logits (tensor parallel): this
            rank holds ``logits[..., vocab_start:vocab_start + logits.shape[-1]]`` of a global
            vocabulary of ``vocab_size``; labels are global ids. Two O(N) all-reduces give every
            rank the full log-prob and entropy; backward is local. See
            ``alignkernels.ops.vocab_parallel`` and ``docs/DISTRIBUTED.md``.

    Returns:
        ``logp`` (fp32, fp64 for fp64 logits; shape of ``labels``), or ``(logp, entropy)``.
        Differentiable w.r.t. ``logits`` through both outputs.
    """
    if process_group is not None:
        from .vocab_parallel import vocab_parallel_token_logprobs

        if vocab_start is None or vocab_size is None:
            raise ValueError("process_group= (vocab-parallel logits) needs vocab_start= and vocab_size= (global V)")
        return vocab_parallel_token_logprobs(
            logits, labels, vocab_start=vocab_start, vocab_size=vocab_size, process_group=process_group,
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy, backend=backend,
            check_labels=check_labels,
        )  # fmt: skip
    temperature = _validate(logits, labels, temperature, check_labels, ignore_index)
    backend = resolve_backend(backend, logits.device, logits.dtype)
    if backend == "reference":
        from ..reference import token_logprobs_reference

        return token_logprobs_reference(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    if backend == "triton" and logits.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16/bfloat16/float32 logits, got torch.float64")
    flat_labels = labels.reshape(-1)
    if not flat_labels.is_contiguous():
        flat_labels = flat_labels.contiguous()
    logp, entropy = TokenLogprobsFunction.apply(logits, flat_labels, temperature, int(ignore_index), backend)
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
