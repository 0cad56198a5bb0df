"""Shared plumbing for every op: backend choice and argument validation.

Every public op takes ``backend="auto" | "triton" | "cuda" | "torch" | "reference"``.
``auto`` reads ``ALIGNKERNELS_BACKEND`` first, then picks Triton for CUDA tensors and the
chunked PyTorch path for anything else. ``triton`` on CPU tensors is allowed only when
``TRITON_INTERPRET=1`` (that is how the tests run the kernels without a GPU).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``backend`` (possibly ``"auto"``) into a concrete backend for tensors on ``device``."""
    if backend == "auto":
        backend = os.environ.get("ALIGNKERNELS_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and (dtype is None or dtype in KERNEL_DTYPES):
            return "triton"
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}. Use backend='torch' or 'auto' on CPU."
            )
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend='triton' supports float16/bfloat16/float32 inputs, got {dtype}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    return backend


def check_tensor(name: str, t, *, floating: bool | None = None, integer: bool = False, ndim_min: int = 0):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def labels_checking_enabled(check_labels: bool | None) -> bool:
    if check_labels is not None:
        return bool(check_labels)
    return os.environ.get("ALIGNKERNELS_CHECK_LABELS", "1") not in ("0", "false", "False", "")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "labels"):
    """Raise ValueError if any label is outside ``[0, vocab_size)`` and not ``ignore_index``.

    One fused reduction plus one host sync (``.item()``) per call.
    """
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any().item()):
        idx = bad.nonzero()[0].tolist()
        value = labels[tuple(idx)].item()
        raise ValueError(
            f"{name} must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {value} at position {tuple(idx)}"
        )


def check_temperature(temperature) -> float:
    try:
        temperature = float(temperature.item() if isinstance(temperature, torch.Tensor) else temperature)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"temperature must be a number, got {temperature!r}") from None
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are fp32 for half/single inputs, fp64 for fp64 inputs (so gradcheck works)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(x: torch.Tensor):
    """View ``x[..., V]`` (last dim contiguous) as rows without copying when possible.

    Returns ``(x, n_rows, rows_per_outer, stride_outer, stride_inner)`` where row ``r`` starts at
    element ``(r // rows_per_outer) * stride_outer + (r % rows_per_outer) * stride_inner``.
    Handles contiguous tensors and the common ``logits[:, :-1, :]`` slice; anything else is
    made contiguous (one copy).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    lead = x.shape[:-1]
    n_rows = 1
    for s in lead:
        n_rows *= s
    if x.dim() == 1:
        return x, 1, 1, 0, 0
    if x.dim() == 2:
        return x, n_rows, max(n_rows, 1), 0, x.stride(0)
    # Merge all leading dims but the last one into an "outer" dim if they are mergeable.
    inner = lead[-1]
    outer_dims = list(zip(x.shape[:-2], x.stride()[:-2]))
    mergeable = all(
        outer_dims[i][1] == outer_dims[i + 1][1] * outer_dims[i + 1][0] for i in range(len(outer_dims) - 1)
    )
    if not mergeable:
        x = x.contiguous()
        return x, n_rows, max(n_rows, 1), 0, x.stride(-2)
    stride_outer = outer_dims[-1][1]
    return x, n_rows, max(inner, 1), stride_outer, x.stride(-2)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
