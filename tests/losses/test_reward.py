"""bradley_terry_loss against the installed TRL's own ``RewardTrainer.compute_loss``.

TRL's method is called unbound with a stand-in ``self`` (the config fields it reads) and a
stand-in model whose ``logits`` are our reward tensor (a leaf), so values, logged metrics and
gradients come from TRL's code itself.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import alignkernels
from alignkernels.losses.reward import BradleyTerryLoss, bradley_terry_loss

trl_reward = pytest.importorskip("trl.trainer.reward_trainer")

RTOL, ATOL = 1e-5, 1e-6
TRL_METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


def trl_reward_loss(logits, margin=None, center_rewards_coefficient=None):
    """TRL ``RewardTrainer.compute_loss`` on ``logits`` = [2B, K] rewards ([chosen; rejected])."""
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    n = logits.shape[0]
    inputs = {"input_ids": torch.zeros(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = trl_reward.RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _rewards(B, K=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * B, K, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01, 0.5])
@pytest.mark.parametrize("B", [1, 7])
def test_single_head_vs_trl(B, center, with_margin):
    logits = _rewards(B, seed=B)
    margin = torch.rand(B, generator=torch.Generator().manual_seed(1)) if with_margin else None
    x_trl, x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_trl, m_trl = trl_reward_loss(x_trl, margin, center)
    # our call: [B] rewards (also [B, 1] below)
    loss, m = bradley_terry_loss(x[:B, 0], x[B:, 0], margin=margin, center_rewards_coefficient=center)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_trl, rtol=RTOL, atol=ATOL)
    for name in TRL_METRICS:
        assert math.isclose(m[name].item(), m_trl[name], rel_tol=RTOL, abs_tol=ATOL), name
    loss.backward()
    loss_trl.backward()
    torch.testing.assert_close(x.grad, x_trl.grad, rtol=RTOL, atol=ATOL)
    loss_2d, _ = bradley_terry_loss(logits[:B], logits[B:], margin=margin, center_rewards_coefficient=center)
    torch.testing.assert_close(loss_2d, loss.detach())


@pytest.mark.parametrize("center", [None, 0.1])
def test_multi_head_mean_equals_trl_on_k_outputs(center):
    """K heads, no margin: TRL with a K-output score layer computes the mean over all B·K
    elements, which is our mean over per-head losses."""
    B, K = 5, 3
    logits = _rewards(B, K, seed=3)
    x_trl, x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_trl, m_trl = trl_reward_loss(x_trl, None, center)
    loss, m = bradley_terry_loss(x[:B], x[B:], center_rewards_coefficient=center)
    torch.testing.assert_close(loss, loss_trl, rtol=RTOL, atol=ATOL)
    for name in TRL_METRICS:
        assert math.isclose(m[name].item(), m_trl[name], rel_tol=RTOL, abs_tol=ATOL), name
    loss.backward()
    loss_trl.backward()
    torch.testing.assert_close(x.grad, x_trl.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("margin_shape", ["B", "BK"])
def test_multi_head_per_head_vs_trl_each_head(margin_shape):
    """Per-head losses and metrics = TRL run on that head's column alone (with its margin)."""
    B, K = 6, 4
    logits = _rewards(B, K, seed=4)
    g = torch.Generator().manual_seed(5)
    margin = torch.rand(B, generator=g) if margin_shape == "B" else torch.rand(B, K, generator=g)
    x = logits.clone().requires_grad_()
    per_head, m = bradley_terry_loss(x[:B], x[B:], margin=margin, center_rewards_coefficient=0.05, reduction="none")
    assert per_head.shape == (K,)
    for k in range(K):
        head_margin = margin if margin.dim() == 1 else margin[:, k]
        loss_k, m_k = trl_reward_loss(logits[:, k : k + 1], head_margin, 0.05)
        torch.testing.assert_close(per_head[k], loss_k, rtol=RTOL, atol=ATOL)
        assert math.isclose(m[f"accuracy/head_{k}"].item(), m_k["accuracy"], rel_tol=RTOL)
        assert math.isclose(m[f"margin/head_{k}"].item(), m_k["margin"], rel_tol=RTOL, abs_tol=ATOL)
        torch.testing.assert_close(m[f"loss/head_{k}"], loss_k, rtol=RTOL, atol=ATOL)
    mean_loss, _ = bradley_terry_loss(logits[:B], logits[B:], margin=margin, center_rewards_coefficient=0.05)
    torch.testing.assert_close(mean_loss, per_head.detach().mean())
    # gradient of the mean loss = mean of TRL's per-head gradients
    x2 = logits.clone().requires_grad_()
    bradley_terry_loss(x2[:B], x2[B:], margin=margin, center_rewards_coefficient=0.05)[0].backward()
    expected = torch.zeros_like(logits)
    for k in range(K):
        col = logits[:, k : k + 1].clone().requires_grad_()
        head_margin = margin if margin.dim() == 1 else margin[:, k]
        trl_reward_loss(col, head_margin, 0.05)[0].backward()
        expected[:, k] = col.grad[:, 0] / K
    torch.testing.assert_close(x2.grad, expected, rtol=RTOL, atol=ATOL)


def test_closed_form_independent_of_trl():
    c = torch.tensor([2.0, -1.0], requires_grad=True)
    r = torch.tensor([0.5, 0.0], requires_grad=True)
    loss, m = bradley_terry_loss(c, r, margin=0.25)
    expected = (math.log1p(math.exp(-(1.5 - 0.25))) + math.log1p(math.exp(-(-1.0 - 0.25)))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert m["accuracy"].item() == 0.5 and math.isclose(m["margin"].item(), 0.25, rel_tol=1e-6)
    assert m["min_reward"].item() == -1.0 and m["max_reward"].item() == 2.0
    loss.backward()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert math.isclose(c.grad[0].item(), -sig(-1.25) / 2, rel_tol=1e-5)
    torch.testing.assert_close(r.grad, -c.grad)


def test_bf16_rewards():
    """bf16 rewards are upcast: same as TRL's fp32 math on the bf16 values to fp32 precision;
    gradients come back in bf16 (relative rounding 2^-8)."""
    B = 8
    logits = _rewards(B, seed=6, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    loss, _ = bradley_terry_loss(x[:B], x[B:], center_rewards_coefficient=0.01)
    x_trl = logits.float().requires_grad_()
    loss_trl, _ = trl_reward_loss(x_trl, None, 0.01)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_trl, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_trl.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), x_trl.grad, rtol=4e-3, atol=1e-6)


def test_module_and_export():
    c, r = torch.randn(4, 2), torch.randn(4, 2)
    module = alignkernels.BradleyTerryLoss(center_rewards_coefficient=0.1)
    assert isinstance(module, torch.nn.Module) and BradleyTerryLoss is alignkernels.BradleyTerryLoss
    a, _ = module(c, r, margin=torch.ones(4))
    b, _ = alignkernels.bradley_terry_loss(c, r, margin=torch.ones(4), center_rewards_coefficient=0.1)
    assert torch.equal(a, b)


def test_large_gaps_stay_finite():
    c = torch.tensor([1e4, -1e4], requires_grad=True)
    r = torch.tensor([-1e4, 1e4])
    loss, _ = bradley_terry_loss(c, r)
    assert torch.isfinite(loss)
    assert math.isclose(loss.item(), 2e4 / 2, rel_tol=1e-6)  # -logσ(-2e4) = 2e4
    loss.backward()
    assert torch.isfinite(c.grad).all()


def test_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[B\] or \[B, K\]"):
        bradley_terry_loss(torch.zeros(3, 2, 1), torch.zeros(3, 2, 1))
    with pytest.raises(TypeError, match="chosen_rewards"):
        bradley_terry_loss(torch.zeros(3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(x, x, margin=torch.zeros(5))
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(x, x, reduction="sum")
    with pytest.raises(ValueError, match="B >= 1"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
