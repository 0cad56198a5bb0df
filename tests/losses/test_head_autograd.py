"""The three-GEMM head (``alignkernels.ops.three_gemm``: ``fused_linear_cross_entropy`` and the default
path of ``fused_linear_grpo_loss`` / ``fused_linear_ppo_loss``) under every autograd mode, and one
validation for both head paths.

* ``create_graph=True``: the project's one double-backward error (the formed gradients are constants:
  a gradient penalty on them would silently be 0).
* ``torch.no_grad()`` / ``torch.inference_mode()``: the forward only -- 2·n·H·V matmul FLOPs, counted,
  and no ``[V, H]`` gradient buffer; GRPO/PPO run there.
* a second backward over one forward (``retain_graph=True``, one ``autograd.grad`` per input): the
  head runs again and gives the same gradients, bit for bit.
* bad inputs are named the same way whichever head path (three or four GEMMs) the loss takes.
"""
import pytest
import torch

import alignkernels as ak
from alignkernels.flops import MatmulFlopCounter
from helpers import TRITON_DEVICE, NewBuffers

B, T, H, V = 3, 6, 32, 97
OPS = ["fused_linear_cross_entropy", "fused_linear_grpo_loss", "fused_linear_ppo_loss"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _data(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1, 2:] = False
    d = dict(hidden=torch.randn(B, T, H, generator=g) * 0.6, weight=torch.randn(V, H, generator=g) * 0.5,
             ids=torch.randint(0, V, (B, T), generator=g), mask=mask, old=-torch.rand(B, T, generator=g) * 3 - 1,
             adv=torch.randn(B, generator=g), values=torch.randn(B, T, generator=g))  # fmt: skip
    return {k: v.to(device) for k, v in d.items()}


def _loss(op, d, h, w, backend="torch", **kw):
    """The op's loss on the three-GEMM head (its default path for these configurations)."""
    if op == "fused_linear_cross_entropy":
        return ak.fused_linear_cross_entropy(h, w, d["ids"].masked_fill(~d["mask"], -100), backend=backend, **kw)
    if op == "fused_linear_grpo_loss":
        loss, metrics = ak.fused_linear_grpo_loss(h, w, d["ids"], d["adv"], d["mask"], old_logp=d["old"], beta=0.0,
                                                  entropy_coef=0.01, backend=backend, **kw)  # fmt: skip
    else:
        loss, metrics = ak.fused_linear_ppo_loss(h, w, d["ids"], d["old"], d["adv"], d["mask"], backend=backend, **kw)
    assert metrics["head_path"] == "three_gemm"
    return loss


def _leaves(d):
    return d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# (a) double backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_create_graph_is_the_one_double_backward_error(op, backend):
    d = _data(_device(backend))
    h, w = _leaves(d)
    with pytest.raises(RuntimeError, match=rf"{op}: double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(_loss(op, d, h, w, backend), [h, w], create_graph=True)


# ---------------------------------------------------------------------------------------------
# (b), (c) no_grad / inference_mode: the forward only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("op", OPS)
def test_without_grad_the_head_costs_the_forward_only(op, mode):
    """2·n·H·V matmul FLOPs for the n valid rows and no buffer of V·H elements; the loss is the one
    the head gives with grad. (With grad the same counters see 6·n·H·V and the [V, H] buffer.)"""
    d = _data()
    h, w = _leaves(d)
    n = int(d["mask"].sum())
    with MatmulFlopCounter() as flops, NewBuffers() as buffers:
        with_grad = _loss(op, d, h, w)
    assert flops.total == 3 * 2 * n * H * V and max(buffers.sizes) >= V * H  # the counters can fail
    with getattr(torch, mode)():
        with MatmulFlopCounter() as flops, NewBuffers() as buffers:
            loss = _loss(op, d, h, w)
    assert flops.total == 2 * n * H * V, flops.by_op
    assert max(buffers.sizes) < V * H
    assert not loss.requires_grad
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-6, atol=1e-7)


def test_without_grad_triton_forward_only():
    d = _data(TRITON_DEVICE)
    h, w = _leaves(d)
    n = int(d["mask"].sum())
    with torch.inference_mode(), MatmulFlopCounter() as flops:
        loss = _loss("fused_linear_grpo_loss", d, h, w, "triton")
    assert flops.total == 2 * n * H * V and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# (d) a second backward over one forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_second_backward_recomputes_the_same_gradients(op, backend):
    d = _data(_device(backend))
    h, w = _leaves(d)
    both = torch.autograd.grad(_loss(op, d, h, w, backend), [h, w])
    loss = _loss(op, d, h, w, backend)
    (g_h,) = torch.autograd.grad(loss, [h], retain_graph=True)  # one autograd.grad per input
    (g_w,) = torch.autograd.grad(loss * 2.0, [w], retain_graph=True)
    assert torch.equal(g_h, both[0]) and torch.equal(g_w, 2.0 * both[1])
    loss.backward(retain_graph=True)  # and twice more into .grad
    loss.backward()
    assert torch.equal(h.grad, 2.0 * both[0]) and torch.equal(w.grad, 2.0 * both[1])


def test_second_backward_after_an_in_place_update_is_autograds_error():
    d = _data()
    h, w = _leaves(d)
    loss = _loss("fused_linear_cross_entropy", d, h, w)
    loss.backward(retain_graph=True)
    with torch.no_grad():
        w.sub_(0.1 * w.grad)  # an optimizer step between the two backwards
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# Item 4: one validation for both head paths
# ---------------------------------------------------------------------------------------------
def _bad(kind, d):
    """(keyword overrides, exception, message) -- the argument named in the message."""
    if kind == "old_logp-shape":
        return dict(old=d["old"][:, :-1]), ValueError, r"old_logp must have (the )?shape.*\(3, 6\)"
    if kind == "old_logp-device":
        return dict(old=d["old"].to("meta")), ValueError, "old_logp on meta"
    if kind == "advantages-shape":
        return dict(adv=d["adv"][:-1]), ValueError, "advantages must have shape"
    if kind == "mask-shape":
        return dict(mask=d["mask"][:, :-1]), ValueError, "mask must have the shape"
    if kind == "int-hidden":
        return dict(hidden=d["hidden"].long()), TypeError, "hidden must be a floating tensor"
    if kind == "ref_hidden-shape":
        return dict(ref_hidden=d["hidden"][:, :-1]), ValueError, r"ref_hidden must have shape \(3, 6, 'H'\)"
    raise AssertionError(kind)


BAD = ["old_logp-shape", "old_logp-device", "advantages-shape", "mask-shape", "int-hidden"]
BAD_CASES = [(op, kind) for op in ("fused_linear_grpo_loss", "fused_linear_ppo_loss") for kind in BAD]
BAD_CASES.append(("fused_linear_grpo_loss", "ref_hidden-shape"))  # PPO takes no ref_hidden


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("head_path", ["auto", "three_gemm", "four_gemm"])
@pytest.mark.parametrize("op,kind", BAD_CASES)
def test_bad_inputs_named_the_same_on_both_head_paths(op, kind, head_path, backend):
    d = _data(_device(backend))
    over, exc, match = _bad(kind, d)
    d.update({k: v for k, v in over.items() if k in d})
    kw = {"ref_hidden": over["ref_hidden"], "beta": 0.1} if "ref_hidden" in over else {}
    with pytest.raises(exc, match=match):
        if op == "fused_linear_grpo_loss":
            ak.fused_linear_grpo_loss(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"], old_logp=d["old"],
                                      head_path=head_path, backend=backend, **kw)  # fmt: skip
        else:
            ak.fused_linear_ppo_loss(d["hidden"], d["weight"], d["ids"], d["old"], d["adv"], d["mask"],
                                     head_path=head_path, backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_cross_entropy_num_items_zero_only_for_a_fully_ignored_batch(backend):
    """TRL's count of 0 for a batch with no valid label: loss 0, gradient 0 (clamped at 1); with valid
    labels the same 0 is a ValueError naming it."""
    d = _data(_device(backend))
    h, w = _leaves(d)
    labels = torch.full_like(d["ids"], -100)
    for zero in (0, torch.tensor(0), torch.tensor(0.0)):
        loss = ak.fused_linear_cross_entropy(h, w, labels, num_items_in_batch=zero, backend=backend)
        grads = torch.autograd.grad(loss, [h, w], allow_unused=True)
        assert loss.item() == 0.0 and all(g is None or not g.any() for g in grads)
    with pytest.raises(ValueError, match=f"num_items_in_batch is 0 but the batch has {int(d['mask'].sum())} valid"):
        ak.fused_linear_cross_entropy(h, w, d["ids"].masked_fill(~d["mask"], -100), num_items_in_batch=0,
                                      backend=backend)  # fmt: skip
