"""The policy-loss rows (``alignkernels.losses.policy_rows.POLICY_LOSS_TYPES``) are what
``grpo_loss``, the three-GEMM separability decision, the Triton launcher and the validation read:
a new loss type is one row. Values of the existing rows are pinned against TRL in
``tests/losses/test_grpo.py``."""
import pytest
import torch

from alignkernels.losses.fused import fused_linear_grpo_loss, grpo_non_separable_reason
from alignkernels.losses.grpo import GRPO_LOSS_TYPES, GRPOLoss, grpo_loss
from alignkernels.losses.policy_rows import POLICY_LOSS_TYPES, PolicyLossType, TrainerState, aggregate_policy_rows


def _data(B=5, T=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    return logp, old, adv, mask


def test_the_public_loss_types_are_the_rows():
    assert GRPO_LOSS_TYPES == tuple(POLICY_LOSS_TYPES)


def test_every_triton_row_has_a_compiled_kernel_variant():
    from alignkernels.kernels import grpo as kern

    compiled = {case["constexprs"]["LOSS_KIND"] for case in kern.COMPILE_CASES}
    for row in POLICY_LOSS_TYPES.values():
        if row.triton:
            assert row.term in kern.LOSS_KINDS and kern.LOSS_KINDS[row.term] in compiled, row.name
        else:
            assert row.term not in kern.LOSS_KINDS, row.name


@pytest.mark.parametrize("name", list(POLICY_LOSS_TYPES))
def test_separability_decision_reads_the_row(name):
    row = POLICY_LOSS_TYPES[name]
    reason = grpo_non_separable_reason({"loss_type": name})
    assert (reason is None) == row.token_separable
    if reason is not None:
        assert name in reason and row.not_separable in reason


@pytest.mark.parametrize("name", list(POLICY_LOSS_TYPES))
def test_aggregation_is_the_rows_mode_over_trls_denominators(name):
    """Independent of grpo_loss: the row's AGGREGATION_MODES row on TRL's denominators."""
    row = POLICY_LOSS_TYPES[name]
    g = torch.Generator().manual_seed(1)
    loss_sum = torch.randn(4, generator=g, dtype=torch.float64)
    count = torch.tensor([3.0, 0.0, 5.0, 1.0], dtype=torch.float64)
    state = TrainerState(gradient_accumulation_steps=3, steps_per_generation=2, num_processes=2,
                         num_items_in_batch=torch.tensor(20.0, dtype=torch.float64),
                         max_completion_length=6)  # fmt: skip
    loss, policy_loss = aggregate_policy_rows(row, loss_sum, count, 5, state)
    expected = {
        "seq-mean-token-mean": (loss_sum / count.clamp(min=1)).mean() / 3,
        "token-mean": loss_sum.sum() / count.sum() / 3,
        "seq-mean-token-sum-norm": loss_sum.sum() / (4 * 6) / 3,
        "seq-mean-token-sum": loss_sum.mean() / 3,
    }[row.aggregation]
    if row.normaliser == "num_items":
        expected = loss_sum.sum() / (20.0 / 2 * 3 / 2)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    assert not policy_loss.requires_grad


def test_a_new_loss_type_is_one_row(monkeypatch):
    """A row added to the table (here: GRPO's aggregation, declared not token-separable and logging
    no clip metrics) is accepted by grpo_loss, GRPOLoss and the fused loss, which all read it."""
    new = POLICY_LOSS_TYPES["grpo"]._replace(name="grpo_copy", metrics=(), not_separable="is a test row")
    monkeypatch.setitem(POLICY_LOSS_TYPES, "grpo_copy", new)
    logp, old, adv, mask = _data()
    x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours, metrics = grpo_loss(x, old, None, adv, mask, loss_type="grpo_copy", backend="torch")
    ref, ref_metrics = grpo_loss(y, old, None, adv, mask, loss_type="grpo", backend="torch")
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
    assert "clip_ratio/low_mean" in ref_metrics and not any(k.startswith("clip_ratio") for k in metrics)
    GRPOLoss(loss_type="grpo_copy")
    assert "is a test row" in grpo_non_separable_reason({"loss_type": "grpo_copy"})
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, 50, (5, 7), generator=g)
    _, fused_metrics = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, loss_type="grpo_copy", backend="torch")
    assert fused_metrics["head_path"] == "four_gemm"
    with pytest.raises(ValueError, match="three_gemm.*is a test row"):
        fused_linear_grpo_loss(hidden, weight, ids, adv, mask, loss_type="grpo_copy", backend="torch",
                               head_path="three_gemm")  # fmt: skip
    with pytest.raises(ValueError, match="valid loss types: .*grpo_copy"):
        grpo_loss(logp, old, None, adv, mask, loss_type="nope")


def test_rows_without_a_triton_variant_run_in_torch_under_backend_triton(monkeypatch):
    """``triton=False`` routes a row to the PyTorch engine: a clipped row declared so gives the
    torch path's bits under ``backend="triton"``."""
    torch_only = POLICY_LOSS_TYPES["dapo"]._replace(name="dapo_torch", triton=False)
    monkeypatch.setitem(POLICY_LOSS_TYPES, "dapo_torch", torch_only)
    logp, old, adv, mask = (t.float() if t.is_floating_point() else t for t in _data(seed=3))
    a, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo_torch", backend="triton")
    b, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo", backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)



def test_the_docs_tables_are_the_rows():
    """docs/ARCHITECTURE.md holds the rendered GRPO rows; docs/FRAMEWORKS.md's verl table lists every
    verl row with its head path and Triton kernel as the rows declare them."""
    from pathlib import Path

    from alignkernels.losses.policy_rows import markdown_table
    from alignkernels.losses.verl_policy import VERL_POLICY_LOSSES

    docs = Path(__file__).resolve().parents[2] / "docs"
    assert markdown_table() in (docs / "ARCHITECTURE.md").read_text()
    text = (docs / "FRAMEWORKS.md").read_text()
    table = text[text.index("| verl `loss_mode` |"):]
    table = table[: table.index("\n\n")].splitlines()[2:]
    seen = {}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in cells[1].split("(")[0].replace("`", "").split(","):
            if name.strip() in VERL_POLICY_LOSSES:
                seen[name.strip()] = (cells[2] == "yes", cells[3] != "—")
    assert seen == {name: (row.token_separable, row.triton) for name, row in VERL_POLICY_LOSSES.items()}


def test_one_row_reaches_every_consumer(monkeypatch):
    """The worked example of docs/ARCHITECTURE.md ("Adding a GRPO loss type"): a toy row -- the
    clipped term summed over the batch's tokens (``token-sum``), token-separable, on the Triton
    kernel -- registered in the table and nowhere else is taken by the dispatcher (torch and
    Triton rows, against an fp64 formula written here), the validation (ratio levels), the
    three-GEMM separability decision (and that head's gradient), and the docs renderer."""
    from alignkernels.losses.policy_rows import markdown_table

    toy = PolicyLossType("toy_sum", "clipped", ("token",), "clip(r, 1−ε_low, 1+ε_high)", "r multiplies A",
                         "token-sum", "own", ("clip_ratio/low_mean",), None, True)  # fmt: skip
    monkeypatch.setitem(POLICY_LOSS_TYPES, "toy_sum", toy)
    logp, old, adv, mask = _data(seed=4)
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    expected = -(torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * m).sum() / 2  # / GA

    x = logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, None, adv, mask, loss_type="toy_sum", gradient_accumulation_steps=2,
                              backend="torch")  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    assert list(metrics) == ["clip_ratio/low_mean"]
    y = logp.clone().requires_grad_(True)
    ref = -(torch.minimum(torch.exp(y - old) * a, torch.exp(y - old).clamp(0.8, 1.2) * a) * m).sum() / 2
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref, y)[0], rtol=1e-12, atol=1e-14)
    f32 = [t.float() if t.is_floating_point() else t for t in (logp, old, adv, mask)]
    triton, _ = grpo_loss(*f32[:2], None, *f32[2:], loss_type="toy_sum", gradient_accumulation_steps=2,
                          backend="triton")  # fmt: skip
    torch.testing.assert_close(triton.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"importance_sampling_level must be one of \('token',\)"):
        grpo_loss(logp, old, None, adv, mask, loss_type="toy_sum", importance_sampling_level="sequence")

    assert grpo_non_separable_reason({"loss_type": "toy_sum"}) is None
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, 50, (5, 7), generator=g)
    grads = {}
    for path in ("auto", "four_gemm"):
        h = hidden.clone().requires_grad_(True)
        out, fused_metrics = fused_linear_grpo_loss(h, weight, ids, adv, mask, old_logp=old, loss_type="toy_sum",
                                                    backend="torch", head_path=path)  # fmt: skip
        grads[fused_metrics["head_path"]] = (out.detach(), torch.autograd.grad(out, h)[0])
    assert set(grads) == {"three_gemm", "four_gemm"}
    for u, v in zip(grads["three_gemm"], grads["four_gemm"]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)

    line = ("| `toy_sum` | clipped | clip(r, 1−ε_low, 1+ε_high) | r multiplies A | `token-sum` (own) | "
            "`clip_ratio/low_mean` | yes | yes |")  # fmt: skip
    assert line in markdown_table().splitlines()
