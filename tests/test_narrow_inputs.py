"""Setups outside the usual ones: narrow label dtypes behave exactly like int64 on every op
and backend; double backward is one clear error on the fused backends (and works on the reference)."""
import pytest
import torch

import alignkernels
from helpers import TRITON_DEVICE

NARROW = [torch.uint8, torch.int8, torch.int16, torch.int32]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _labels(dtype, V, n=6):
    """Labels that a narrow comparison gets wrong: 156 (= -100 as uint8) and, where representable,
    ignore_index -100 itself."""
    labels = torch.tensor([0, 5, 156 % V, V - 1, 7, 156 % V])
    if dtype != torch.uint8:
        labels[4] = -100
    return labels.to(dtype)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_token_logprobs_narrow_labels_match_int64(backend, dtype):
    V = 200 if dtype in (torch.uint8, torch.int16, torch.int32) else 120
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0)).to(_device(backend))
    labels = _labels(dtype, V).to(logits.device)
    got = alignkernels.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    want = alignkernels.token_logprobs(logits, labels.long(), return_entropy=True, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert (got[0][labels.long().cpu() != -100] != 0).all()  # label 156 is not mistaken for ignore_index


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_linear_logprobs_narrow_labels_match_int64(backend, dtype):
    V = 200 if dtype != torch.int8 else 120
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    hidden, weight = hidden.to(_device(backend)), weight.to(_device(backend))
    labels = _labels(dtype, V).to(hidden.device)
    got = alignkernels.linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    want = alignkernels.linear_logprobs(hidden, weight, labels.long(), return_entropy=True, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_steps_narrow_labels(backend):
    x = torch.randn(2, 5, 3).to(_device(backend))
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 1, 0
    wide = alignkernels.gather_steps(x, labels=labels.to(x.device), backend=backend)
    narrow = alignkernels.gather_steps(x, labels=labels.to(torch.int8).to(x.device), backend=backend)
    torch.testing.assert_close(narrow, wide)


def _double_backward(op, backend):
    g = torch.Generator().manual_seed(2)
    if op == "token_logprobs":
        x = torch.randn(3, 11, generator=g).to(_device(backend)).requires_grad_()
        out = alignkernels.token_logprobs(x, torch.tensor([1, 2, 3]).to(x.device), backend=backend,
                                          return_entropy=True)  # fmt: skip
    else:
        x = torch.randn(3, 4, generator=g).to(_device(backend)).requires_grad_()
        w = torch.randn(11, 4, generator=g).to(x.device)
        out = alignkernels.linear_logprobs(x, w, torch.tensor([1, 2, 3]).to(x.device), backend=backend,
                                           return_entropy=True)  # fmt: skip
    (grad,) = torch.autograd.grad((out[0] + out[1]).sum(), x, create_graph=True)
    return x, grad


@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_one_clear_error(op, backend):
    with pytest.raises(RuntimeError, match=rf"{op}: double backward \(create_graph=True\) is not supported"):
        _double_backward(op, backend)


@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
def test_double_backward_on_the_reference(op):
    x, grad = _double_backward(op, "reference")
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), x)  # a gradient penalty
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


def test_single_backward_unaffected():
    x = torch.randn(2, 7, requires_grad=True)
    alignkernels.token_logprobs(x, torch.tensor([0, 6]), backend="torch").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gather_last_wrong_rank_hidden_names_x():
    """[B, H] hidden states (the sequence dimension dropped) with a [B, T] mask: the error is about x."""
    with pytest.raises(ValueError, match=r"x must be \[B, T, \.\.\.\] with T = the mask's 5 positions"):
        alignkernels.gather_last(torch.randn(2, 16), torch.ones(2, 5))


@pytest.mark.parametrize("value", ["abc", [1.0], None], ids=["str", "list", "none"])
def test_non_numeric_logit_scale_names_the_argument(value):
    with pytest.raises(TypeError, match="logit_scale must be a number"):
        alignkernels.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), logit_scale=value)


def test_non_numeric_softcap_names_the_argument():
    with pytest.raises(TypeError, match="softcap must be a number"):
        alignkernels.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), softcap="30")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
def test_torch_compile_fullgraph_inductor(op):
    """``torch.compile(fullgraph=True)`` around the op (CPU, inductor): no graph break from the label
    check's host sync nor from the ignored-row compaction; values and gradients match eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([1, -100, 3, 49])
    if op == "token_logprobs":
        x = torch.randn(4, 50, generator=g)

        def fn(x, labels):
            return alignkernels.token_logprobs(x, labels, return_entropy=True)
    else:
        x, w = torch.randn(4, 8, generator=g), torch.randn(50, 8, generator=g)

        def fn(x, labels):
            return alignkernels.linear_logprobs(x, w, labels, return_entropy=True)

    grads = []
    for f in (torch.compile(fn, fullgraph=True, backend="inductor"), fn):
        xi = x.clone().requires_grad_()
        logp, ent = f(xi, labels)
        (logp.sum() + ent.sum()).backward()
        grads.append((logp.detach(), ent.detach(), xi.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][2][1].abs().max() == 0  # the ignored row gets no gradient
