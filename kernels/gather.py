"""Triton kernel for ``gather_last``: find the last real token of a padded row and copy that row
of ``x`` in the same program.

Memory model: one program per batch row reads the row's mask (T bytes, uint8) once and the
selected ``D`` elements of ``x`` once, and writes ``D`` elements plus one int64 index. Total
traffic is ``B·(T + 2·D·b + 8)`` bytes -- the eager alternative (``torch.where`` + ``amax`` +
advanced indexing) launches three kernels and materialises a ``[B, T]`` int64 temporary.

Position rule (same as ``transformers``' ``GenericForSequenceClassification`` and
``alignkernels.ops.gather._rightmost_valid``): ``index = max_t t·valid[t]`` -- the rightmost real
token for left or right padding, 0 for a row with no real token.
Offsets are int64 (B·T·D passes 2^31 for long batches of wide hidden states).
"""
import triton
import triton.language as tl

# (BLOCK_T, BLOCK_D, num_warps): every config the launcher can choose; tests compile each one.
GATHER_LAST_CONFIGS = ((128, 256, 1), (512, 1024, 4), (2048, 4096, 8))


def pick_config(seq_len: int, width: int):
    """Smallest tiles covering both the mask row and the copied row, else the largest."""
    for block_t, block_d, num_warps in GATHER_LAST_CONFIGS:
        if seq_len <= block_t and width <= block_d:
            return block_t, block_d, num_warps
    return GATHER_LAST_CONFIGS[-1]


@triton.jit
def gather_last_fwd_kernel(
    x_ptr,  # [B, T, D] any strides for B and T, D contiguous
    mask_ptr,  # [B, T] uint8, T contiguous (non-zero = real token)
    out_ptr,  # [B, D] out, contiguous, dtype of x
    index_ptr,  # [B] int64 out: the gathered position
    T,
    D,
    stride_xb,
    stride_xt,
    stride_mb,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mask_row = mask_ptr + row * stride_mb
    # index = max_t t * valid[t]   (0 for an all-padding row, as in transformers)
    last = tl.zeros((), tl.int64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = tl.load(mask_row + t, mask=t < T, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(valid, t, 0).to(tl.int64), axis=0))
    tl.store(index_ptr + row, last)

    src = x_ptr + row * stride_xb + last * stride_xt
    dst = out_ptr + row * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_row = d < D
        tl.store(dst + d, tl.load(src + d, mask=in_row), mask=in_row)


COMPILE_CASES = [
    dict(
        kernel=gather_last_fwd_kernel,
        signature={
            "x_ptr": f"*{dt}",
            "mask_ptr": "*u8",
            "out_ptr": f"*{dt}",
            "index_ptr": "*i64",
            "T": "i32",
            "D": "i32",
            "stride_xb": stride_type,
            "stride_xt": "i32",
            "stride_mb": "i32",
            "BLOCK_T": "constexpr",
            "BLOCK_D": "constexpr",
        },
        constexprs={"BLOCK_T": block_t, "BLOCK_D": block_d},
        num_warps=num_warps,
    )
    for dt in ("fp32", "bf16", "fp16")
    for stride_type in ("i32", "i64")
    for block_t, block_d, num_warps in GATHER_LAST_CONFIGS
]
