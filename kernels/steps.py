"""Triton kernel for ``gather_steps``: find the step positions of a segment (a padded row or a
packed sequence) and copy those rows of ``x`` to consecutive output rows, in one program.

Layout: ``x`` is ``[B, T, D]`` (any strides for B and T, D contiguous); a token is addressed by
its flat index ``r = b·T + t``. The step flags are one flat ``uint8`` array over the same ``B·T``
tokens. Segment ``s`` covers tokens ``[seg_start[s], seg_start[s+1])``: ``b·T .. (b+1)·T`` for a
padded row, ``cu_seqlens[s] .. cu_seqlens[s+1]`` for packed sequences (then ``B = 1``). The
launcher computes the number of steps per segment and its exclusive prefix sum ``out_offset``
(that fixes the output size ``P`` and each segment's first output row); the kernel computes each
step's rank inside its segment with a prefix sum over the flags, so step ``j`` of segment ``s``
lands in output row ``out_offset[s] + j`` -- row-major order, the order of
``torch.nonzero(step_mask)``.

Grid ``(S, cdiv(D, BLOCK_D))``. Each program walks its segment in chunks of ``BLOCK_T`` flags
(one 1-D load and one reduction per chunk) and only descends into chunks that hold a step, in
sub-blocks of ``SUB_T`` tokens: a ``[SUB_T, BLOCK_D]`` tile is loaded with the step flags as
the mask, so non-step rows generate no memory traffic.

Memory model: flags are read ``cdiv(D, BLOCK_D)`` times (``B·T`` bytes each, L2-resident after
the first), the ``P`` step rows of ``x`` once (``P·D·b`` bytes), the output written once
(``P·D·b + 8·P`` bytes). An eager per-token head instead reads all ``B·T·D`` elements of ``x``.
Offsets are int64 (``B·T·D`` passes 2^31 for long batches of wide hidden states).
"""
import triton
import triton.language as tl

# (BLOCK_T, SUB_T, BLOCK_D, num_warps): every config the launcher can choose; tests compile each.
GATHER_STEPS_CONFIGS = ((256, 16, 128, 4), (1024, 16, 256, 4), (1024, 16, 512, 8))


def pick_config(width: int):
    """Smallest feature tile covering the row, else the largest (fewest re-scans of the flags)."""
    for config in GATHER_STEPS_CONFIGS:
        if width <= config[2]:
            return config
    return GATHER_STEPS_CONFIGS[-1]


@triton.jit
def gather_steps_fwd_kernel(
    x_ptr,  # [B, T, D] rows to gather, D contiguous
    step_ptr,  # [B*T] uint8, non-zero = step token (flat index r = b*T + t)
    seg_start_ptr,  # [S + 1] int64: segment s = tokens [seg_start[s], seg_start[s+1])
    out_offset_ptr,  # [S] int64: first output row of segment s (exclusive prefix sum of counts)
    out_ptr,  # [P, D] out, contiguous, dtype of x
    index_ptr,  # [P] int64 out: flat token index r of each gathered row
    T,
    D,
    stride_xb,
    stride_xt,
    BLOCK_T: tl.constexpr,
    SUB_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    next_row = tl.load(out_offset_ptr + seg)  # output row of the next step found
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_width = d < D

    for chunk0 in range(start, end, BLOCK_T):
        r = chunk0 + tl.arange(0, BLOCK_T)
        chunk_steps = tl.sum((tl.load(step_ptr + r, mask=r < end, other=0) != 0).to(tl.int32), axis=0)
        if chunk_steps > 0:
            chunk_end = tl.minimum(chunk0 + BLOCK_T, end)
            for sub0 in range(chunk0, chunk_end, SUB_T):
                rs = sub0 + tl.arange(0, SUB_T)
                is_step = tl.load(step_ptr + rs, mask=rs < chunk_end, other=0) != 0
                # rank of each step inside the sub-block (inclusive prefix sum of the flags)
                rank = tl.cumsum(is_step.to(tl.int32), axis=0)
                out_row = next_row + rank.to(tl.int64) - 1
                b = rs // T
                t = rs - b * T
                src = x_ptr + b * stride_xb + t * stride_xt
                tile_mask = is_step[:, None] & in_width[None, :]
                tile = tl.load(src[:, None] + d[None, :], mask=tile_mask)
                tl.store(out_ptr + out_row[:, None] * D + d[None, :], tile, mask=tile_mask)
                if pid_d == 0:
                    tl.store(index_ptr + out_row, rs, mask=is_step)
                next_row += tl.sum(is_step.to(tl.int64), axis=0)


COMPILE_CASES = [
    dict(
        kernel=gather_steps_fwd_kernel,
        signature={
            "x_ptr": f"*{dt}",
            "step_ptr": "*u8",
            "seg_start_ptr": "*i64",
            "out_offset_ptr": "*i64",
            "out_ptr": f"*{dt}",
            "index_ptr": "*i64",
            "T": int_type,
            "D": "i32",
            "stride_xb": int_type,
            "stride_xt": int_type,
            "BLOCK_T": "constexpr",
            "SUB_T": "constexpr",
            "BLOCK_D": "constexpr",
        },
        constexprs={"BLOCK_T": block_t, "SUB_T": sub_t, "BLOCK_D": block_d},
        num_warps=num_warps,
    )
    for dt in ("fp32", "bf16", "fp16")
    for int_type in ("i32", "i64")  # Python ints launch as i32 below 2^31, i64 above
    for block_t, sub_t, block_d, num_warps in GATHER_STEPS_CONFIGS
]
