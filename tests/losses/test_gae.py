"""GAE: Triton reverse-scan kernel (interpreter on CPU tensors, or the GPU) and the vectorised
torch scan against the Python-loop reference (verl's masked recursion), random masks with holes
and padding, several (gamma, lam)."""
import time

import pytest
import torch

from alignkernels.losses.ppo import gae, masked_whiten
from alignkernels.reference import gae_reference


def _inputs(B, T, seed, dtype=torch.float32, device="cpu", hole_p=0.25):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right padding
    mask &= torch.rand(B, T, generator=g) > hole_p  # holes (e.g. tool-output tokens)
    if B > 1:
        mask[0] = True  # one full row
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


GAMMA_LAM = [(1.0, 0.95), (0.99, 0.0), (0.9, 1.0)]


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (4, 33), (2, 300)])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_triton_matches_loop(B, T, gamma, lam, triton_device):
    r, v, m = _inputs(B, T, seed=B * 1000 + T, device=triton_device)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, backend="triton")
    ref_adv, ref_ret = gae_reference(r, v, m, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_triton_multi_tile_and_strided(triton_device):
    # T > 2048 walks two tiles with the carried (next value, advantage); a sliced (strided) input.
    r, v, m = _inputs(2, 2100, seed=5, device=triton_device)
    big = torch.randn(2, 2200, device=triton_device)
    big[:, :2100] = r
    r_strided = big[:, :2100]
    assert not r_strided.is_contiguous()
    adv, ret = gae(r_strided, v, m, gamma=0.999, lam=0.95, backend="triton")
    ref_adv, ref_ret = gae_reference(r, v, m, gamma=0.999, lam=0.95)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-4)


def test_triton_bf16_inputs(triton_device):
    r, v, m = _inputs(3, 64, seed=9, dtype=torch.bfloat16, device=triton_device)
    adv, ret = gae(r, v, m, backend="triton")
    ref_adv, ref_ret = gae_reference(r.float(), v.float(), m)  # same bf16 values, fp32 math
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T", [(1, 1), (5, 2), (6, 17), (8, 257), (3, 1000)])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_torch_scan_matches_loop(B, T, gamma, lam):
    r, v, m = _inputs(B, T, seed=B + 7 * T)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, backend="torch")
    ref_adv, ref_ret = gae_reference(r, v, m, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_fp64_torch_is_exact_to_fp64():
    r, v, m = _inputs(4, 300, seed=1, dtype=torch.float64)
    adv, ret = gae(r, v, m, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = gae_reference(r, v, m, gamma=0.97, lam=0.9)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_holes_are_bridged_and_masked_outputs_zero():
    # One row: valid, hole, valid. The hole is skipped: A_0 = r0 + g*V2 - V0 + g*l*A_2.
    r = torch.tensor([[1.0, 100.0, 2.0]])
    v = torch.tensor([[0.5, 100.0, 0.25]])
    m = torch.tensor([[1, 0, 1]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
    a2 = 2.0 - 0.25
    a0 = 1.0 + gamma * 0.25 - 0.5 + gamma * lam * a2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25]]))


def test_all_masked_and_whitening_finite(triton_device):
    r, v, _ = _inputs(3, 10, seed=2)
    m = torch.zeros(3, 10, dtype=torch.bool)
    for backend in ("torch", "reference"):
        adv, ret = gae(r, v, m, backend=backend, whiten=True)
        assert torch.equal(adv, torch.zeros_like(adv)) and torch.equal(ret, torch.zeros_like(ret))
    adv, ret = gae(r.to(triton_device), v.to(triton_device), m.to(triton_device), backend="triton", whiten=True)
    assert torch.equal(adv.cpu(), torch.zeros(3, 10)) and torch.equal(ret.cpu(), torch.zeros(3, 10))


def test_whiten_option():
    r, v, m = _inputs(4, 20, seed=4)
    adv, ret = gae(r, v, m, whiten=True)
    raw, raw_ret = gae_reference(r, v, m)
    expected = masked_whiten(raw, m).masked_fill(~m, 0.0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, raw_ret)  # returns come from the raw advantages
    sel = adv[m]
    assert abs(float(sel.mean())) < 1e-5 and abs(float(sel.std()) - 1.0) < 1e-4


def test_bad_inputs():
    r, v, m = _inputs(2, 5, seed=0)
    with pytest.raises(ValueError, match="values"):
        gae(r, v[:, :-1], m)
    with pytest.raises(ValueError, match="mask"):
        gae(r, v, m[:1])
    with pytest.raises(ValueError, match="rewards"):
        gae(r[0], v[0], m[0])
    with pytest.raises(TypeError, match="rewards"):
        gae(r.long(), v, m)
    with pytest.raises(ValueError, match="backend"):
        gae(r, v, m, backend="jax")


@pytest.mark.gpu
def test_gpu_long_rows_and_speed_vs_loop():
    r, v, m = _inputs(64, 8192, seed=0, device="cuda")
    adv, ret = gae(r, v, m, gamma=0.999, lam=0.95)
    ref_adv, ref_ret = gae_reference(r.double(), v.double(), m)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-4, atol=1e-3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        gae(r, v, m, gamma=0.999, lam=0.95)
    torch.cuda.synchronize()
    ours = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    gae_reference(r, v, m, gamma=0.999, lam=0.95)
    torch.cuda.synchronize()
    loop = time.perf_counter() - t0
    assert loop / ours >= 50, f"GAE speed-up vs loop only {loop / ours:.1f}x"
