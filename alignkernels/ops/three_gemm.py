"""The loss head in three GEMMs: a token-separable loss and its gradient, formed in the forward pass.

For a loss ``L = Σ_t f_t(logp_t, H_t)`` whose per-token gradient ``(∂L/∂logp_t, ∂L/∂H_t)`` depends
only on that token's own log-prob and entropy (and on normalisers fixed by the mask), the gradient
w.r.t. the logits of a token chunk can be formed while those logits are still at hand. Per chunk of
(valid) token rows ``r0:r1``:

1. **GEMM 1** ``buf = h[r0:r1] @ Wᵀ (+ b)``: the chunk's logits over the whole vocabulary, written
   into one reusable fp32 buffer ``[chunk, V]`` (``torch.mm``/``addmm(out=...)``: cuBLAS on the GPU).
2. **Stats**: ``z = transform(buf)``, the centred softmax state per row (``_softmax_torch.RowStats``):
   ``row_max m``, ``log_sum = log Σ e^(z−m)``, ``H = log_sum − Σp·(z−m)``, and ``logp = (z_label − m) − log_sum``,
   ``is_top1`` -- the lm-head engine's fold of one ``[chunk, V]`` tile (``_softmax_torch.fold_block``
   on the torch path, the ``linear_logprobs`` forward kernel on the triton path).
3. **Token gradient** ``(g_logp, g_H) = token_grad(rows, stats)``: the loss's callback; it sees
   only this chunk's tokens (and whatever per-token constants it closed over).
4. **dz**: ``dz = [g_logp·(onehot − p) − g_H·p·(z − Σp·z)]·k`` with ``p = e^((z−m) − log_sum)``,
   ``z − Σp·z = (z−m) − (log_sum − H)`` and ``k = dz/dx`` of the transform (``logit_scale/T``,
   times ``1 − tanh²`` with softcap): the shared gradient (``_softmax_torch.grad_from_centred_`` +
   ``raw_grad_``, or the ``linear_logprobs`` backward kernel), in a tile-sized buffer.
5. **GEMM 2** ``grad_h[r0:r1] = dz @ W`` (each row complete in one GEMM, written in fp32) and
   **GEMM 3** ``grad_W += dzᵀ @ h[r0:r1]``, ``grad_b += Σ_rows dz``.

That is 6·n·H·V matmul FLOPs for ``n`` valid rows, against 8·n·H·V for a differentiable
log-prob head followed by autograd (forward, recompute, two gradient GEMMs).

With a LoRA adapter on the head (``lora=``: ``x = h·Wᵀ + s·(h·Aᵀ)·Bᵀ``) the same three GEMMs run on
operands widened by the rank, ``[h, u]`` and ``[W, B]`` with ``u = s·h·Aᵀ`` (``ops/_lora.py``
``LoraConcat``): GEMM 1 has K = H + r, GEMM 2 yields ``[dz·W, dz·B]``, GEMM 3 ``[grad_W, grad_B]``
(only the thin ``dzᵀ·u`` when the base weight is frozen); three ``n·r·H`` GEMMs finish ``u``,
grad_h's ``s·dU·A`` and ``grad_A``. Frozen base: ``2·n·(2V(H + r) + V·r + 3r·H)`` FLOPs. The forward returns
the per-token statistics and the finished gradients; :class:`HeadGradientFunction` hands them to
autograd, scaled by the upstream gradient of the loss. When no input needs a gradient (``no_grad``,
``inference_mode``) only steps 1-2 run: 2·n·H·V. A second backward over one forward runs the head
again (:class:`HeadCall` ``.recompute``); double backward is refused. Under ``torch.compile`` the
ignored rows are not dropped but masked (``valid``): 0 outputs, zero token gradient.

Batch invariance (``batch_invariant=True``: :func:`batch_invariant_plan`, ``plan.padded``): one chunk
size fixed by the device and ``V`` (the default chunk, capped at 512 / 1024 rows), the valid rows padded
to whole chunks (hidden 0, label 0, zero token gradient), so GEMM 1, the fold and GEMM 2 always run at
one shape and a row's logp, entropy and ``grad_hidden`` row depend on that row alone (with ``lora=``
too: ``LoraConcat``'s ``[V, H + r]`` operand has a fixed shape and its thin GEMMs run per chunk). GEMM 3 and
``grad_b`` reduce over rows: the padded rows add exact zeros, so they are bitwise the same for the
same valid rows in the same order, but change with the set of rows (another micro-batch split).
Cost: at most one chunk of padded rows, ``6·ceil(n/R)·R·H·V``.

Backends: the folds of the lm-head engine (``_lmhead_engine``), with a vocabulary block of the
whole ``V``: ``torch`` (:class:`TorchHeadFold`: fused ATen ops; CPU, fp64, anywhere) and ``triton``
(:class:`TritonHeadFold`: steps 2 and 4 are the ``alignkernels.kernels.linear_logprobs`` kernels,
one program per row for the stats, a ``[rows, V/BLOCK]`` grid for dz; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``). Validation, row compaction, the plan and the GEMM helpers
are the engine's too: ``linear_logprobs`` and this head check their inputs in one place.
GEMMs run in the input dtype on CUDA (fp32 out via ``out_dtype``) and in fp32 (fp64) on the CPU.

Memory (besides inputs): the fp32 logits buffer ``chunk x V`` plus, on the torch path, one fp32
work buffer of the same shape (``e^(z−m)``, then dz) and a third with softcap (``1 − tanh²``); on the triton
path a ``chunk x V`` dz buffer in the GEMM operand dtype when that is half. The gradients exist from the
forward on: ``grad_hidden`` ``[n, H]`` (fp32, written by GEMM 2 in fp32 and rounded to the input
dtype once at the end), ``grad_weight`` ``[V, H]`` (fp32 accumulator for half weights, cast once at
the end), ``grad_bias`` ``[V]``. O(n) statistics. Nothing scales with ``n x V``. With LoRA:
``[n, H + r]`` and ``[V, H + r]`` operand copies (the head weight once more, for the call) and the
adapter's gradients. :class:`HeadGradientFunction` keeps references to ``hidden [n, H]``,
``weight``, ``bias`` (and the adapter) until the graph is freed (for a recompute).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._utils import check_batch_invariant, output_dtype, refuse_double_backward
from ._lmhead_engine import (
    BLOCK_ALIGN,
    HeadPrecision,
    Plan,
    TorchFold,
    Transform,
    TritonFold,
    addmm_into,
    head_precision,
    mm_into,
    pad_rows,
)
from ._lora import LoraConcat, LoraHead
from ._lmhead_engine import make_plan as make_tile_plan
from ._softmax_torch import fold_block, grad_from_centred_, log_prob, raw_grad_, transform_

# Default fp32 elements in the logits buffer (chunk rows = budget // V, clamped).
GPU_BUFFER_ELEMENTS = 1 << 27  # 512 MB fp32
CPU_BUFFER_ELEMENTS = 1 << 23  # 32 MB fp32: a few hundred rows at V = 32k
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 16, 8192
# Elements of one widened weight block (when the GEMM operand is a wider copy of the weight: CPU, or
# head_precision "fp32" / "tf32" on CUDA): the weight is widened [block, H] at a time, never whole.
GPU_WEIGHT_BLOCK_ELEMENTS = 1 << 26
CPU_WEIGHT_BLOCK_ELEMENTS = 1 << 22
# batch_invariant=True: the default chunk for V (fixed by V), at most this many rows (bounds the padding)
BATCH_INVARIANT_ROWS = {"cpu": 512, "cuda": 1024}


class WeightOperand:
    """The weight as the three GEMMs' operand (``plan.precision``: :class:`HeadPrecision`). When the
    operand has the weight's dtype it is the weight itself, one block; otherwise it is widened one
    ``[block, H]`` row block at a time, per GEMM and chunk (2·V·H element conversions per chunk
    against its 6·chunk·V·H FLOPs), so no full widened copy of the weight ever exists. GEMM 2 then
    sums its ``dz[:, block] @ W[block]`` products block after block in fp32."""

    def __init__(self, weight: torch.Tensor, compute_dtype, precision: HeadPrecision):
        self.weight, self.cd, self.precision = weight, compute_dtype, precision
        V, H = weight.shape
        self.dtype = precision.operand(weight[:0], compute_dtype).dtype
        if self.dtype == weight.dtype:
            rows = V
        else:
            budget = GPU_WEIGHT_BLOCK_ELEMENTS if weight.is_cuda else CPU_WEIGHT_BLOCK_ELEMENTS
            rows = max(BLOCK_ALIGN, budget // max(H, 1) // BLOCK_ALIGN * BLOCK_ALIGN)
        self.bounds = [(v0, min(v0 + rows, V)) for v0 in range(0, V, rows)]

    def __iter__(self):
        for v0, v1 in self.bounds:
            yield v0, v1, self.precision.operand(self.weight[v0:v1], self.cd)

class ChunkStats(NamedTuple):
    """Per-row softmax state of a chunk (``_softmax_torch.RowStats``) and the per-token outputs (compute
    dtype)."""

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
    lora_A: torch.Tensor | None = None  # [r, H], the adapter's dtype (lora= only)
    lora_B: torch.Tensor | None = None  # [V, r]


# token_grad(rows, stats) -> TokenGrad: the loss's per-token gradient for compact rows ``rows``
TokenGradFn = Callable[[slice, ChunkStats], TokenGrad]


# --------------------------------------------------------------------------------------------
# One chunk: stats, the loss's token gradient, dz -- on the engine's folds (one vocab block = V)
# --------------------------------------------------------------------------------------------
class TorchHeadFold(TorchFold):
    """The engine's torch fold, stats and gradient on the same tile (no recompute)."""

    @staticmethod
    def step(tile, dx, work, bias, weight, labels, tr: Transform, grad_of):
        """Raw tile (bias included; overwritten) -> ``(ChunkStats, dz)``; ``dz`` in ``work``
        (``grad_of`` None: no gradient wanted, ``dz`` None)."""
        if grad_of is None:  # no gradient wanted: no derivative tile either
            y, dy_dx = transform_(tile, tr.logit_scale, tr.softcap), None
        else:
            y, dy_dx = transform_(tile, tr.logit_scale, tr.softcap, keep_derivative=True)
        first_argmax = y.argmax(1) == labels  # (a NaN counts as the maximum: masked by a NaN logp below)
        label_masked = torch.isneginf(y.gather(1, labels[:, None]).squeeze(1))
        block = fold_block(y, tr.temperature, work)  # tile <- d = z - m_y/T (m_y/T exact), work <- e^d
        # d and log Σe^d share one centring, so d - log Σe^d = (z - row_max) - log_sum; d is clamped
        # at fold_block's no-mass floor, so a label on a -inf logit (p = 0) is restored to -inf here
        log_s = block.sum_e.log()
        logp = log_prob(block.d.gather(1, labels[:, None]).squeeze(1), log_s)
        logp.masked_fill_(label_masked, float("-inf"))
        is_top1 = first_argmax & ~torch.isnan(logp)  # as _lmhead_engine.label_is_top1: False in a NaN row
        row = block.stats
        stats = ChunkStats(logp, row.entropy, row.row_max, row.log_sum, is_top1)
        if grad_of is None:
            return stats, None
        grad = grad_of(stats)
        dz = grad_from_centred_(block.d, log_s, row.entropy, grad.logp, grad.entropy, labels, work)
        return stats, raw_grad_(dz, dy_dx, tr.logit_scale, tr.temperature)


class TritonHeadFold(TritonFold):
    """The engine's Triton fold (``linear_logprobs`` kernels): the forward kernel's stats of the
    whole row, then its backward kernel on the same tile (the kernels read it, never write it)."""

    @staticmethod
    def step(tile, dx, work, bias, weight, labels, tr: Transform, grad_of):
        state = TritonFold.new_state(tile.shape[0], tile.dtype, tile.device)
        TritonFold.forward(tile, None, bias, weight, labels, state, 0, tr, True)  # is_top1 needs the stats
        head = TritonFold.finalise(state, tr, tile.shape[1], True)
        row = head.stats
        stats = ChunkStats(head.logp, row.entropy, row.row_max, row.log_sum, head.extra[2])
        if grad_of is None:
            return stats, None
        grad = grad_of(stats)
        g_entropy = grad.entropy.to(tile.dtype) if grad.entropy is not None else None
        return stats, TritonFold.backward(tile, dx, None, bias, weight, labels, row, grad.logp.to(tile.dtype),
                                          g_entropy, 0, tr)  # fmt: skip


HEAD_FOLDS = {"torch": TorchHeadFold, "triton": TritonHeadFold}


def check_batch_invariant_head(batch_invariant, backend: str) -> bool:
    """``batch_invariant=`` of an op on this head: a bool (``TypeError``), and ``True`` only on the
    backends with a fold (:data:`HEAD_FOLDS`) (``ValueError``, the words of ``linear_logprobs``'s
    refusal), with or without ``lora=``. Returns it."""
    check_batch_invariant(batch_invariant)
    if batch_invariant and backend not in HEAD_FOLDS:
        raise ValueError(f"batch_invariant=True is implemented on the backends {tuple(HEAD_FOLDS)}, "
                         f"got backend={backend!r}")  # fmt: skip
    return batch_invariant


def make_plan(fold, device: torch.device, n_rows: int, vocab: int, chunk_size: int | None,
              precision: str = "input", batch_invariant: bool = False) -> Plan:  # fmt: skip
    """The engine's plan with one vocabulary block (the whole row) and a chunk that keeps the
    ``[chunk, V]`` buffer near ``*_BUFFER_ELEMENTS``; ``precision``: ``head_precision=``.
    ``batch_invariant``: :func:`batch_invariant_plan` (``n_rows`` and ``chunk_size`` not used)."""
    if batch_invariant:
        return batch_invariant_plan(device, vocab, precision)
    if chunk_size is None:
        budget = GPU_BUFFER_ELEMENTS if device.type == "cuda" else CPU_BUFFER_ELEMENTS
        chunk_size = min(max(budget // max(vocab, 1), MIN_CHUNK_ROWS), MAX_CHUNK_ROWS)
    return make_tile_plan(fold, device, n_rows, vocab, chunk_size, vocab, precision)


def batch_invariant_plan(device: torch.device, vocab: int, precision: str = "input") -> Plan:
    """The fixed plan of ``batch_invariant=True``: chunks of ``R`` rows, ``R`` fixed by the device and
    ``V`` only: the default plan's chunk for ``V`` (``*_BUFFER_ELEMENTS // V``, at least
    ``MIN_CHUNK_ROWS``), capped at :data:`BATCH_INVARIANT_ROWS` (512 on the CPU, 1024 on CUDA: at most
    that many padded rows per call) -- one vocabulary block, and ``padded``: :func:`three_gemm_head`
    pads the rows to whole chunks, so GEMM 1, the fold, GEMM 2 (and GEMM 3) always run at one shape.
    (The default chunk, not a smaller one: on the CPU 256-row chunks ran ~40 % slower than 512 at
    V = 16384, H = 256.)"""
    budget = GPU_BUFFER_ELEMENTS if torch.device(device).type == "cuda" else CPU_BUFFER_ELEMENTS
    cap = BATCH_INVARIANT_ROWS.get(torch.device(device).type, BATCH_INVARIANT_ROWS["cpu"])
    rows = min(cap, max(MIN_CHUNK_ROWS, budget // max(vocab, 1)), MAX_CHUNK_ROWS)
    return Plan(rows, vocab, head_precision(precision), padded=True)


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
    tr: Transform,
    token_grad: TokenGradFn,
    plan: Plan,
    fold,
    needs: tuple[bool, ...] = (True, True, True),
    valid: torch.Tensor | None = None,
    lora: LoraHead | None = None,
) -> HeadOutputs:
    """Run steps 1-5 of the module docstring over the compact rows ``hidden [n, H]``, ``labels [n]``
    (int64, all in ``[0, V)``) with ``fold`` (a :data:`HEAD_FOLDS` value). ``needs`` = which of
    (hidden, weight, bias) get a gradient; with ``lora`` (a validated adapter, ``ops/_lora.py``)
    five flags, (hidden, weight, bias, lora_A, lora_B), and the LoRA term rides in the same three
    GEMMs (:class:`alignkernels.ops._lora.LoraConcat`: K = H + r). With no flag set, only GEMM 1
    and the stats run (2·n·H·V FLOPs, no gradient buffer, ``token_grad`` never called). ``valid [n]``
    (bool, optional) marks the rows that count: the others (ignored rows kept in place under
    ``torch.compile``, see ``_lmhead_engine.CompactRows``) get 0 outputs and a zero token gradient,
    whatever ``token_grad`` says about them. GEMM operands and mode: ``plan.precision``
    (``_lmhead_engine.HeadPrecision``; :class:`WeightOperand`).

    ``plan.padded`` (:func:`batch_invariant_plan`): the rows are padded to whole chunks first
    (:func:`_padded_head`), so a row's logp, entropy, is_top1 and ``grads.hidden`` row are bitwise
    functions of its own hidden state, label and token gradient. ``grads.weight`` / ``grads.bias``
    are sums over rows: bitwise the same for the same valid rows in the same order (whatever
    padding, packing or ignored rows surround them), not for another set of rows (so are the
    adapter's ``grads.lora_A`` / ``lora_B``; its thin GEMMs run per chunk, ``LoraConcat``)."""
    with plan.precision.gemms(hidden.device):
        if plan.padded:
            return _padded_head(hidden, weight, bias, labels, tr, token_grad, plan, fold, needs, valid, lora)
        return _three_gemm_head(hidden, weight, bias, labels, tr, token_grad, plan, fold, needs, valid, lora)


def _padded_head(hidden, weight, bias, labels, tr, token_grad, plan, fold, needs, valid, lora) -> HeadOutputs:
    """:func:`_three_gemm_head` on the rows padded to a multiple of ``plan.chunk_rows`` (hidden 0,
    label 0, ``valid`` False: zero token gradient, so their ``dz`` rows are 0 and add exact zeros to
    GEMM 3 and ``grad_b``); ``token_grad`` sees the real rows only; outputs cut back to ``n`` rows."""
    n = hidden.shape[0]
    rows = plan.chunk_rows
    real = torch.ones(n, dtype=torch.bool, device=hidden.device) if valid is None else valid

    def padded_grad(chunk: slice, stats: ChunkStats) -> TokenGrad:
        k = max(0, min(chunk.stop, n) - chunk.start)  # real rows of this chunk (the padding is last)
        grad = token_grad(slice(chunk.start, chunk.start + k), ChunkStats(*(x[:k] for x in stats)))
        pad = stats.logp.shape[0] - k
        return TokenGrad(*(None if g is None else torch.cat([g, g.new_zeros(pad)]) for g in grad))

    out = _three_gemm_head(pad_rows(hidden, rows), weight, bias, pad_rows(labels, rows), tr, padded_grad, plan, fold,
                           needs, pad_rows(real, rows, False), lora)  # fmt: skip
    grads = out.grads._replace(hidden=None if out.grads.hidden is None else out.grads.hidden[:n])
    return HeadOutputs(out.logp[:n], out.entropy[:n], out.is_top1[:n], grads)


def _three_gemm_head(hidden, weight, bias, labels, tr, token_grad, plan, fold, needs, valid, lora) -> HeadOutputs:
    n, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    cd = output_dtype(hidden.dtype)
    need_h, need_w, need_b = needs[:3]
    need_A, need_B = (needs[3], needs[4]) if lora is not None else (False, False)
    need_b = need_b and bias is not None
    precision = plan.precision
    h = precision.operand(hidden, cd)  # GEMM operands (HeadPrecision): the input dtype on CUDA (fp32 out), else cd
    cat = None
    if lora is not None:
        cat = LoraConcat(lora, h, weight, cd, lambda t: precision.operand(t, cd), addmm_into,
                         plan.chunk_rows)  # fmt: skip
    h_op = cat.hu if cat is not None else h  # [n, K]: K = H (+ r)
    # [V, K], as whole or as widened row blocks
    w_op = WeightOperand(cat.wb, cd, precision) if cat is not None else WeightOperand(weight, cd, precision)
    K = h_op.shape[1]
    bias_cd = bias.to(cd) if bias is not None else None
    logp = torch.zeros(n, dtype=cd, device=device)
    entropy = torch.zeros(n, dtype=cd, device=device)
    is_top1 = torch.zeros(n, dtype=torch.bool, device=device)
    # fp32 even for half inputs: GEMM 2 reduces over the whole vocabulary (K = V ~ 150k); with a
    # half-precision output cuBLAS may reduce in that precision, so it writes fp32 (``mm_into``:
    # ``out_dtype`` on CUDA) and the result is rounded to hidden's dtype once, at the end
    grad_h = torch.empty(n, K, dtype=cd, device=device) if need_h else None  # with lora: [dz·W, dz·B]
    d_u = torch.empty(n, cat.rank, dtype=cd, device=device) if (need_A and not need_h) else None
    grad_w_acc = torch.zeros(V, K, dtype=cd, device=device) if need_w else None  # with lora: [grad_W, grad_B]
    grad_B_acc = torch.zeros(V, cat.rank, dtype=cd, device=device) if (need_B and not need_w) else None
    grad_b = torch.zeros(V, dtype=cd, device=device) if need_b else None

    def grad_of(rows):
        if not (need_h or need_w or need_b or need_A or need_B):
            return None
        if valid is None:
            return lambda stats: token_grad(rows, stats)
        return lambda stats: _masked_token_grad(token_grad(rows, stats), valid[rows])

    elems = min(plan.chunk_rows, n) * V
    buf = torch.empty(elems, dtype=cd, device=device)
    work = torch.empty(elems, dtype=cd, device=device) if fold.needs_work else None
    dx_dtype = fold.dx_dtype(h.dtype, cd)
    dx_buf = buf if dx_dtype == cd else torch.empty(elems, dtype=dx_dtype, device=device)
    for r0 in range(0, n, plan.chunk_rows):
        r1 = min(r0 + plan.chunk_rows, n)
        rows = slice(r0, r1)
        size = (r1 - r0) * V
        logits = buf[:size].view(r1 - r0, V)
        for v0, v1, w_blk in w_op:  # GEMM 1 (the torch fold's addmm adds the bias)
            fold.tile(logits[:, v0:v1], h_op[rows], w_blk, bias_cd[v0:v1] if bias_cd is not None else None)
        stats, dz = fold.step(logits, dx_buf[:size].view(r1 - r0, V), None if work is None else work[:size].view(r1 - r0, V),
                              bias, weight, labels[rows], tr, grad_of(rows))  # fmt: skip
        logp[rows], entropy[rows], is_top1[rows] = stats.logp, stats.entropy, stats.is_top1
        if dz is None:
            continue
        dz_gemm = dz if dz.dtype == h.dtype else dz.to(h.dtype)
        if need_h or need_w:
            for v0, v1, w_blk in w_op:
                if need_h:  # GEMM 2: grad_h[chunk] = dz @ W  ([dz·W, dz·B]; fp32 out), summed over blocks
                    (mm_into if v0 == 0 else addmm_into)(grad_h[rows], dz_gemm[:, v0:v1], w_blk)
                if need_w:  # GEMM 3: grad_W += dzᵀ @ h[chunk]  ([.., dzᵀ·u])
                    addmm_into(grad_w_acc[v0:v1], dz_gemm[:, v0:v1].t(), h_op[rows])
        if not need_h and d_u is not None:
            mm_into(d_u[rows], dz_gemm, cat.b)  # dU[chunk] = dz @ B (lora_A trains, hidden does not; fp32 out)
        if grad_B_acc is not None:
            addmm_into(grad_B_acc, dz_gemm.t(), cat.u[rows])  # frozen base: grad_B += dzᵀ @ u[chunk] only
        if need_b:
            grad_b += dz.sum(0, dtype=cd)  # grad_b += Σ_rows dz
    grad_A = grad_B = None
    if cat is not None:
        grad_h, grad_w_acc, grad_A, grad_B = cat.split(grad_h, d_u, grad_w_acc, grad_B_acc, need_A)
    if valid is not None:
        logp, entropy, is_top1 = (torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=device))
                                  for x in (logp, entropy, is_top1))  # fmt: skip
    grads = HeadGradients(
        hidden=_cast(grad_h, hidden.dtype),
        weight=_cast(grad_w_acc, weight.dtype),
        bias=_cast(grad_b, None if bias is None else bias.dtype),
        lora_A=_cast(grad_A, None if lora is None else lora.lora_A.dtype),
        lora_B=_cast(grad_B, None if lora is None else lora.lora_B.dtype),
    )
    return HeadOutputs(logp, entropy, is_top1, grads)


def _cast(grad, dtype):
    """A finished gradient in its parameter's dtype, contiguous (``None`` passes through)."""
    return None if grad is None else grad.to(dtype).contiguous()


def _masked_token_grad(grad: TokenGrad, valid: torch.Tensor) -> TokenGrad:
    """Zero token gradient on the rows that do not count (``valid`` False)."""
    zero = torch.zeros((), dtype=grad.logp.dtype, device=grad.logp.device)
    return TokenGrad(torch.where(valid, grad.logp, zero),
                     None if grad.entropy is None else torch.where(valid, grad.entropy, zero))  # fmt: skip


class HeadCall(NamedTuple):
    """What :class:`HeadGradientFunction` holds besides the tensors: the public op and backend (for
    its errors), the gradients the forward formed, and ``recompute(hidden, weight, bias, lora_A,
    lora_B) -> HeadGradients``, the same head run again (for a second backward over one forward)."""

    op: str
    backend: str
    grads: HeadGradients
    recompute: Callable[..., HeadGradients]


class HeadGradientFunction(torch.autograd.Function):
    """``HeadGradientFunction.apply(loss, hidden, weight, bias, lora_A, lora_B, call: HeadCall)``
    returns ``loss`` unchanged; backward passes the upstream gradient ``g`` on to ``loss`` (so anything
    else the loss depends on, e.g. a value head, still gets its gradient) and returns ``g·grads`` for
    hidden, weight, bias and the adapter (``lora_A``/``lora_B`` None without one) -- the gradients
    ``three_gemm_head`` formed in the forward, scaled in place (they belong to this call), so the
    first backward allocates nothing.

    A later backward over the same forward (``retain_graph=True``, or one ``torch.autograd.grad``
    per input) finds them used and runs the head again (``call.recompute``, 6·n·H·V FLOPs) on the
    saved ``hidden``, ``weight``, ``bias`` -- autograd's version check makes an in-place change of
    those in between an error, not a gradient at other weights. Double backward
    (``create_graph=True``) is the project's one error (``_utils.refuse_double_backward``): the
    formed gradients are constants, a gradient penalty built on them would silently be 0."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, lora_A, lora_B, call: HeadCall):
        ctx.call, ctx.grads = call._replace(grads=None), call.grads  # the gradients: one reference, dropped when used
        ctx.save_for_backward(hidden, weight, bias, lora_A, lora_B)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward(ctx.call.op, ctx.call.backend)
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # the forward's gradients went to an earlier backward: form them again
            grads = ctx.call.recompute(*ctx.saved_tensors)
        out = []
        for i, g in enumerate(grads):
            needed = ctx.needs_input_grad[1 + i]
            out.append(g.mul_(grad_loss.to(g.dtype)) if (g is not None and needed) else None)
        return grad_loss, *out, None
