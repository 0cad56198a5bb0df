"""The clipped-policy row engine shared by GRPO and PPO: the per-token policy loss (clipped ratio
with optional dual clip and ±L log-ratio clamp, CISPO with an optional lower clamp, SAPO, VESPO), the k3 KL, the token
weights, reduced to per-row sums over valid tokens. The policy-loss rows (``losses/policy_rows.py``,
``losses/verl_policy.py``) name the ``PolicyTerm`` they run.

Both losses call :func:`policy_rows` with the same :class:`TokenInputs` and a
:class:`PolicyTerm`, then aggregate the ``[B]`` row sums their own way (GRPO: TRL's loss types;
PPO: verl's ``agg_loss`` modes). Two implementations return the same rows:

- ``torch``: :func:`policy_rows_torch`, the per-token formulas of TRL 1.16
  ``GRPOTrainer._compute_loss`` in eager PyTorch (autograd differentiates it, double backward
  included);
- ``triton``: :class:`PolicyRowsFunction`, one forward pass over ``[B, T]`` writing
  ``ROW_STATS`` per row and one backward pass writing ``d row_loss_sum / d logp``
  (``alignkernels.kernels.grpo``, whose docstring derives the gradient). VESPO is torch only.

Memory: the torch path keeps its ``[B, T]`` temporaries for autograd; the Triton path keeps only
its fp32 ``[B, T]`` inputs. Numerics: fp32 (fp64 for fp64 inputs on the torch path; the kernels
run fp32). Masked positions are neutralised before any exp/log.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._utils import output_dtype

POLICY_KINDS = ("clipped", "cispo", "sapo", "vespo")
TRUST_REGIONS = {None: 0, "tv": 1, "binary_kl": 2}  # PolicyTerm.trust_region -> the kernels' TRUST_REGION


class TokenInputs(NamedTuple):
    """Per-token inputs of the engine, ``[B, T]`` in the compute dtype, 0 at masked positions
    (``adv`` and ``is_ratio`` may be ``[B, 1]``). ``old=None``: on-policy (``logp.detach()``);
    ``ref=None``: no KL; ``weight`` / ``is_ratio`` None: 1."""

    logp: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    adv: torch.Tensor
    valid: torch.Tensor  # bool
    weight: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None


class PolicyTerm(NamedTuple):
    """What the per-token loss is (see ``alignkernels.kernels.grpo`` for the formulas)."""

    kind: str  # one of POLICY_KINDS
    sequence: bool = False  # one ratio per sequence (GSPO) instead of per token
    beta: float = 0.0
    bias_correction: bool = True  # KL times the ratio
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None  # cap of the unclipped ratio (two-sided clipping)
    tau_pos: float = 1.0  # SAPO gate temperatures
    tau_neg: float = 1.05
    clip_c: float | None = None  # clipped: dual clip, for A < 0 the loss is capped at -A * clip_c
    ratio_min: float | None = None  # cispo: lower bound of the clamped ratio (two-sided)
    trust_region: str | None = None  # cispo: "tv" / "binary_kl" (verl DPPO, TRUST_REGIONS), None: off
    region_low: float = 0.2  # its bounds on a fall (A <= 0) / rise (A > 0) of the token's probability
    region_high: float = 0.2
    quad: float | None = None  # cispo: + quad/2 * (logp - old)^2 (verl DRO)
    log_ratio_clamp: float | None = None  # the log-ratio clamped to [-L, L] before exp (verl: 20), None: off


@torch.no_grad()
def trust_region_mask(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, term: PolicyTerm) -> torch.Tensor:
    """verl DPPO's trust region (``compute_policy_loss_dppo_tv`` / ``_dppo_kl``), 1 inside, 0 outside:
    for ``A > 0`` the token's probability may rise by ``region_high``, for ``A <= 0`` fall by
    ``region_low``; in ``p − p_old`` (``"tv"``) or in the binary KL of ``(p_old, p)``
    (``"binary_kl"``, a move away from the bound always inside)."""
    prob, old_prob = torch.exp(logp), torch.exp(old)
    if term.trust_region == "tv":
        pos, neg = (prob - old_prob) <= term.region_high, (prob - old_prob) >= -term.region_low
    else:
        bkl = old_prob * (old - logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        pos, neg = (bkl <= term.region_high) | (prob <= old_prob), (bkl <= term.region_low) | (prob >= old_prob)
    return torch.where(adv > 0, pos, neg).to(logp.dtype)


# --------------------------------------------------------------------------------------------
# PyTorch rows (TRL 1.16 GRPOTrainer._compute_loss, per token, then reduced per row)
# --------------------------------------------------------------------------------------------
def policy_rows_torch(inputs: TokenInputs, term: PolicyTerm, vespo_weights: torch.Tensor | None = None) -> dict:
    """Per-row sums over valid tokens (``loss_sum`` differentiable w.r.t. ``logp``) of the
    per-token loss, transcribing ``GRPOTrainer._compute_loss``: a dict keyed by the kernels'
    ``ROW_STATS`` names (``kl_sum`` None without KL, ``coef`` None at token level). ``vespo_weights`` ``[B, 1]``
    (detached ``phi(w)``) are required by ``kind="vespo"``."""
    logp, valid = inputs.logp, inputs.valid
    cd = logp.dtype
    maskf = valid.to(cd)
    adv = inputs.adv
    old = logp.detach() if inputs.old is None else inputs.old
    log_ratio = logp - old
    if term.log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -term.log_ratio_clamp, term.log_ratio_clamp)
    if term.sequence:
        log_importance_weights = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_importance_weights = log_ratio
    coef_1 = torch.exp(log_importance_weights)

    with_kl = term.beta != 0.0
    if with_kl:
        ref = inputs.ref
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        if term.bias_correction:
            per_token_kl = per_token_kl * coef_1

    dual = None
    if term.kind == "cispo":
        clamped_ratios = torch.clamp(coef_1, min=term.ratio_min, max=term.eps_high).detach()
        if term.trust_region is not None:
            clamped_ratios = clamped_ratios * trust_region_mask(logp.detach(), old, adv, term)
        per_token_loss = -clamped_ratios * adv * logp
        if term.quad is not None:
            per_token_loss = per_token_loss + 0.5 * term.quad * (logp - old).square()
    elif term.kind == "clipped":
        coef_2 = torch.clamp(coef_1, 1 - term.eps_low, 1 + term.eps_high)
        if term.delta is not None:
            coef_1 = torch.clamp(coef_1, max=term.delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        if term.clip_c is not None:  # dual clip (verl compute_policy_loss_vanilla)
            cap = -adv * term.clip_c
            dual = (adv < 0) & (per_token_loss.detach() > cap)  # the cap binds: verl's pg_clipfrac_lower
            per_token_loss = torch.where(adv < 0, torch.min(cap, per_token_loss), per_token_loss)
    elif term.kind == "sapo":
        temperatures = torch.where(adv > 0, term.tau_pos, term.tau_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * adv
    else:  # vespo
        per_token_loss = -vespo_weights * adv * logp

    if inputs.weight is not None:
        per_token_loss = per_token_loss * inputs.weight
    if inputs.is_ratio is not None and term.kind != "vespo":  # VESPO folds the IS ratio into its weights
        per_token_loss = per_token_loss * inputs.is_ratio
    if with_kl:
        per_token_loss = per_token_loss + term.beta * per_token_kl

    rows = {"loss_sum": (per_token_loss * maskf).sum(-1), "count": maskf.sum(-1)}
    with torch.no_grad():
        B, T = maskf.shape
        c1 = coef_1.detach()
        rows["kl_sum"] = (per_token_kl.detach() * maskf).sum(-1) if with_kl else None
        low = ((c1 < 1 - term.eps_low) & (adv < 0)).to(cd).expand(B, T)
        high = ((c1 > 1 + term.eps_high) & (adv > 0)).to(cd).expand(B, T)
        rows["low_sum"] = (low * maskf).sum(-1)
        rows["high_sum"] = (high * maskf).sum(-1)
        rows["region_sum"] = (torch.maximum(low, high) * maskf).sum(-1)
        rows["cispo_sum"] = (((c1 > term.eps_high) & (adv > 0)).to(cd).expand(B, T) * maskf).sum(-1)
        rows["coef"] = torch.exp(log_importance_weights.detach()[:, 0]) if term.sequence else None
        rows["dual_sum"] = maskf.new_zeros(B) if dual is None else (dual.to(cd).expand(B, T) * maskf).sum(-1)
    return rows


# --------------------------------------------------------------------------------------------
# Triton rows: launcher + autograd Function over the per-row sums
# --------------------------------------------------------------------------------------------
def _grpo_kernels():
    """The kernel module, imported on first launch: Triton is optional off Linux, and
    ``TRITON_INTERPRET`` is read when its kernels are decorated."""
    from ..kernels import grpo

    return grpo


def _rows_view(t, B, T):
    """fp32 ``[B, T]`` view with a contiguous last dim, plus its (row stride, token stride)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if t.shape[-1] == 1 and T != 1:  # [B, 1]: broadcast along T with token stride 0
        t = t.reshape(B, 1).contiguous()
        return t, t.stride(0), 0
    t = t.expand(B, T)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), 1


class KernelLaunch(NamedTuple):
    """Everything both kernels take besides the per-row outputs."""

    inputs: tuple  # fp32 tensors in TOKEN_INPUTS order (absent ones: logp)
    row_strides: tuple
    token_strides: tuple
    params: tuple  # fp32 scalars in PARAMS order
    flags: dict  # constexpr flags: HAS_*, LOSS_KIND, SEQUENCE, BIAS_CORRECTION, DUAL_CLIP, CISPO_LOWER, ...


def _kernel_launch(inputs: TokenInputs, maskf: torch.Tensor, term: PolicyTerm) -> KernelLaunch:
    kern = _grpo_kernels()
    B, T = inputs.logp.shape
    given = {"logp": inputs.logp, "old": inputs.old, "ref": inputs.ref, "adv": inputs.adv, "mask": maskf,
             "weight": inputs.weight, "is_ratio": inputs.is_ratio}  # fmt: skip
    views = {name: _rows_view(t, B, T) for name, t in given.items() if t is not None}
    ordered = [views.get(name, views["logp"]) for name in kern.TOKEN_INPUTS]
    values = {"beta": term.beta, "eps_low": term.eps_low, "eps_high": term.eps_high,
              "delta": float("inf") if term.delta is None else term.delta,
              "tau_pos": term.tau_pos, "tau_neg": term.tau_neg,
              "clip_c": float("inf") if term.clip_c is None else term.clip_c,
              "ratio_min": float("-inf") if term.ratio_min is None else term.ratio_min,
              "region_low": term.region_low, "region_high": term.region_high,
              "quad": 0.0 if term.quad is None else term.quad,
              "log_ratio_clamp": float("inf") if term.log_ratio_clamp is None else term.log_ratio_clamp}  # fmt: skip
    flags = dict(kern.input_flags([name for name in kern.OPTIONAL_INPUTS if name in views]),
                 LOSS_KIND=kern.LOSS_KINDS[term.kind], SEQUENCE=bool(term.sequence),
                 BIAS_CORRECTION=bool(term.bias_correction), DUAL_CLIP=term.clip_c is not None,
                 CISPO_LOWER=term.ratio_min is not None, TRUST_REGION=TRUST_REGIONS[term.trust_region],
                 QUADRATIC=term.quad is not None)  # fmt: skip
    return KernelLaunch(
        inputs=tuple(v[0] for v in ordered), row_strides=tuple(v[1] for v in ordered),
        token_strides=tuple(v[2] for v in ordered), params=tuple(float(values[p]) for p in kern.PARAMS),
        flags=flags,
    )  # fmt: skip


class PolicyRowsFunction(torch.autograd.Function):
    """``(loss_sum [B], other stats [B, N_ROW_STATS - 1]) = rows(logp; launch)``: differentiable
    in ``logp`` through ``loss_sum`` only. Not twice differentiable (a clear error says so)."""

    @staticmethod
    def forward(ctx, logp, launch: KernelLaunch):
        kern = _grpo_kernels()
        B, T = logp.shape
        stats = torch.empty((B, kern.N_ROW_STATS), dtype=torch.float32, device=logp.device)
        block_t, num_warps = kern.pick_config(T)
        if B:
            kern.grpo_fwd_kernel[(B,)](launch.inputs, launch.row_strides, launch.token_strides, stats, T,
                                       launch.params, **launch.flags, BLOCK_T=block_t, num_warps=num_warps)  # fmt: skip
        ctx.save_for_backward(*launch.inputs)
        ctx.launch = launch._replace(inputs=None)
        loss_sum, other = stats[:, kern.STAT_LOSS_SUM.value].clone(), stats[:, 1:]
        ctx.mark_non_differentiable(other)  # counts and metric sums carry no gradient
        return loss_sum, other

    @staticmethod
    def backward(ctx, grad_loss_sum, _grad_other):
        if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph
            raise RuntimeError(
                "grpo_loss / ppo_loss with backend='triton' are differentiable once: double backward "
                "(create_graph=True) is not supported there; use backend='torch' for higher-order gradients"
            )
        kern = _grpo_kernels()
        tensors = ctx.saved_tensors
        launch = ctx.launch
        B, T = tensors[0].shape
        grad_rows = grad_loss_sum.contiguous().to(torch.float32)
        grad_logp = torch.empty((B, T), dtype=torch.float32, device=tensors[0].device)
        block_t, num_warps = kern.pick_config(T)
        if B and T:
            kern.grpo_bwd_kernel[(B,)](tuple(tensors), launch.row_strides, launch.token_strides, grad_rows, grad_logp,
                                       T, launch.params, **launch.flags, BLOCK_T=block_t,
                                       num_warps=num_warps)  # fmt: skip
        return grad_logp, None


def policy_rows_triton(inputs: TokenInputs, term: PolicyTerm) -> dict:
    """The rows of :func:`policy_rows_torch` from the fused kernels (not ``vespo``)."""
    if term.kind == "vespo":
        raise ValueError("the Triton policy kernels have no 'vespo' term (it runs in PyTorch)")
    maskf = inputs.valid.to(torch.float32)
    launch = _kernel_launch(inputs, maskf, term)
    loss_sum, other = PolicyRowsFunction.apply(inputs.logp, launch)
    cd = output_dtype(inputs.logp.dtype)
    kern = _grpo_kernels()
    rows = {name: other[:, i - 1].to(cd) for i, name in enumerate(kern.ROW_STATS) if i != kern.STAT_LOSS_SUM.value}
    rows["loss_sum"] = loss_sum.to(cd)
    return rows


def policy_rows(inputs: TokenInputs, term: PolicyTerm, backend: str, vespo_weights=None) -> dict:
    """Per-row sums from the resolved ``backend`` (``"triton"``, else PyTorch)."""
    if backend == "triton" and term.kind != "vespo":
        return policy_rows_triton(inputs, term)
    return policy_rows_torch(inputs, term, vespo_weights)
