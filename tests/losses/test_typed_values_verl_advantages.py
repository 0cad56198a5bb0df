"""``verl_policy_loss(config=VerlPolicyConfig)`` and ``estimate_advantages(config=AdvantageConfig)`` read
"the typed value whole, or its fields as keywords" through ``validation.typed_value``, as ``grpo_loss``
does: whole = keywords bitwise; both at once, a value of another type, an unknown keyword -> a
``TypeError`` naming them."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.advantages import AdvantageConfig, estimate_advantages
from alignkernels.losses.grpo import PolicyConfig
from alignkernels.losses.verl_policy import VerlPolicyConfig, verl_policy_loss


def _policy_inputs(B=4, T=7):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    return logp, old, adv, mask


def _rollout(B=6, T=5):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, T, generator=g) > 0.2
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[:, -1] = torch.randn(B, generator=g, dtype=torch.float64)
    return rewards, mask.to(torch.float64), ["a", "b", "a", "b", "a", "b"]


def test_verl_config_whole_equals_keywords():
    logp, old, adv, mask = _policy_inputs()
    fields = dict(clip_ratio=0.15, clip_ratio_high=0.3, clip_ratio_c=2.5)
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    l1, m1 = verl_policy_loss(x1, old, adv, mask, config=VerlPolicyConfig(**fields))
    l2, m2 = verl_policy_loss(x2, old, adv, mask, **fields)
    assert torch.equal(l1, l2) and m1.keys() == m2.keys()
    assert torch.equal(torch.autograd.grad(l1, x1)[0], torch.autograd.grad(l2, x2)[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=VerlPolicyConfig(), clip_ratio=0.1), r"pass config= or its fields as keywords, not both: .*clip_ratio="),
    (dict(config={"clip_ratio": 0.1}), "config must be a VerlPolicyConfig, got dict"),
    (dict(config=PolicyConfig()), "config must be a VerlPolicyConfig, got PolicyConfig"),
    (dict(cliprange=0.2), r"verl_policy_loss\(\) got an unexpected keyword argument 'cliprange'"),
])  # fmt: skip
def test_verl_config_misuse_is_a_type_error_naming_it(kwargs, match):
    with pytest.raises(TypeError, match=match):
        verl_policy_loss(*_policy_inputs(), **kwargs)


def test_advantage_config_whole_equals_keywords():
    rewards, mask, uids = _rollout()
    a1, r1 = estimate_advantages(rewards, mask, uids, estimator="grpo", config=AdvantageConfig(epsilon=1e-3))
    a2, r2 = estimate_advantages(rewards, mask, uids, estimator="grpo", epsilon=1e-3)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=AdvantageConfig(), epsilon=0.1), r"pass config= or its fields as keywords, not both: .*epsilon="),
    (dict(config={"epsilon": 0.1}), "config must be a AdvantageConfig, got dict"),
    (dict(config=VerlPolicyConfig()), "config must be a AdvantageConfig, got VerlPolicyConfig"),
    (dict(eps=0.1), r"estimate_advantages\(\) got an unexpected keyword argument 'eps'"),
])  # fmt: skip
def test_advantage_config_misuse_is_a_type_error_naming_it(kwargs, match):
    rewards, mask, uids = _rollout()
    with pytest.raises(TypeError, match=match):
        estimate_advantages(rewards, mask, uids, estimator="grpo", **kwargs)
