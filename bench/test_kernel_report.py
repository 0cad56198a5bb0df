"""The static report's occupancy arithmetic (the compile step itself is tests/kernels/test_compile.py
and bench/test_triton_compat.py)."""
from bench.kernel_report import occupancy


def test_occupancy_arithmetic():
    # 32 regs x 32 lanes = 1024 regs/warp; 4 warps -> 16 blocks by registers, 16 by warps: full.
    assert occupancy(32, 4, 0, 90) == dict(blocks_per_sm=16, occupancy=1.0, limiter="registers")
    # 255 regs round up to 8192 per warp: one 8-warp block fits -> 8 / 64 warps.
    occ = occupancy(255, 8, 0, 80)
    assert occ["blocks_per_sm"] == 1 and occ["occupancy"] == 8 / 64 and occ["limiter"] == "registers"
    # Shared memory can be the limiter.
    assert occupancy(32, 4, 100 * 1024, 80)["limiter"] == "shared memory"
