"""Σπ² on verl's fused head: ``FusedLinearForPPO(...)(..., return_sum_pi_squared=True)`` of
``alignkernels.integrations.verl`` against verl 0.9.1's logits-path computation
(``verl.utils.torch_functional.calculate_sum_pi_squared_from_logits`` on ``h·Wᵀ / T``, as the FSDP
engine's ``prepare_model_outputs`` calls it) and an fp64 eager Σ softmax². verl's own fused module has
no Σπ² (the engine refuses ``calculate_sum_pi_squared`` with ``use_fused_kernels``).
"""
from __future__ import annotations

import pytest
import torch

from helpers import max_rel_error

pytest.importorskip("verl")

import verl.utils.experimental.torch_functional as verl_exp  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402

import alignkernels.integrations.verl as ak_verl  # noqa: E402

TOL = 2e-6



def _inputs(shape, H=24, V=113, seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.rand(*shape, 1, generator=g) * 1.2  # flat rows (Σπ² ~ 1/V) to peaked ones (~1)
    hidden = (torch.randn(*shape, H, generator=g) * row_scale).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * scale).requires_grad_()
    ids = torch.randint(0, V, shape, generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", [(2, 9), (17,)])
def test_fused_sum_pi_squared_matches_verl_logits_path(temperature, shape):
    hidden, weight, ids = _inputs(shape)
    logits = (hidden.detach() @ weight.detach().T) / temperature
    stock = verl_F.calculate_sum_pi_squared_from_logits(logits)
    fp64 = torch.softmax((hidden.detach().double() @ weight.detach().double().T) / temperature, -1).pow(2).sum(-1)
    ak_verl.apply()
    head = verl_exp.FusedLinearForPPO(chunk_size=5)
    logp, entropy, spsq = head(hidden, weight, ids, temperature, return_sum_pi_squared=True)
    assert spsq.shape == ids.shape and spsq.dtype == torch.float32 and not spsq.requires_grad
    assert max_rel_error(spsq, fp64) <= TOL
    # verl's exp(lse(2z) - 2·lse(z)) in fp32 is itself up to ~3e-6 from fp64 here
    assert max_rel_error(spsq, stock) <= max_rel_error(stock, fp64) + TOL
    assert spsq.min() < 0.2 and spsq.max() > 0.5  # flat and peaked rows both present
    # the other two outputs and their gradients are those of the plain call
    logp0, entropy0 = head(hidden, weight, ids, temperature)
    assert torch.equal(logp, logp0) and torch.equal(entropy, entropy0)
    up = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    g1 = torch.autograd.grad(((logp + 0.3 * entropy) * up).sum(), [hidden, weight])
    g0 = torch.autograd.grad(((logp0 + 0.3 * entropy0) * up).sum(), [hidden, weight])
    for a, b in zip(g1, g0):
        assert max_rel_error(a, b) <= TOL


def test_fused_sum_pi_squared_flag_must_be_a_bool():
    hidden, weight, ids = _inputs((5,))
    ak_verl.apply()
    with pytest.raises(TypeError, match="return_sum_pi_squared must be a bool"):
        verl_exp.FusedLinearForPPO()(hidden, weight, ids, return_sum_pi_squared="yes")


def test_fused_head_answers_the_engine_request_with_two_outputs():
    """verl's model forward calls the head without a Σπ² argument and unpacks two outputs: inside the
    swapped engine's request scope (``alignkernels/integrations/verl_engine.py``) the head still returns
    two and leaves Σπ² for ``prepare_model_outputs``; outside it, nothing is left."""
    from alignkernels.integrations.verl_engine import SUM_PI_SQUARED

    hidden, weight, ids = _inputs((2, 7))
    ak_verl.apply()
    head = verl_exp.FusedLinearForPPO()
    want = head(hidden, weight, ids, 0.8, return_sum_pi_squared=True)
    with SUM_PI_SQUARED.scope(True):
        outputs = head(hidden, weight, ids, 0.8)
        assert len(outputs) == 2
        assert torch.equal(outputs[0], want[0]) and torch.equal(outputs[1], want[1])
        assert torch.equal(SUM_PI_SQUARED.take(), want[2])
    with SUM_PI_SQUARED.scope(False):
        head(hidden, weight, ids, 0.8)
        with pytest.raises(NotImplementedError, match="impl_backend='torch'"):
            SUM_PI_SQUARED.take()  # the engine's clear refusal when the fused forward left no Σπ²
