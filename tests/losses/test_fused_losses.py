"""Fused-from-hidden-states losses == (materialised logits -> eager log-softmax -> our loss).

The per-token losses themselves are pinned against TRL in test_dpo / test_grpo / test_ppo; here
we prove that going through ``linear_logprobs`` (no [N, V] logits, masked rows skipped) changes
nothing: loss, metrics and gradients w.r.t. hidden states and lm_head weight.
"""
import pytest
import torch

import alignkernels
from alignkernels.losses.dpo import dpo_loss_from_token_logps
from alignkernels.reference import token_logprobs_reference, transform_logits
from helpers import TRITON_DEVICE

BACKENDS = ["torch", "triton"]
B, T, H, V = 4, 7, 24, 301


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _inputs(device, n_seq=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n_seq, T, H, generator=g) * 0.5).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(device)
    ids = torch.randint(0, V, (n_seq, T), generator=g).to(device)
    mask = torch.rand(n_seq, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # one fully masked completion
    return hidden, weight, ids, mask.to(device), g


def _eager_token_stats(hidden, weight, labels, *, temperature=1.0, softcap=None):
    logits = transform_logits(hidden.double() @ weight.double().T, softcap=softcap, temperature=temperature)
    logp, ent = token_logprobs_reference(logits, labels, return_entropy=True)
    return logp.float(), ent.float(), logits


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_same(loss, metrics, loss_r, metrics_r, grads, grads_r):
    torch.testing.assert_close(loss.float(), loss_r.float(), rtol=2e-5, atol=1e-6)
    for key, value in metrics_r.items():
        torch.testing.assert_close(torch.as_tensor(metrics[key]).float(), torch.as_tensor(value).float(),
                                   rtol=2e-5, atol=1e-6, msg=f"metric {key}")  # fmt: skip
    for g, g_r in zip(grads, grads_r):
        scale = g_r.abs().max().item() or 1.0
        torch.testing.assert_close(g, g_r, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="dapo", beta=0.04),
        dict(loss_type="grpo", beta=0.0),
        dict(loss_type="dr_grpo", max_completion_length=T, beta=0.1),
        dict(loss_type="bnpo", epsilon_high=0.28),
        dict(loss_type="dapo", importance_sampling_level="sequence"),
        dict(loss_type="cispo", epsilon_high=5.0),
        dict(loss_type="sapo"),
        dict(loss_type="dapo", delta=1.5, temperature=0.8),
    ],
    ids=["dapo-kl", "grpo", "dr_grpo", "bnpo", "gspo", "cispo", "sapo", "delta-temp"],
)
def test_fused_grpo_matches_eager(backend, kwargs):
    kwargs = dict(kwargs)
    temperature = kwargs.pop("temperature", 1.0)
    device = _device(backend)
    hidden, weight, ids, mask, g = _inputs(device)
    ref_hidden = hidden + 0.05 * torch.randn(hidden.shape, generator=g).to(device)
    advantages = torch.randn(B, generator=g).to(device)
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        base, _, _ = _eager_token_stats(hidden, weight, labels, temperature=temperature)
    old_logp = (base + 0.1 * torch.randn(base.shape, generator=g).to(device)).masked_fill(~mask, 0.0)

    h, w = _leaves(hidden, weight)
    loss, metrics = alignkernels.fused_linear_grpo_loss(
        h, w, ids, advantages, mask, old_logp=old_logp, ref_hidden=ref_hidden, temperature=temperature,
        backend=backend, **kwargs,
    )  # fmt: skip
    loss.backward()

    h_r, w_r = _leaves(hidden, weight)
    logp_r, ent_r, _ = _eager_token_stats(h_r, w_r, labels, temperature=temperature)
    with torch.no_grad():
        ref_logp, _, _ = _eager_token_stats(ref_hidden, weight, labels, temperature=temperature)
    loss_r, metrics_r = alignkernels.grpo_loss(logp_r, old_logp, ref_logp, advantages, mask, entropy=ent_r, **kwargs)
    loss_r.backward()
    _assert_same(loss, metrics, loss_r, metrics_r, (h.grad, w.grad), (h_r.grad, w_r.grad))
    assert torch.all(h.grad[-1] == 0), "a fully masked completion must get no gradient"


def _dpo_eager(hidden, weight, labels, ref_hidden, **kwargs):
    n = labels.shape[0] // 2
    logp, ent, logits = _eager_token_stats(hidden, weight, labels)
    with torch.no_grad():
        ref, _, _ = _eager_token_stats(ref_hidden, weight, labels)
        z = logits.detach()
        log_sum_sq = (2 * torch.log_softmax(z, -1)).logsumexp(-1).float()
        mean_logit = z.mean(-1).float()
        is_top1 = z.argmax(-1) == labels
    mask = labels != -100
    return dpo_loss_from_token_logps(
        logp[:n], logp[n:], ref[:n], ref[n:], mask[:n], mask[n:],
        chosen_log_sum_sq_probs=log_sum_sq[:n], rejected_log_sum_sq_probs=log_sum_sq[n:],
        chosen_entropy=ent[:n], rejected_entropy=ent[n:], chosen_mean_logits=mean_logit[:n],
        rejected_mean_logits=mean_logit[n:], chosen_is_top1=is_top1[:n], **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="sigmoid", beta=0.1),
        dict(loss_type="ipo", beta=0.5),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        dict(loss_type="apo_zero", ld_alpha=0.5),
        dict(loss_type="sigmoid", use_weighting=True, label_smoothing=0.1),
    ],
    ids=["sigmoid", "ipo", "rpo", "apo-ld", "wpo"],
)
def test_fused_dpo_matches_eager(backend, kwargs):
    device = _device(backend)
    hidden, weight, ids, mask, g = _inputs(device, n_seq=2 * B)
    mask[-1] = True  # keep every rejected completion non-empty for ipo
    labels = ids.masked_fill(~mask, -100)
    ref_hidden = hidden + 0.05 * torch.randn(hidden.shape, generator=g).to(device)

    h, w = _leaves(hidden, weight)
    loss, metrics = alignkernels.fused_linear_dpo_loss(h, w, labels, ref_hidden=ref_hidden, backend=backend, **kwargs)
    loss.backward()
    h_r, w_r = _leaves(hidden, weight)
    loss_r, metrics_r = _dpo_eager(h_r, w_r, labels, ref_hidden, **kwargs)
    loss_r.backward()
    assert {"rewards/chosen", "rewards/margins", "logits/chosen", "mean_token_accuracy"} <= set(metrics)
    _assert_same(loss, metrics, loss_r, metrics_r, (h.grad, w.grad), (h_r.grad, w_r.grad))


def test_fused_dpo_precomputed_reference_sums():
    hidden, weight, ids, mask, g = _inputs("cpu", n_seq=2 * B)
    labels = ids.masked_fill(~mask, -100)
    ref_c, ref_r = -torch.rand(B, generator=g) * 20, -torch.rand(B, generator=g) * 20
    loss, metrics = alignkernels.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref_c,
                                                       ref_rejected_logps=ref_r, beta=0.2)  # fmt: skip
    logp, _, _ = _eager_token_stats(hidden, weight, labels)
    seq = logp.sum(-1)
    loss_r, _ = alignkernels.dpo_loss(seq[:B], seq[B:], ref_c, ref_r, beta=0.2)
    torch.testing.assert_close(loss, loss_r, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ppo_matches_eager(backend):
    device = _device(backend)
    hidden, weight, ids, mask, g = _inputs(device)
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        base, _, _ = _eager_token_stats(hidden, weight, labels)
    old_logp = (base + 0.1 * torch.randn(base.shape, generator=g).to(device)).masked_fill(~mask, 0.0)
    advantages = torch.randn(B, T, generator=g).to(device)
    values = torch.randn(B, T, generator=g).to(device).requires_grad_()
    old_values, returns = torch.randn(B, T, generator=g).to(device), torch.randn(B, T, generator=g).to(device)
    kwargs = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)

    h, w = _leaves(hidden, weight)
    loss, metrics = alignkernels.fused_linear_ppo_loss(h, w, ids, old_logp, advantages, mask, values, old_values,
                                                       returns, backend=backend, **kwargs)  # fmt: skip
    loss.backward()
    h_r, w_r = _leaves(hidden, weight)
    logp_r, ent_r, _ = _eager_token_stats(h_r, w_r, labels)
    loss_r, metrics_r = alignkernels.ppo_loss(logp_r, old_logp, advantages, mask, values, old_values, returns,
                                              entropy=ent_r, **kwargs)  # fmt: skip
    loss_r.backward()
    _assert_same(loss, metrics, loss_r, metrics_r, (h.grad, w.grad), (h_r.grad, w_r.grad))


def test_fused_losses_bad_input():
    hidden, weight, ids, mask, _ = _inputs("cpu")
    with pytest.raises(ValueError, match="mask must have the shape"):
        alignkernels.fused_linear_grpo_loss(hidden, weight, ids, torch.zeros(B), mask[:, :-1])
    with pytest.raises(ValueError, match=r"labels must be \[2B, T\]"):
        alignkernels.fused_linear_dpo_loss(hidden[:3], weight, ids[:3], ref_hidden=hidden[:3])
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        alignkernels.fused_linear_dpo_loss(hidden, weight, ids)
    with pytest.raises(ValueError, match="loss_type"):
        alignkernels.fused_linear_grpo_loss(hidden, weight, ids, torch.zeros(B), mask, loss_type="nope")


# ---------------------------------------------------------------------------------------------
# Against Liger-Kernel's chunked losses (when installed), for the loss types both support.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_fused_grpo_matches_liger(loss_type):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, ids, mask, g = _inputs("cpu")
    mask[-1, 0] = True  # Liger normalises per sequence without guarding empty rows
    advantages = torch.randn(B, generator=g)
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        base, _, _ = _eager_token_stats(hidden, weight, labels)
    old_logp = (base + 0.1 * torch.randn(base.shape, generator=g)).masked_fill(~mask, 0.0)
    ref_logp = (base + 0.1 * torch.randn(base.shape, generator=g)).masked_fill(~mask, 0.0)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T)

    h, w = _leaves(hidden, weight)
    loss, _ = alignkernels.fused_linear_grpo_loss(h, w, ids, advantages, mask, old_logp=old_logp, ref_logp=ref_logp,
                                                  **kw)  # fmt: skip
    loss.backward()
    liger = chunked.LigerFusedLinearGRPOLoss(compiled=False, **kw)
    h_l, w_l = _leaves(hidden, weight)
    out = liger(h_l, w_l, ids, mask.long(), advantages, ref_per_token_logps=ref_logp, old_per_token_logps=old_logp)
    loss_l = out[0] if isinstance(out, tuple) else out
    loss_l.backward()
    torch.testing.assert_close(loss, loss_l, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h.grad, h_l.grad, rtol=1e-3, atol=1e-5 * h_l.grad.abs().max().item())
    torch.testing.assert_close(w.grad, w_l.grad, rtol=1e-3, atol=1e-5 * w_l.grad.abs().max().item())
