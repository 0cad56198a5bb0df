"""csrc/gather_last.cu and csrc/gae.cu executed on the CUDA emulator through ``_cuda_backend``."""
from __future__ import annotations

import pytest
import torch

from alignkernels import _cuda_backend
from alignkernels.reference import gae_reference
from cuemu.emulator import device


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32, torch.float64, torch.int64], ids=str)
def test_gather_last_every_element_size(emulated, dtype):
    """Element sizes 1 / 2 / 4 / 8, contiguous and strided sequence dims, out-of-range positions."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 9, 5, 3, generator=g) * 50).to(dtype)
    for view in (x, x[:, 1:]):
        idx = torch.randint(0, view.shape[1], (4,), generator=g)
        expected = view[torch.arange(4), idx]
        assert torch.equal(_cuda_backend.gather_last_cuda(device(view), idx.int()), expected)
        assert torch.equal(_cuda_backend.gather_last_cuda(device(view), idx), expected)
    idx = torch.tensor([0, 8, 9, -1])
    out = _cuda_backend.gather_last_cuda(device(x), idx)
    assert torch.equal(out[:2], x[[0, 1], idx[:2]])
    if dtype.is_floating_point:
        assert torch.isnan(out[2:].double()).all()
    else:
        assert (out[2:] == 0).all()


def test_gather_last_odd_row_bytes_and_wide_rows(emulated):
    """Rows whose byte length allows only narrow words (7 bf16 = 14 bytes: 2-byte copies) and rows
    wide enough for several blocks along the row (grid.y > 1)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 7, generator=g).bfloat16()
    idx = torch.tensor([3, 0, 2])
    assert torch.equal(_cuda_backend.gather_last_cuda(device(x), idx), x[torch.arange(3), idx])
    wide = torch.randn(2, 3, 70000, generator=g)
    idx = torch.tensor([2, 1])
    assert torch.equal(_cuda_backend.gather_last_cuda(device(wide), idx), wide[torch.arange(2), idx])


@pytest.mark.parametrize("B,T", [(1, 1), (3, 37), (2, 1024), (2, 2500)])
def test_gae_matches_reference(emulated, B, T):
    """Single tiles, a full tile, and several tiles with a ragged last one; masks with holes."""
    g = torch.Generator().manual_seed(T)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # right padding
    mask &= torch.rand(B, T, generator=g) > 0.25  # holes (tool outputs)
    mask[0] = True
    for gamma, lam in ((1.0, 0.95), (0.99, 0.0), (0.9, 1.0)):
        adv, ret = _cuda_backend.gae_cuda(device(rewards), device(values), device(mask.float()), gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
        torch.testing.assert_close(adv.double(), ref_adv, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ret.double(), ref_ret, atol=1e-4, rtol=1e-4)
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_bf16_strided_inputs(emulated):
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 40, generator=g).bfloat16()
    values = torch.randn(2, 37, generator=g).bfloat16()
    mask = torch.rand(2, 37, generator=g) > 0.3
    adv, ret = _cuda_backend.gae_cuda(big[:, :37], values, mask.int(), 1.0, 0.95)
    ref_adv, ref_ret = gae_reference(big[:, :37].float(), values.float(), mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, ref_adv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret, ref_ret, atol=1e-4, rtol=1e-4)
