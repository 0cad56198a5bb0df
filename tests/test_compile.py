"""Every public op and loss under ``torch.compile`` (CPU, inductor) with ignored / masked positions
present: the compiled call's values and the gradient of every differentiable input equal eager's
and the fp64 eager baseline (``backend="reference"`` on fp64 inputs), and ignored rows get exactly
zero gradient.

Under compile the lm-head engine keeps ignored rows in place (no data-dependent shapes) and masks
them (``_lmhead_engine.CompactRows``); before the three-GEMM head honoured that mask,
``fused_linear_cross_entropy`` scored ignored rows as label 0 and counted them in the mean.
One compile per op (~10-40 s each on CPU): slow-marked."""
import pytest
import torch

import alignkernels as ak

B, T, H, V = 2, 5, 16, 53


def _data():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True
    mask[1, 3:] = False  # a padded tail: ignored rows in every op
    ids = torch.randint(0, V, (B, T), generator=g)
    return dict(
        g=g, mask=mask, ids=ids, labels=ids.masked_fill(~mask, -100),
        hidden=torch.randn(B, T, H, generator=g) * 0.6, weight=torch.randn(V, H, generator=g) * 0.5,
        bias=torch.randn(V, generator=g) * 0.1, logits=torch.randn(B, T, V, generator=g) * 2,
        old=-torch.rand(B, T, generator=g) * 3 - 1, ref=-torch.rand(B, T, generator=g) * 3 - 1,
        adv=torch.randn(B, generator=g), values=torch.randn(B, T, generator=g),
    )  # fmt: skip


def _case(op, d):
    """``(fn(*inputs, backend) -> tuple of outputs, inputs, ignored [B, T] bool | None)``: ``inputs`` are
    the differentiable tensors (fp32); ``ignored`` marks positions whose rows must get zero gradient."""
    ignored = ~d["mask"]
    if op == "token_logprobs":
        return (lambda x, backend: ak.token_logprobs(x, d["labels"], return_entropy=True, backend=backend),
                [d["logits"]], ignored)  # fmt: skip
    if op == "linear_logprobs":
        return (lambda h, w, b, backend: ak.linear_logprobs(h, w, d["labels"], bias=b, return_entropy=True,
                                                            backend=backend),
                [d["hidden"], d["weight"], d["bias"]], ignored)  # fmt: skip
    if op == "fused_linear_cross_entropy":
        def fn(h, w, b, backend):
            out = ak.fused_linear_cross_entropy(h, w, d["labels"], bias=b, return_stats=True, backend=backend)
            return out.loss, out.logp, out.entropy, out.num_tokens.to(out.loss.dtype)

        return fn, [d["hidden"], d["weight"], d["bias"]], ignored
    if op == "fused_linear_grpo_loss":
        def fn(h, w, backend):
            loss, metrics = ak.fused_linear_grpo_loss(h, w, d["ids"], d["adv"], d["mask"], old_logp=d["old"],
                                                      ref_logp=d["ref"], beta=0.04, loss_type="dapo",
                                                      backend=backend)  # fmt: skip
            return loss, metrics["kl"]

        return fn, [d["hidden"], d["weight"]], ignored
    if op == "fused_linear_ppo_loss":
        def fn(h, w, v, backend):
            loss, _ = ak.fused_linear_ppo_loss(h, w, d["ids"], d["old"], d["adv"][:, None].expand(B, T), d["mask"],
                                               v, d["values"].detach() * 0.9, d["values"].detach() + 0.5,
                                               entropy_coef=0.01, backend=backend)  # fmt: skip
            return (loss,)

        return fn, [d["hidden"], d["weight"], d["values"]], ignored
    if op == "fused_linear_dpo_loss":  # chosen rows then rejected rows: [2B, T] with B = 1
        def fn(h, w, backend):
            loss, metrics = ak.fused_linear_dpo_loss(h, w, d["labels"], ref_chosen_logps=d["ref"][:1].sum(1),
                                                     ref_rejected_logps=d["ref"][1:].sum(1), beta=0.1,
                                                     backend=backend)  # fmt: skip
            return loss, metrics["rewards/chosen"]

        return fn, [d["hidden"], d["weight"]], ignored
    if op == "grpo_loss":
        def fn(lp, backend):
            loss, _ = ak.grpo_loss(lp, d["old"], d["ref"], d["adv"], d["mask"], beta=0.04, backend=backend)
            return (loss,)

        return fn, [d["old"] + 0.1 * d["values"]], ignored
    if op == "ppo_loss":
        def fn(lp, v, backend):
            loss, _ = ak.ppo_loss(lp, d["old"], d["adv"][:, None].expand(B, T), d["mask"], v, d["values"].detach(),
                                  d["values"].detach() + 0.5, backend=backend)  # fmt: skip
            return (loss,)

        return fn, [d["old"] + 0.1 * d["values"], d["values"]], ignored
    raise AssertionError(op)


OPS = ["token_logprobs", "linear_logprobs", "fused_linear_cross_entropy", "fused_linear_grpo_loss",
       "fused_linear_ppo_loss", "fused_linear_dpo_loss", "grpo_loss", "ppo_loss"]  # fmt: skip
# The three-GEMM GRPO/PPO head differentiates the loss per chunk (torch.autograd.grad inside the
# forward): dynamo breaks the graph there, so those two compile without fullgraph.
NOT_FULLGRAPH = {"fused_linear_grpo_loss", "fused_linear_ppo_loss"}


def _run(fn, inputs, backend, dtype, weights=None):
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    outs = fn(*leaves, backend=backend)
    if weights is None:  # a fixed random cotangent per output: gradients through every output
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=g) for o in outs]
    objective = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(objective, leaves)
    return [o.detach() for o in outs], list(grads), weights


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_compiled_equals_eager_and_fp64_with_ignored_rows(op):
    torch._dynamo.reset()
    d = _data()
    fn, inputs, ignored = _case(op, d)
    compiled = torch.compile(fn, fullgraph=op not in NOT_FULLGRAPH, backend="inductor")
    eager_out, eager_grads, weights = _run(fn, inputs, "auto", torch.float32)
    comp_out, comp_grads, _ = _run(compiled, inputs, "auto", torch.float32, weights)
    truth_out, truth_grads, _ = _run(fn, inputs, "reference", torch.float64, weights)
    for got, eager, truth in zip(comp_out + comp_grads, eager_out + eager_grads, truth_out + truth_grads):
        scale = truth.abs().max().item() or 1.0
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-6 * scale)
    rows = comp_grads[0]
    if rows.shape[:2] == (B, T):  # hidden states / logits / per-token inputs: ignored rows get nothing
        assert rows[ignored].abs().max() == 0
