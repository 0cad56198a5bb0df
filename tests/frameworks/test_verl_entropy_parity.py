"""GRPO's entropy bonus aggregated with the loss's own mode (``grpo_loss(entropy_aggregation="loss")``)
pinned against verl's form, ``entropy_loss = agg_loss(entropy, response_mask, loss_agg_mode)``
(``verl.trainer.ppo.core_algos.agg_loss``; the actor subtracts ``entropy_coeff * entropy_loss``), in
fp64: values and gradients. Skipped without verl."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.grpo import grpo_loss

F64 = dict(rtol=1e-12, atol=1e-14)
B, T, MCL, NUM_ITEMS = 6, 9, 12, 70
# loss_type -> verl's loss_agg_mode and the agg_loss arguments that give the loss type's normaliser
VERL_FORMS = {
    "grpo": ("seq-mean-token-mean", {}),
    "bnpo": ("token-mean", {}),
    "luspo": ("seq-mean-token-sum", {}),
    "dr_grpo": ("seq-mean-token-sum-norm", {"loss_scale_factor": MCL}),
    "dapo": ("token-mean", {"batch_num_tokens": NUM_ITEMS}),
    "cispo": ("token-mean", {"batch_num_tokens": NUM_ITEMS}),
}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True  # no fully masked row: TRL's aggregation counts one, verl >= 0.7 drops it
    mask[2, 3:] = False
    return logp, old, adv, entropy, mask


@pytest.mark.parametrize("loss_type", list(VERL_FORMS))
def test_entropy_bonus_in_the_loss_mode_matches_verl_agg_loss(verl_core, loss_type):
    mode, agg_kwargs = VERL_FORMS[loss_type]
    logp, old, adv, entropy, mask = _batch()
    coef = 0.3
    options = dict(loss_type=loss_type, max_completion_length=MCL, backend="torch")
    if agg_kwargs.get("batch_num_tokens"):
        options["num_items_in_batch"] = NUM_ITEMS

    x, e = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    with_bonus, _ = grpo_loss(x, old, None, adv, mask, entropy=e, entropy_coef=coef, entropy_aggregation="loss",
                              **options)  # fmt: skip
    g_logp, g_ent = torch.autograd.grad(with_bonus, (x, e))
    y = logp.clone().requires_grad_(True)
    without, _ = grpo_loss(y, old, None, adv, mask, entropy=entropy, **options)
    (g_logp_without,) = torch.autograd.grad(without, (y,))

    theirs_in = entropy.clone().requires_grad_(True)
    theirs = verl_core.agg_loss(theirs_in, mask.to(torch.float64), mode, **agg_kwargs)
    (g_theirs,) = torch.autograd.grad(theirs, (theirs_in,))
    tol = dict(rtol=1e-7, atol=1e-12) if mode == "seq-mean-token-mean" else F64  # verl: / (count + 1e-8)
    torch.testing.assert_close(with_bonus - without, -coef * theirs.detach(), **tol)
    torch.testing.assert_close(g_ent, -coef * g_theirs, **tol)
    torch.testing.assert_close(g_logp, g_logp_without, **F64)
