"""The loss head in three GEMMs: a token-separable loss and its gradient, formed in the forward pass.

For a loss ``L = Σ_t f_t(logp_t, H_t)`` whose per-token gradient ``(∂L/∂logp_t, ∂L/∂H_t)`` depends
only on that token's own log-prob and entropy (and on normalisers fixed by the mask), the gradient
w.r.t. the logits of a token chunk can be formed while those logits are still at hand. Per chunk of
(valid) token rows ``r0:r1``:

1. **GEMM 1** ``buf = h[r0:r1] @ Wᵀ (+ b)``: the chunk's logits over the whole vocabulary, written
   into one reusable fp32 buffer ``[chunk, V]`` (``torch.mm``/``addmm(out=...)``: cuBLAS on the GPU).
2. **Stats** (``chunk_softmax_stats_``): ``z = transform(buf)``, the centred softmax state per row
   (contract 2): ``row_max m``, ``log_sum = log Σ e^(z−m)``, ``H = log_sum − Σp·(z−m)``, and
   ``logp = (z_label − m) − log_sum``, ``is_top1``.
3. **Token gradient** ``(g_logp, g_H) = token_grad(rows, stats)``: the loss's callback; it sees
   only this chunk's tokens (and whatever per-token constants it closed over).
4. **dz in place** (``form_dz_``): ``dz = [g_logp·(onehot − p) − g_H·p·(z − Σp·z)]·k`` with
   ``p = e^((z−m) − log_sum)``, ``z − Σp·z = (z−m) − (log_sum − H)`` and ``k = dz/dx`` of the
   transform (``logit_scale/T``, times ``1 − tanh²`` with softcap), overwriting the buffer.
5. **GEMM 2** ``grad_h[r0:r1] = dz @ W`` (each row complete in one GEMM: no accumulator) and
   **GEMM 3** ``grad_W += dzᵀ @ h[r0:r1]``, ``grad_b += Σ_rows dz``.

That is 6·n·H·V matmul FLOPs for ``n`` valid rows, against 8·n·H·V for a differentiable
log-prob head followed by autograd (forward, recompute, two gradient GEMMs). The forward returns
the per-token statistics and the finished gradients; :class:`HeadGradientFunction` hands them to
autograd, scaled by the upstream gradient of the loss.

Backends: ``torch`` (the steps above with fused ATen ops; CPU, fp64, anywhere) and ``triton``
(steps 2 and 4 in ``alignkernels.kernels.fused_head``: one program per row for the stats, a
``[rows, V/BLOCK]`` grid for dz; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
GEMMs run in the input dtype on CUDA (fp32 out via ``out_dtype``) and in fp32 (fp64) on the CPU.

Memory (besides inputs): the fp32 logits buffer ``chunk x V`` plus, on the torch path, one fp32
work buffer of the same shape (``e^(z−m)``) and a third with softcap (``1 − tanh²``); on the triton
path a ``chunk x V`` dz buffer in the weight's dtype for half weights. The gradients exist from the
forward on: ``grad_hidden`` ``[n, H]`` (input dtype), ``grad_weight`` ``[V, H]`` (fp32 accumulator
for half weights, cast once at the end), ``grad_bias`` ``[V]``. O(n) statistics. Nothing
scales with ``n x V``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .._utils import check_same_device, check_temperature, check_tensor, output_dtype

# Default fp32 elements in the logits buffer (chunk rows = budget // V, clamped).
GPU_BUFFER_ELEMENTS = 1 << 27  # 512 MB fp32
CPU_BUFFER_ELEMENTS = 1 << 23  # 32 MB fp32: a few hundred rows at V = 32k
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 16, 8192


class LogitTransform(NamedTuple):
    """``z = softcap·tanh(logit_scale·x / softcap) / temperature`` (softcap optional), ``x`` the raw
    logits with the bias (``alignkernels.reference.transform_logits``' order)."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0


class ChunkStats(NamedTuple):
    """Per-row softmax state of a chunk (contract 2) and the per-token outputs, compute dtype."""

    logp: torch.Tensor  # (z_label − m) − log_sum
    entropy: torch.Tensor  # log_sum − Σp·(z − m)
    row_max: torch.Tensor  # m
    log_sum: torch.Tensor  # log Σ e^(z − m)
    is_top1: torch.Tensor  # bool: the label is the first argmax


class TokenGrad(NamedTuple):
    """``∂L/∂logp`` and ``∂L/∂H`` per row of a chunk (``entropy`` None: the loss ignores H)."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None


class HeadGradients(NamedTuple):
    hidden: torch.Tensor | None  # [n, H], hidden's dtype
    weight: torch.Tensor | None  # [V, H], weight's dtype
    bias: torch.Tensor | None  # [V], bias's dtype


# token_grad(rows, stats) -> TokenGrad: the loss's per-token gradient for compact rows ``rows``
TokenGradFn = Callable[[slice, ChunkStats], TokenGrad]


class HeadPlan(NamedTuple):
    backend: str  # "torch" or "triton"
    chunk_rows: int


def make_plan(backend: str, device: torch.device, n_rows: int, vocab: int, chunk_size: int | None) -> HeadPlan:
    if chunk_size is None:
        budget = GPU_BUFFER_ELEMENTS if device.type == "cuda" else CPU_BUFFER_ELEMENTS
        chunk_size = min(max(budget // max(vocab, 1), MIN_CHUNK_ROWS), MAX_CHUNK_ROWS)
    return HeadPlan(backend, max(1, min(chunk_size, max(n_rows, 1))))


# --------------------------------------------------------------------------------------------
# GEMMs: fp32 results (accumulation) from half inputs on CUDA; same-dtype operands elsewhere
# --------------------------------------------------------------------------------------------
def _mm_into(out, a, b, bias=None):
    """``out = a @ b (+ bias)``; ``out`` may be fp32 while ``a``/``b`` are half (CUDA only)."""
    if a.dtype == out.dtype:
        if bias is not None:
            torch.addmm(bias, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return
    torch.mm(a, b, out_dtype=out.dtype, out=out)
    if bias is not None:
        out.add_(bias)


def _addmm_into(acc, a, b):
    """``acc += a @ b`` accumulated in ``acc``'s dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


# --------------------------------------------------------------------------------------------
# The math of one chunk, torch version (the Triton version is kernels/fused_head.py, same math)
# --------------------------------------------------------------------------------------------
def transform_logits_(buf: torch.Tensor, tr: LogitTransform, cap_grad: torch.Tensor | None):
    """In place ``x -> z``. With softcap, writes ``1 − tanh²`` (the derivative of ``s·tanh(y/s)``)
    into ``cap_grad``."""
    if tr.softcap is not None:
        buf.mul_(tr.logit_scale / tr.softcap).tanh_()
        torch.addcmul(torch.ones((), dtype=buf.dtype, device=buf.device), buf, buf, value=-1.0, out=cap_grad)
        buf.mul_(tr.softcap / tr.temperature)
    elif tr.logit_scale != 1.0 or tr.temperature != 1.0:
        buf.mul_(tr.logit_scale / tr.temperature)
    return buf


def chunk_softmax_stats_(z: torch.Tensor, work: torch.Tensor, labels: torch.Tensor) -> ChunkStats:
    """Centred softmax state of each row of ``z`` ``[rows, V]`` (contract 2). Leaves the centred
    logits ``c = z − m`` in ``z`` and ``e^c`` in ``work`` (both read by ``form_dz_``)."""
    row_max, argmax = z.max(1)  # first maximum
    c = z.sub_(row_max[:, None])
    exp_c = torch.exp(c, out=work)
    sum_exp = exp_c.sum(1)  # >= 1: the max contributes e^0
    log_sum = sum_exp.log()
    # Σ p·c = Σ e^c·c / Σ e^c; vecdot sums pairwise (einsum / bmm lose ~1e-4 over long rows)
    mean_c = torch.linalg.vecdot(exp_c, c) / sum_exp
    label_c = c.gather(1, labels[:, None]).squeeze(1)
    return ChunkStats(
        logp=label_c - log_sum,
        entropy=log_sum - mean_c,
        row_max=row_max,
        log_sum=log_sum,
        is_top1=argmax == labels,
    )


def form_dz_(c, exp_c, labels, stats: ChunkStats, grad: TokenGrad, tr: LogitTransform, cap_grad):
    """Overwrite the centred logits ``c`` with ``dz = d loss / d raw logit`` and return it.

    ``p = e^c / Σe^c``, ``z − Σp·z = c − (log_sum − H)``:
    ``dz = g_logp·onehot − p·[g_logp + g_H·(c − (log_sum − H))]`` then ``·k`` (transform).
    The row factors ``1/Σe^c`` and the sign fold into ``a·c + b``, formed with ``c`` already
    centred on the row max (so no cancellation at large |z|)."""
    inv_sum = torch.exp(-stats.log_sum)
    k = tr.logit_scale / tr.temperature
    if grad.entropy is not None:
        # -p·[g_logp + g_H·(c − μ)] = e^c·[a·c + b], a = −g_H/Σ, b = −(g_logp − g_H·μ)/Σ, μ = log_sum − H
        mu = stats.log_sum - stats.entropy
        a = (-grad.entropy * inv_sum)[:, None]
        b = (-(grad.logp - grad.entropy * mu) * inv_sum)[:, None]
        dz = torch.addcmul(b, c, a, out=c).mul_(exp_c)
    else:
        dz = torch.mul(exp_c, (-grad.logp * inv_sum)[:, None], out=c)
    dz.scatter_add_(1, labels[:, None], grad.logp[:, None].to(dz.dtype))  # + g_logp·onehot
    if cap_grad is not None:
        dz.mul_(cap_grad)
    if k != 1.0:
        dz.mul_(k)
    return dz


def _torch_chunk(buf, work, cap_grad, labels, tr, token_grad, rows) -> tuple[ChunkStats, torch.Tensor]:
    z = transform_logits_(buf, tr, cap_grad)
    stats = chunk_softmax_stats_(z, work, labels)
    grad = token_grad(rows, stats)
    return stats, form_dz_(z, work, labels, stats, grad, tr, cap_grad)


def _triton_chunk(buf, dz_buf, bias, weight, labels, tr, token_grad, rows) -> tuple[ChunkStats, torch.Tensor]:
    from ..kernels.fused_head import launch_dz, launch_stats

    stats = ChunkStats(*launch_stats(buf, bias, weight, labels, tr))
    grad = token_grad(rows, stats)
    g_entropy = grad.entropy if grad.entropy is not None else torch.zeros_like(grad.logp)
    launch_dz(buf, dz_buf, bias, weight, labels, stats, grad.logp.float().contiguous(), g_entropy.float().contiguous(), tr)
    return stats, dz_buf


# --------------------------------------------------------------------------------------------
# The chunk loop
# --------------------------------------------------------------------------------------------
class HeadOutputs(NamedTuple):
    logp: torch.Tensor  # [n] compute dtype, detached
    entropy: torch.Tensor  # [n]
    is_top1: torch.Tensor  # [n] bool
    grads: HeadGradients


def three_gemm_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    tr: LogitTransform,
    token_grad: TokenGradFn,
    plan: HeadPlan,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> HeadOutputs:
    """Run steps 1-5 of the module docstring over the compact rows ``hidden [n, H]``, ``labels [n]``
    (int64, all in ``[0, V)``). ``needs`` = which of (hidden, weight, bias) get a gradient."""
    n, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    cd = output_dtype(hidden.dtype)
    on_cuda = device.type == "cuda"
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    # GEMM operands: the input dtype on CUDA (tensor cores, fp32 out), the compute dtype elsewhere
    h = hidden if on_cuda else hidden.to(cd)
    w = weight if on_cuda else weight.to(cd)
    bias_cd = bias.to(cd) if bias is not None else None
    if bias_cd is not None and plan.backend == "torch":
        # a -inf bias removes a token: a huge finite z keeps e^(z-m) = 0 exact and every product
        # with it (Σp·(z-m), dz) at 0 instead of 0·inf = NaN
        bias_cd = bias_cd.clamp(min=-1e30) if cd == torch.float32 else bias_cd.clamp(min=-1e300)
    logp = torch.zeros(n, dtype=cd, device=device)
    entropy = torch.zeros(n, dtype=cd, device=device)
    is_top1 = torch.zeros(n, dtype=torch.bool, device=device)
    grad_h = torch.empty(n, H, dtype=h.dtype, device=device) if need_h else None
    grad_w_acc = torch.zeros(V, H, dtype=cd, device=device) if need_w else None
    grad_b = torch.zeros(V, dtype=cd, device=device) if need_b else None

    rows_per_chunk = plan.chunk_rows
    elems = min(rows_per_chunk, n) * V
    buf = torch.empty(elems, dtype=cd, device=device)
    if plan.backend == "torch":
        work = torch.empty(elems, dtype=cd, device=device)
        cap = torch.empty(elems, dtype=cd, device=device) if tr.softcap is not None else None
    else:
        dz_buf = buf if h.dtype == cd else torch.empty(elems, dtype=h.dtype, device=device)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)
        rows = slice(r0, r1)
        shape = (r1 - r0, V)
        logits = buf[: shape[0] * V].view(shape)
        if plan.backend == "torch":
            _mm_into(logits, h[rows], w.t(), bias=bias_cd)  # GEMM 1 (the bias added by addmm)
            stats, dz = _torch_chunk(logits, work[: shape[0] * V].view(shape),
                                     cap[: shape[0] * V].view(shape) if cap is not None else None,
                                     labels[rows], tr, token_grad, rows)  # fmt: skip
        else:
            _mm_into(logits, h[rows], w.t())  # GEMM 1 (the kernels add the bias)
            stats, dz = _triton_chunk(logits, dz_buf[: shape[0] * V].view(shape), bias, weight, labels[rows], tr,
                                      token_grad, rows)  # fmt: skip
        logp[rows], entropy[rows], is_top1[rows] = stats.logp, stats.entropy, stats.is_top1
        dz_gemm = dz if dz.dtype == h.dtype else dz.to(h.dtype)
        if need_h:
            torch.mm(dz_gemm, w, out=grad_h[rows])  # GEMM 2: grad_h[chunk] = dz @ W
        if need_w:
            _addmm_into(grad_w_acc, dz_gemm.t(), h[rows])  # GEMM 3: grad_W += dzᵀ @ h[chunk]
        if need_b:
            grad_b += dz.sum(0, dtype=cd)  # grad_b += Σ_rows dz
    grads = HeadGradients(
        hidden=grad_h.to(hidden.dtype) if grad_h is not None else None,
        weight=grad_w_acc.to(weight.dtype) if grad_w_acc is not None else None,
        bias=grad_b.to(bias.dtype) if grad_b is not None else None,
    )
    return HeadOutputs(logp, entropy, is_top1, grads)


class HeadGradientFunction(torch.autograd.Function):
    """``HeadGradientFunction.apply(loss, hidden, weight, bias, grads)`` returns ``loss`` unchanged;
    backward passes the upstream gradient ``g`` on to ``loss`` (so anything else the loss depends
    on, e.g. a value head, still gets its gradient) and returns ``g·grads`` for hidden, weight and
    bias -- the gradients ``three_gemm_head`` formed in the forward. The stored gradients are
    scaled in place (they belong to this call), so the backward allocates nothing."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads: HeadGradients):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the three-GEMM head's gradients were already used: backward runs once per forward")
        out = []
        for i, g in enumerate(grads):
            needed = ctx.needs_input_grad[1 + i]
            out.append(g.mul_(grad_loss.to(g.dtype)) if (g is not None and needed) else None)
        return grad_loss, out[0], out[1], out[2], None


# --------------------------------------------------------------------------------------------
# Input checks and row compaction, shared by the fused losses that use this head
# --------------------------------------------------------------------------------------------
def validate_head(hidden, weight, labels, bias, temperature, logit_scale, softcap) -> LogitTransform:
    """Clear errors for bad head inputs (naming the argument); returns the logit transform."""
    check_tensor("hidden", hidden, floating=True, ndim_min=1)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be 2-D [V, H] with V > 0 (the lm_head weight), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]})")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")  # fmt: skip
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},) of the weight's dtype {weight.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")  # fmt: skip
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = check_temperature(temperature)
    logit_scale = float(logit_scale)
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale}")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0.0 or not math.isfinite(softcap):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return LogitTransform(logit_scale, softcap, temperature)


class CompactRows(NamedTuple):
    """The valid rows of a flattened ``[..., H]`` / ``[...]`` problem."""

    hidden: torch.Tensor  # [n, H] (differentiable: index_select of the input)
    labels: torch.Tensor  # [n] int64
    positions: torch.Tensor | None  # [n] flat positions of the valid rows; None = all rows valid
    n_total: int

    def expand(self, x: torch.Tensor, shape) -> torch.Tensor:
        """Per-row values ``[n]`` back to ``shape`` (0 / False at ignored positions)."""
        if self.positions is not None:
            x = torch.zeros(self.n_total, dtype=x.dtype, device=x.device).index_copy(0, self.positions, x)
        return x.view(shape)


def compact_rows(hidden, labels, ignore_index) -> CompactRows:
    """Drop the rows whose label is ``ignore_index`` before any matmul (one host sync)."""
    H = hidden.shape[-1]
    flat_hidden, flat_labels = hidden.reshape(-1, H), labels.reshape(-1)
    n_total = flat_labels.numel()
    positions = (flat_labels != ignore_index).nonzero().squeeze(1)
    if positions.numel() == n_total:
        return CompactRows(flat_hidden, flat_labels.long().contiguous(), None, n_total)
    return CompactRows(flat_hidden.index_select(0, positions), flat_labels.index_select(0, positions).long(),
                       positions, n_total)  # fmt: skip
