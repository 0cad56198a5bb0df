"""``fused_linear_verl_policy_loss`` with ``entropy_coeff != 0``: the head's own entropy is the
entropy bonus of ``verl_policy_loss(entropy=, entropy_coeff=)``, on the three-GEMM head (token-separable
rows) and on four GEMMs, pinned against the unfused fp64 oracle (full logits, log-softmax, entropy,
then ``verl_policy_loss``): loss, metrics, gradients w.r.t. hidden and weight."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.fused import fused_linear_verl_policy_loss
from alignkernels.losses.verl_policy import VerlPolicyConfig, verl_policy_loss


def _problem(seed=0, B=4, T=6, H=16, V=67):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.6
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # a fully masked row
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).masked_fill(~mask, 0.0)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return hidden, weight, ids, mask, old, adv


def _oracle(hidden, weight, ids, mask, old, adv, **kw):
    """Unfused fp64: full logits, the sampled tokens' log-probs and the entropy, then the loss."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = h @ w.T
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    loss, metrics = verl_policy_loss(logp, old, adv, mask, entropy=entropy, backend="torch", **kw)
    return loss, metrics, torch.autograd.grad(loss, (h, w))


def _fused(hidden, weight, ids, mask, old, adv, **kw):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = fused_linear_verl_policy_loss(h, w, ids, old, adv, mask, chunk_size=5, **kw)
    return loss, metrics, torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("mode, path", [("vanilla", "three_gemm"), ("cispo", "three_gemm"), ("vanilla", "four_gemm"),
                                        ("gspo", "four_gemm")])  # fmt: skip
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("as_config", [False, True])
def test_fused_entropy_bonus_matches_the_unfused_fp64_oracle(mode, path, agg, as_config):
    hidden, weight, ids, mask, old, adv = _problem()
    options = dict(clip_ratio_high=0.28, entropy_coeff=0.05)
    kw = dict(loss_mode=mode, loss_agg_mode=agg)
    kw.update(config=VerlPolicyConfig(**options)) if as_config else kw.update(options)
    e_loss, e_metrics, e_grads = _oracle(hidden, weight, ids, mask, old, adv, **kw)
    loss, metrics, grads = _fused(hidden, weight, ids, mask, old, adv, head_path="auto" if path == "three_gemm"
                                  else path, **kw)  # fmt: skip
    assert metrics.pop("head_path") == path
    assert set(metrics) == set(e_metrics) and "actor/entropy_loss" in metrics
    torch.testing.assert_close(loss, e_loss, rtol=1e-10, atol=1e-12)
    for name in metrics:
        torch.testing.assert_close(metrics[name], e_metrics[name], rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    # the bonus is not a no-op: without it the loss and gradients differ
    n_loss, _, n_grads = _oracle(hidden, weight, ids, mask, old, adv, loss_mode=mode, loss_agg_mode=agg,
                                 clip_ratio_high=0.28)  # fmt: skip
    assert (loss - n_loss).abs() > 1e-4 and (grads[1] - n_grads[1]).abs().max() > 1e-5


def test_fused_entropy_bonus_on_triton_matches_fp64(triton_device):
    hidden, weight, ids, mask, old, adv = _problem(1)
    kw = dict(loss_mode="vanilla", entropy_coeff=0.05)
    e_loss, e_metrics, e_grads = _oracle(hidden, weight, ids, mask, old, adv, **kw)
    f32 = [t.to(triton_device, torch.float32) if t.is_floating_point() else t.to(triton_device)
           for t in (hidden, weight, ids, mask, old, adv)]  # fmt: skip
    loss, metrics, grads = _fused(*f32, backend="triton", **kw)
    assert metrics["head_path"] == "three_gemm"
    torch.testing.assert_close(loss.double().cpu(), e_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["actor/entropy_loss"].double().cpu(), e_metrics["actor/entropy_loss"],
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g.double().cpu(), e, rtol=1e-5, atol=1e-6)


def test_fused_verl_refuses_entropy_and_names_a_bad_coefficient():
    hidden, weight, ids, mask, old, adv = _problem()
    with pytest.raises(ValueError, match="entropy: fused_linear_verl_policy_loss computes"):
        _fused(hidden, weight, ids, mask, old, adv, entropy=torch.zeros_like(old))
    with pytest.raises(TypeError, match="entropy_coeff"):
        _fused(hidden, weight, ids, mask, old, adv, entropy_coeff="0.1")
