"""GRPO's entropy bonus, ``grpo_loss(entropy_coef=c, entropy_aggregation=...)``: ``"trl"`` (the
default, TRL's token mean over the kept tokens / GA, pinned against TRL in
``tests/losses/test_grpo.py``) or ``"loss"`` (the loss type's own aggregation and normaliser, verl's
``agg_loss(entropy, mask, loss_agg_mode)``; pinned against verl in
``tests/frameworks/test_verl_entropy_parity.py``). Here: the ``"loss"`` form against fp64 formulas
written from each row's aggregation, its three-GEMM head against the four-GEMM one, and the
option's validation."""
import pytest
import torch

from alignkernels.losses.fused import fused_linear_grpo_loss
from alignkernels.losses.grpo import ENTROPY_AGGREGATIONS, grpo_loss

B, T, MCL, GA = 5, 7, 10, 2


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    entropy = torch.rand(B, T, generator=g, dtype=dtype) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a fully masked row
    mask[0, 0] = True
    return logp, old, adv, entropy, mask


def _expected(loss_type, entropy, mask):
    """The row's aggregation of the entropy, from the formulas (TRL's classic denominators: every
    row counts), divided by GA as the policy loss is (num_items: GA inside the normaliser)."""
    m = mask.to(entropy.dtype)
    sums, count = (entropy * m).sum(-1), m.sum(-1)
    return {
        "grpo": (sums / count.clamp(min=1)).sum() / B / GA,
        "sapo": (sums / count.clamp(min=1)).sum() / B / GA,
        "bnpo": sums.sum() / count.sum() / GA,
        "luspo": sums.sum() / B / GA,
        "dr_grpo": sums.sum() / (B * MCL) / GA,
        "dapo": sums.sum() / (count.sum() * GA / GA),  # num_items = the batch's tokens; GA / steps_per_generation
        "cispo": sums.sum() / count.sum(),
    }[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_entropy_bonus_in_the_loss_mode_is_the_rows_aggregation(loss_type):
    logp, old, adv, entropy, mask = _batch()
    coef = 0.25
    options = dict(loss_type=loss_type, max_completion_length=MCL, gradient_accumulation_steps=GA, backend="torch")
    e = entropy.clone().requires_grad_(True)
    with_bonus, metrics = grpo_loss(logp, old, None, adv, mask, entropy=e, entropy_coef=coef,
                                    entropy_aggregation="loss", **options)  # fmt: skip
    without, _ = grpo_loss(logp, old, None, adv, mask, entropy=entropy, **options)
    (g_ent,) = torch.autograd.grad(with_bonus, (e,))
    f = entropy.clone().requires_grad_(True)
    expected = _expected(loss_type, f, mask)
    (g_expected,) = torch.autograd.grad(expected, (f,))
    torch.testing.assert_close(with_bonus - without, -coef * expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_ent, -coef * g_expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(g_ent[1], torch.zeros(T, dtype=torch.float64))  # the fully masked row
    assert torch.isfinite(with_bonus) and "policy_loss" in metrics


def test_the_default_is_trls_token_mean_and_the_modes_differ_where_trl_differs():
    logp, old, adv, entropy, mask = _batch(seed=1)
    common = dict(entropy=entropy, entropy_coef=0.5, loss_type="grpo", backend="torch")
    default, _ = grpo_loss(logp, old, None, adv, mask, **common)
    trl, _ = grpo_loss(logp, old, None, adv, mask, entropy_aggregation="trl", **common)
    loss_mode, _ = grpo_loss(logp, old, None, adv, mask, entropy_aggregation="loss", **common)
    assert torch.equal(default, trl)
    assert not torch.allclose(default, loss_mode)  # seq-mean-token-mean != token mean on ragged rows
    dapo = dict(common, loss_type="dapo")
    torch.testing.assert_close(grpo_loss(logp, old, None, adv, mask, **dapo)[0],
                               grpo_loss(logp, old, None, adv, mask, entropy_aggregation="loss", **dapo)[0],
                               rtol=1e-14, atol=0)  # token-mean over the batch's own tokens: the same  # fmt: skip


@pytest.mark.parametrize("bad, error", [("verl", ValueError), (None, ValueError), ("", ValueError)])
def test_unknown_entropy_aggregation_is_named(bad, error):
    logp, old, adv, entropy, mask = _batch()
    with pytest.raises(error, match="entropy_aggregation must be one of " + ", ".join(ENTROPY_AGGREGATIONS)):
        grpo_loss(logp, old, None, adv, mask, entropy=entropy, entropy_aggregation=bad)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_entropy_bonus_in_the_loss_mode_runs_on_the_three_gemm_head(loss_type):
    """Every aggregation is token-separable, so the three-GEMM head forms the exact gradient."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, 40, (B, T), generator=g)
    _, _, adv, _, mask = _batch()
    results = {}
    for path in ("three_gemm", "four_gemm"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, metrics = fused_linear_grpo_loss(h, w, ids, adv, mask, loss_type=loss_type, max_completion_length=MCL,
                                               entropy_coef=0.4, entropy_aggregation="loss", backend="torch",
                                               head_path=path)  # fmt: skip
        assert metrics["head_path"] == path
        results[path] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    for a, b in zip(results["three_gemm"], results["four_gemm"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
