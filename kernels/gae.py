"""Triton kernel for Generalized Advantage Estimation (GAE) as a reverse affine scan.

GAE with a token mask (verl ``compute_gae_advantage_return``: masked positions are skipped, they
neither consume a value nor a TD error; for right padding this is exactly TRL PPOTrainer's loop,
whose padded rewards and values are 0) is two first-order linear recurrences run from the end
of the row to its start. With ``m_t = mask_t != 0``:

    c_t = m_t * V_t + (1 - m_t) * c_{t+1},        c_T = 0   (value of the next valid token)
    d_t = r_t + gamma * c_{t+1} - V_t                        (TD error at a valid token)
    A_t = m_t * (d_t + gamma*lam*A_{t+1}) + (1 - m_t) * A_{t+1},   A_T = 0

Each step is an affine map ``x -> a*x + b``; maps compose associatively,
``(a2, b2) o (a1, b1) = (a1*a2, a2*b1 + b2)``, so ``tl.associative_scan`` evaluates all T
prefixes in O(log BLOCK_T) depth per tile. The row is read back to front (index ``T-1-s`` for
scan step ``s``), so a plain forward scan computes the reverse recurrence (no ``reverse=``
argument needed, works on Triton >= 3.2). Rows longer than one tile are walked tile by tile from
the end, carrying ``(c, A)`` across tiles: the scan of a tile gives ``x_s = P_s * x_in + S_s``.
``c_{t+1}`` is obtained by scanning the inputs shifted by one position (loads at ``t+1``).

Outputs: ``advantages_t = m_t * A_t``, ``returns_t = m_t * (A_t + V_t)`` (0 at masked positions).

Memory model: bandwidth-bound and tiny. Per element it reads r, V, m (and V, m once more shifted,
a cache hit) and writes two fp32 values: ~20 bytes/element for fp32 inputs. One program per row;
all row offsets are int64.
"""
import triton
import triton.language as tl

# (BLOCK_T, num_warps): every config the launcher can choose; tests compile each one to cubin.
GAE_CONFIGS = ((256, 2), (1024, 4), (2048, 8))


def pick_config(seq_len: int):
    """Smallest tile that covers the row, else the largest (the kernel loops over tiles)."""
    for block_t, num_warps in GAE_CONFIGS:
        if seq_len <= block_t:
            return block_t, num_warps
    return GAE_CONFIGS[-1]


@triton.jit
def _compose_affine(a1, b1, a2, b2):
    # x -> a1*x + b1 first (earlier scan step), then x -> a2*x + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def gae_fwd_kernel(
    rewards_ptr,  # [B, T] fp32/bf16/fp16, last dim contiguous
    values_ptr,  # [B, T] same dtype as rewards
    mask_ptr,  # [B, T] fp32 (0 = skipped position)
    adv_ptr,  # [B, T] fp32 out
    ret_ptr,  # [B, T] fp32 out
    T,
    stride_r,
    stride_v,
    stride_m,
    stride_out,
    gamma,
    gamma_lam,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r_row = rewards_ptr + row * stride_r
    v_row = values_ptr + row * stride_v
    m_row = mask_ptr + row * stride_m
    adv_row = adv_ptr + row * stride_out
    ret_row = ret_ptr + row * stride_out

    lane = tl.arange(0, BLOCK_T)
    is_last_lane = lane == BLOCK_T - 1
    carry_c = 0.0  # value of the next valid token after this tile
    carry_a = 0.0  # advantage of the next valid token after this tile
    for tile_start in range(0, T, BLOCK_T):
        s = tile_start + lane  # scan step
        in_row = s < T
        t = T - 1 - s  # position in the row (meaningful where in_row)
        r = tl.load(r_row + t, mask=in_row, other=0.0).to(tl.float32)
        v = tl.load(v_row + t, mask=in_row, other=0.0).to(tl.float32)
        m = (tl.load(m_row + t, mask=in_row, other=0.0) != 0).to(tl.float32)
        # next position t+1 exists only for s >= 1
        has_next = in_row & (s >= 1)
        v_next = tl.load(v_row + t + 1, mask=has_next, other=0.0).to(tl.float32)
        m_next = (tl.load(m_row + t + 1, mask=has_next, other=0.0) != 0).to(tl.float32)

        # c_{t+1} = m_{t+1} V_{t+1} + (1 - m_{t+1}) c_{t+2}: affine in the carried c.
        pc, sc = tl.associative_scan((1.0 - m_next, m_next * v_next), 0, _compose_affine)
        c_next = pc * carry_c + sc
        # A_t = a*A_{t+1} + b with a = m*gamma*lam + (1-m), b = m*d_t.
        delta = r + gamma * c_next - v
        pa, sa = tl.associative_scan((m * gamma_lam + (1.0 - m), m * delta), 0, _compose_affine)
        adv = pa * carry_a + sa

        tl.store(adv_row + t, m * adv, mask=in_row)
        tl.store(ret_row + t, m * (adv + v), mask=in_row)

        # Carry into the next tile (towards the start of the row): c_t after this tile's last
        # step is m_t V_t + (1-m_t) c_{t+1} at the tile's last lane; A likewise.
        c_here = m * v + (1.0 - m) * c_next
        carry_c = tl.sum(tl.where(is_last_lane, c_here, 0.0), axis=0)
        carry_a = tl.sum(tl.where(is_last_lane, adv, 0.0), axis=0)


def _signature(dtype: str):
    return {
        "rewards_ptr": f"*{dtype}",
        "values_ptr": f"*{dtype}",
        "mask_ptr": "*fp32",
        "adv_ptr": "*fp32",
        "ret_ptr": "*fp32",
        "T": "i32",
        "stride_r": "i64",
        "stride_v": "i64",
        "stride_m": "i64",
        "stride_out": "i64",
        "gamma": "fp32",
        "gamma_lam": "fp32",
        "BLOCK_T": "constexpr",
    }


COMPILE_CASES = [
    dict(kernel=gae_fwd_kernel, signature=_signature(dtype), constexprs={"BLOCK_T": block_t}, num_warps=num_warps)
    for dtype in ("fp32", "bf16")
    for block_t, num_warps in GAE_CONFIGS
]
