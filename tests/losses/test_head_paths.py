"""``fused_linear_grpo_loss`` / ``fused_linear_ppo_loss``: the three-GEMM head (default where the
loss is token-separable) gives the four-GEMM path's loss, metrics and gradients at 1e-5; the
other configurations take the four-GEMM path; FLOPs counted."""
import pytest
import torch

import alignkernels
from alignkernels.flops import MatmulFlopCounter
from helpers import TRITON_DEVICE

B, T, H, V = 4, 6, 16, 203


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _problem(device, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 0.6
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T + (b if b is not None else 0.0), -1)
        logp = logp.gather(-1, ids[..., None]).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g)).masked_fill(~mask, 0.0)
    ref = (logp + 0.3 * torch.randn(B, T, generator=g)).masked_fill(~mask, 0.0)
    data = dict(hidden=hidden, weight=weight, bias=b, ids=ids, mask=mask, old=old, ref=ref,
                adv=torch.randn(B, generator=g), adv_tok=torch.randn(B, T, generator=g),
                values=torch.randn(B, T, generator=g), old_values=torch.randn(B, T, generator=g),
                returns=torch.randn(B, T, generator=g), is_ratio=torch.rand(B, T, generator=g) + 0.5)  # fmt: skip
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _grpo(d, head_path, backend, **kw):
    h, w, b = _leaf(d["hidden"]), _leaf(d["weight"]), _leaf(d["bias"])
    loss, metrics = alignkernels.fused_linear_grpo_loss(h, w, d["ids"], d["adv"], d["mask"], old_logp=d["old"],
                                                        ref_logp=d["ref"], bias=b, backend=backend,
                                                        head_path=head_path, chunk_size=5, **kw)  # fmt: skip
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return loss, metrics, grads


def _assert_paths_agree(a, b):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    assert set(metrics_a) == set(metrics_b)
    for key in metrics_a:
        if key != "head_path":
            torch.testing.assert_close(metrics_a[key], metrics_b[key], rtol=1e-5, atol=1e-7, equal_nan=True,
                                       msg=key)  # fmt: skip
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5 * gb.abs().max().item())


SEPARABLE = [
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="grpo", epsilon_high=0.28),
    dict(loss_type="bnpo", delta=1.5),
    dict(loss_type="dr_grpo", max_completion_length=T, beta=0.1, use_bias_correction_kl=False),
    dict(loss_type="cispo", epsilon_high=3.0),
    dict(loss_type="sapo"),
    dict(loss_type="luspo"),
    dict(loss_type="dapo", entropy_coef=0.05, num_items_in_batch=40, gradient_accumulation_steps=2),
    dict(loss_type="dapo", importance_sampling_ratio="is_ratio", softcap=4.0, temperature=0.7, bias=True),
]
SEPARABLE_IDS = ["dapo-kl", "grpo", "bnpo-delta", "dr_grpo", "cispo", "sapo", "luspo", "entropy-bonus",
                 "is-ratio-softcap-bias"]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs", SEPARABLE, ids=SEPARABLE_IDS)
def test_grpo_three_gemm_equals_four_gemm(backend, kwargs):
    kwargs = dict(kwargs)
    d = _problem(_device(backend), bias=kwargs.pop("bias", False))
    if kwargs.get("importance_sampling_ratio") == "is_ratio":
        kwargs["importance_sampling_ratio"] = d["is_ratio"]
    three = _grpo(d, "auto", backend, **kwargs)
    four = _grpo(d, "four_gemm", backend, **kwargs)
    assert three[1]["head_path"] == "three_gemm" and four[1]["head_path"] == "four_gemm"
    _assert_paths_agree(three, four)
    eager = _grpo(d, "auto", "reference", **kwargs)  # linear_logprobs' eager backend + autograd
    _assert_paths_agree(three, eager)


NON_SEPARABLE = [
    dict(importance_sampling_level="sequence"),
    dict(loss_type="vespo"),
    dict(top_entropy_quantile=0.5),
    dict(off_policy_mask_threshold=0.1),
]


@pytest.mark.parametrize("kwargs", NON_SEPARABLE, ids=["gspo", "vespo", "top-entropy", "off-policy-mask"])
def test_grpo_non_separable_takes_four_gemms(kwargs):
    d = _problem("cpu")
    loss, metrics, _ = _grpo(d, "auto", "torch", **kwargs)
    assert metrics["head_path"] == "four_gemm"
    with pytest.raises(ValueError, match="head_path='three_gemm' needs a token-separable loss"):
        _grpo(d, "three_gemm", "torch", **kwargs)


def test_bad_head_path():
    with pytest.raises(ValueError, match="head_path must be one of"):
        _grpo(_problem("cpu"), "five_gemm", "torch")


def _ppo(d, head_path, backend, **kw):
    h, w, values = _leaf(d["hidden"]), _leaf(d["weight"]), _leaf(d["values"])
    loss, metrics = alignkernels.fused_linear_ppo_loss(h, w, d["ids"], d["old"], d["adv_tok"], d["mask"], values,
                                                       d["old_values"], d["returns"], backend=backend,
                                                       head_path=head_path, chunk_size=4, **kw)  # fmt: skip
    return loss, metrics, torch.autograd.grad(loss, [h, w, values])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_three_gemm_equals_four_gemm(backend, mode):
    d = _problem(_device(backend), seed=1)
    kw = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01, loss_agg_mode=mode)
    three, four = _ppo(d, "auto", backend, **kw), _ppo(d, "four_gemm", backend, **kw)
    assert three[1]["head_path"] == "three_gemm"
    _assert_paths_agree(three, four)  # grads include the value head's


def _count(fn):
    with MatmulFlopCounter() as counter:
        fn()
    return counter.total


def test_grpo_flops_six_vs_eight_nhv():
    d = _problem("cpu", seed=2)
    n = int(d["mask"].sum())
    unit = 2 * n * H * V
    for path, expected in (("three_gemm", 3.0), ("four_gemm", 4.0)):
        flops = _count(lambda: _grpo(d, path, "torch", loss_type="dapo", beta=0.04))
        assert abs(flops / unit - expected) < 0.02, (path, flops / unit)


def test_ppo_flops_six_nhv():
    d = _problem("cpu", seed=3)
    unit = 2 * int(d["mask"].sum()) * H * V
    assert abs(_count(lambda: _ppo(d, "auto", "torch")) / unit - 3.0) < 0.02


def _finite_differences(loss_of, tensors, grads, eps=1e-6, every=5, tol=1e-7):
    for x, g in zip(tensors, grads):
        for i in range(0, x.numel(), every):
            with torch.no_grad():
                x.view(-1)[i] += eps
                up = loss_of()
                x.view(-1)[i] -= 2 * eps
                down = loss_of()
                x.view(-1)[i] += eps
            assert abs((up - down).item() / (2 * eps) - g.view(-1)[i].item()) < tol


def test_three_gemm_fp64_finite_differences():
    """The gradients formed in the forward pass, against central differences (fp64 torch backend)."""
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in _problem("cpu", seed=4).items()}  # fmt: skip
    h, w = d["hidden"].requires_grad_(), d["weight"].requires_grad_()
    cases = {
        "grpo": lambda: alignkernels.fused_linear_grpo_loss(h, w, d["ids"], d["adv"], d["mask"], old_logp=d["old"],
                                                            ref_logp=d["ref"], beta=0.1, loss_type="grpo",
                                                            entropy_coef=0.1, backend="torch", chunk_size=4)[0],
        "ppo": lambda: alignkernels.fused_linear_ppo_loss(h, w, d["ids"], d["old"], d["adv_tok"], d["mask"],
                                                          entropy_coef=0.1, backend="torch", chunk_size=4)[0],
    }  # fmt: skip
    for name, loss_of in cases.items():
        grads = torch.autograd.grad(loss_of(), [h, w])
        _finite_differences(loss_of, (h, w), grads)
