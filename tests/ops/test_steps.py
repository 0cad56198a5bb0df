"""step_positions / gather_steps: PRM step tokens of padded (left/right) and packed batches,
against a plain loop (alignkernels.reference.step_positions_reference); the Triton kernel (run by
the interpreter without a GPU) against the PyTorch path, values and gradients."""
import inspect

import pytest
import torch

from alignkernels.ops.steps import StepPositions, gather_steps, step_positions
from alignkernels.reference import step_positions_reference


def _random_flags(B, T, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=g) < p


def _assert_positions_match_loop(pos: StepPositions, flags, cu_seqlens=None):
    expected = step_positions_reference(flags, cu_seqlens)
    assert pos.seq_index.tolist() == [e[0] for e in expected]
    assert pos.token_index.tolist() == [e[1] for e in expected]
    assert pos.index.tolist() == [e[2] for e in expected]
    S = flags.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    counts = [sum(1 for e in expected if e[0] == s) for s in range(S)]
    assert pos.counts.tolist() == counts
    assert pos.offsets.tolist() == [sum(counts[:s]) for s in range(S + 1)]


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------
def test_positions_padded_right_and_left():
    B, T = 4, 23
    flags = _random_flags(B, T, 0.25, 0)
    lengths = torch.tensor([23, 10, 1, 0])
    right = torch.arange(T)[None] < lengths[:, None]
    left = right.flip(-1)
    for attn in (right, left):
        pos = step_positions(flags, attention_mask=attn.long())
        _assert_positions_match_loop(pos, flags & attn)
    assert step_positions(flags, attention_mask=right).counts[3] == 0  # an all-padding row


def test_positions_from_trl_labels_and_separator_ids():
    B, T = 3, 17
    flags = _random_flags(B, T, 0.3, 1)
    labels = torch.where(flags, torch.randint(0, 2, (B, T)), torch.full((B, T), -100))
    _assert_positions_match_loop(step_positions(labels=labels), flags)
    input_ids = torch.where(flags, torch.full((B, T), 7), torch.randint(8, 50, (B, T)))
    _assert_positions_match_loop(step_positions(input_ids=input_ids, separator_id=7), flags)
    # a padding token equal to the separator is not a step once the attention mask is given
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, -3:] = 0
    pos = step_positions(input_ids=input_ids, separator_id=7, attention_mask=attn)
    _assert_positions_match_loop(pos, flags & (attn != 0))


def test_positions_packed_with_empty_sequences_and_tokens_outside():
    N = 40
    flags = _random_flags(1, N, 0.35, 2)[0]
    flags[:3] = True  # before cu[0]: not part of any sequence
    flags[-2:] = True  # after cu[-1]
    cu = torch.tensor([3, 9, 9, 20, 20, 37, 38], dtype=torch.int32)
    pos = step_positions(flags, cu_seqlens=cu)
    _assert_positions_match_loop(pos, flags, cu)
    assert pos.counts[1] == 0 and pos.counts[3] == 0
    pos2 = step_positions(flags[None], cu_seqlens=cu)  # [1, N] is accepted too
    assert torch.equal(pos2.index, pos.index)


# --------------------------------------------------------------------------------------------
# Gather: torch vs loop, Triton (interpreter) vs torch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_steps_padded_values_and_grads(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    B, T, D = 3, 37, 20
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D, generator=g).to(device).requires_grad_()
    flags = _random_flags(B, T, 0.2, 4)
    flags[1] = False  # a row with no step
    out, pos = gather_steps(x, flags.to(device), return_positions=True, backend=backend)
    expected = step_positions_reference(flags)
    assert out.shape == (len(expected), D)
    ref = torch.stack([x.detach()[b, t] for b, t, _ in expected])
    assert torch.equal(out.detach(), ref)
    _assert_positions_match_loop(StepPositions(*(p.cpu() for p in pos)), flags)
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    grad_ref = torch.zeros(B, T, D)
    for j, (b, t, _) in enumerate(expected):
        grad_ref[b, t] = grad_out[j].cpu()
    assert torch.equal(grad_x.cpu(), grad_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_steps_triton_matches_torch_strided_multichunk(dtype, triton_device):
    # T > BLOCK_T of the chosen config (several chunks), D > the largest BLOCK_D (two feature
    # tiles), x a non-contiguous slice (stride_b != T * stride_t), rest dims [2, 300] flattened
    B, T, D = 2, 300, 600
    g = torch.Generator().manual_seed(5)
    base = torch.randn(B, T + 1, D, generator=g).to(dtype)
    x = base[:, :-1].to(triton_device)
    flags = _random_flags(B, T, 0.05, 6)
    flags[0, 255:258] = True  # steps straddling a chunk boundary
    ours = gather_steps(x, flags.to(triton_device), backend="triton")
    torch_path = gather_steps(x.cpu(), flags, backend="torch")
    assert ours.dtype == dtype
    assert torch.equal(ours.cpu(), torch_path)
    x4 = base[:, :-1].reshape(B, T, 2, D // 2).to(triton_device)
    ours4 = gather_steps(x4, flags.to(triton_device), backend="triton")
    assert ours4.shape == (int(flags.sum()), 2, D // 2)
    assert torch.equal(ours4.cpu(), torch_path.view(-1, 2, D // 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_steps_packed(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    N, D = 45, 12
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g).to(device).requires_grad_()
    flags = _random_flags(1, N, 0.3, 8)[0]
    cu = torch.tensor([0, 10, 10, 31, 44])
    out, pos = gather_steps(x, flags.to(device), cu_seqlens=cu.to(device), return_positions=True, backend=backend)
    expected = step_positions_reference(flags, cu)
    assert torch.equal(out.detach().cpu(), x.detach().cpu()[[e[2] for e in expected]])
    _assert_positions_match_loop(StepPositions(*(p.cpu() for p in pos)), flags, cu)
    out.sum().backward()
    hit = torch.zeros(N, dtype=torch.bool)
    hit[[e[2] for e in expected]] = True
    assert torch.equal(x.grad.cpu(), hit[:, None].float().expand(N, D))
    # [1, N, D] with a [1, N] mask gives the same rows
    out3 = gather_steps(x.detach()[None], flags[None].to(device), cu_seqlens=cu.to(device), backend=backend)
    assert torch.equal(out3.cpu(), out.detach().cpu())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_steps_no_steps_and_empty_batch(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    x = torch.randn(2, 9, 5, device=device, requires_grad=True)
    no_steps = torch.zeros(2, 9, dtype=torch.bool, device=device)
    out, pos = gather_steps(x, no_steps, return_positions=True, backend=backend)
    assert out.shape == (0, 5) and pos.counts.tolist() == [0, 0] and pos.offsets.tolist() == [0, 0, 0]
    (out.sum() * 1.0).backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    empty = gather_steps(torch.randn(0, 9, 5, device=device), torch.zeros(0, 9, device=device), backend=backend)
    assert empty.shape == (0, 5)
    packed = gather_steps(
        torch.randn(6, 5, device=device), torch.ones(6, device=device), cu_seqlens=torch.tensor([0], device=device),
        backend=backend,
    )  # fmt: skip
    assert packed.shape == (0, 5)


def test_gather_steps_integer_values_torch():
    x = torch.arange(2 * 6).view(2, 6)
    flags = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]])
    assert gather_steps(x, flags).tolist() == [1, 4, 6, 11]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(2, 8, 4)
    flags = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly one of step_mask"):
        gather_steps(x)
    with pytest.raises(ValueError, match="exactly one of step_mask"):
        gather_steps(x, flags, labels=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"step_mask must have shape \(2, 8\)"):
        gather_steps(x, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="separator_id"):
        gather_steps(x, input_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        gather_steps(x, labels=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        gather_steps(x, flags, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        gather_steps(torch.randn(8, 4), torch.ones(8), cu_seqlens=torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        gather_steps(torch.randn(8, 4), torch.ones(8), cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"must be \[N\] or \[1, N\]"):
        step_positions(torch.ones(2, 8), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"x must be \[B, T, \.\.\.\]"):
        gather_steps(torch.randn(8), torch.ones(8))
    with pytest.raises(ValueError, match="backend must be one of"):
        gather_steps(x, flags, backend="nope")


def test_compile_cases_describe_every_kernel_argument():
    from alignkernels.kernels import steps as kernel_module

    fn = kernel_module.gather_steps_fwd_kernel
    params = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    assert kernel_module.COMPILE_CASES
    for case in kernel_module.COMPILE_CASES:
        assert list(case["signature"]) == params
        constexprs = [p for p, t in case["signature"].items() if t == "constexpr"]
        assert sorted(constexprs) == sorted(case["constexprs"])
    configs = {(c["constexprs"]["BLOCK_T"], c["constexprs"]["SUB_T"], c["constexprs"]["BLOCK_D"], c["num_warps"])
               for c in kernel_module.COMPILE_CASES}  # fmt: skip
    assert configs == set(kernel_module.GATHER_STEPS_CONFIGS)
    for D in (1, 128, 129, 512, 4096, 10**6):
        assert kernel_module.pick_config(D) in kernel_module.GATHER_STEPS_CONFIGS


@pytest.mark.gpu
def test_gather_steps_kernel_at_benchmark_size_on_gpu():
    # B=16, T=4096, H=4096 bf16, ~20 steps per row: the benchmark shape
    B, T, H = 16, 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    flags = torch.rand(B, T, device="cuda", generator=g) < 20 / T
    ours, pos = gather_steps(x, flags, backend="triton", return_positions=True)
    ref, ref_pos = gather_steps(x, flags, backend="torch", return_positions=True)
    assert torch.equal(ours, ref)
    for a, b in zip(pos, ref_pos):
        assert torch.equal(a, b)
    grad = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(g_ours, g_ref)
