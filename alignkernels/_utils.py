"""Shared plumbing for every op: backend choice and argument validation.

Every public op takes ``backend="auto" | "triton" | "cuda" | "torch" | "reference"`` and resolves
it with ``OpBackends.resolve`` -- the one dispatch rule, documented there.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_CUDA_ON_CPU = {"allowed": False}


def allow_cuda_backend_on_cpu(allowed: bool) -> None:
    """Let ``backend="cuda"`` take CPU tensors (test infrastructure only: the CUDA execution-model
    emulator in ``tests/cuemu`` runs ``csrc/`` on the host, CPU data pointers standing in for
    device pointers)."""
    _CUDA_ON_CPU["allowed"] = bool(allowed)


def cuda_backend_on_cpu_allowed() -> bool:
    return _CUDA_ON_CPU["allowed"]


def rocm_build() -> bool:
    """True under a ROCm (HIP) build of torch, where AMD GPUs are ``cuda`` devices."""
    return getattr(torch.version, "hip", None) is not None


class OpBackends:
    """The backends one public op has, and the one rule that picks among them.

    Every op declares itself once at module level (``TOKEN_LOGPROBS = OpBackends("token_logprobs",
    ("triton", "cuda", "torch", "reference"))``) and calls ``.resolve(backend, device, dtype)``.

    The rule, for every op:

    1. ``backend`` must be one of ``BACKENDS``; anything else is a ``ValueError``.
    2. ``"auto"`` first reads ``ALIGNKERNELS_BACKEND``. A backend named there is used by every op
       that has it; ops that lack it fall through to step 3 (so ``ALIGNKERNELS_BACKEND=cuda`` moves
       the ops with CUDA kernels and leaves the rest alone).
    3. ``"auto"`` then picks by device: ``triton`` for CUDA tensors of a kernel dtype (fp16 / bf16 /
       fp32) when the op has it, else ``torch``; ``torch`` on any other device; ``reference`` only
       for an op that has nothing else.
    4. An explicit backend the op lacks raises one ``ValueError`` naming the op and the backends it
       has -- never a silent fallback.
    5. ``triton`` needs CUDA tensors (or ``TRITON_INTERPRET=1``, how the tests run kernels on CPU)
       and a kernel dtype; ``cuda`` needs CUDA tensors (or the test emulator, see
       ``allow_cuda_backend_on_cpu``).
    6. Under a ROCm build of torch (``torch.version.hip``; AMD GPUs are ``cuda`` devices there) the
       CUDA C++ extension (``csrc/``, NVIDIA only) is refused by name, explicitly or through
       ``ALIGNKERNELS_BACKEND``, so ``auto`` is Triton on AMD GPUs (compiled for gfx942 / gfx950 in
       ``tests/kernels/test_compile.py``).
    """

    registry: dict[str, "OpBackends"] = {}

    def __init__(self, op: str, backends: tuple[str, ...]):
        unknown = [b for b in backends if b not in BACKENDS or b == "auto"]
        if unknown:
            raise ValueError(f"{op}: unknown backends {unknown}")
        self.op = op
        self.backends = tuple(backends)
        OpBackends.registry[op] = self

    def __repr__(self) -> str:
        return f"OpBackends({self.op!r}, {self.backends})"

    def auto_choice(self, device_type: str, dtype: torch.dtype | None = None) -> str:
        """What ``auto`` picks for tensors on ``device_type`` (without the environment variable)."""
        if device_type == "cuda" and "triton" in self.backends and (dtype is None or dtype in KERNEL_DTYPES):
            return "triton"
        if "torch" in self.backends:
            return "torch"
        return self.backends[0] if self.backends[0] != "triton" or device_type == "cuda" else "reference"

    def resolve(self, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{self.op}: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            env = os.environ.get("ALIGNKERNELS_BACKEND", "auto").strip().lower() or "auto"
            if env not in BACKENDS:
                raise ValueError(f"ALIGNKERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
            if env != "auto" and env in self.backends and self._usable(env, device, dtype):
                return env
            return self.auto_choice(device.type, dtype)
        if backend not in self.backends:
            raise ValueError(
                f"{self.op} has no backend={backend!r}; its backends are {self.backends} (or 'auto')"
            )
        self._check_usable(backend, device, dtype)
        return backend

    def _usable(self, backend, device, dtype) -> bool:
        try:
            self._check_usable(backend, device, dtype)
        except (ValueError, TypeError):
            return False
        return True

    def _check_usable(self, backend, device, dtype) -> None:
        if backend == "triton":
            if device.type != "cuda" and not triton_interpreting():
                raise ValueError(
                    f"{self.op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                    f"tensors); got tensors on {device}. Use backend='torch' or 'auto' on CPU."
                )
            if dtype is not None and dtype not in KERNEL_DTYPES:
                raise TypeError(f"{self.op}: backend='triton' supports float16/bfloat16/float32 inputs, got {dtype}")
        if backend == "cuda" and device.type == "cuda" and rocm_build():
            raise ValueError(
                f"{self.op}: backend='cuda' is the CUDA C++ extension (csrc/, NVIDIA GPUs only), and this is "
                f"a ROCm build of torch (HIP {torch.version.hip}); use backend='triton' or 'auto' on AMD GPUs"
            )
        if backend == "cuda" and device.type != "cuda" and not cuda_backend_on_cpu_allowed():
            raise ValueError(f"{self.op}: backend='cuda' needs CUDA tensors, got tensors on {device}")


def backend_table() -> list[tuple[str, tuple[str, ...], str, str]]:
    """``(op, backends, auto on CUDA, auto on CPU)`` for every declared op (the README's table)."""
    return [(o.op, o.backends, o.auto_choice("cuda"), o.auto_choice("cpu"))
            for o in sorted(OpBackends.registry.values(), key=lambda o: o.op)]  # fmt: skip


def check_tensor(name: str, t, *, floating: bool | None = None, integer: bool = False, ndim_min: int = 0):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (int64, int32, or a narrower integer dtype), got {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")


def widen_labels(name: str, labels) -> torch.Tensor:
    """Check ``labels`` is an integer tensor and return it as int64 (no copy when it already is).

    Every comparison (with ``ignore_index``, with ``[0, V)``) then runs in int64: in a narrow dtype
    ``-100`` wraps (uint8: a valid label 156 would look ignored) and ``V`` may not even be
    representable. Labels of any integer dtype (uint8, int8, int16, int32, int64) behave alike."""
    check_tensor(name, labels, integer=True)
    return labels if labels.dtype == torch.int64 else labels.long()


def refuse_double_backward(op: str, backend: str) -> None:
    """Call first thing in a fused op's ``backward``: grad mode is on there only under
    ``create_graph=True`` (gradient penalties, Hessian-vector products), which the fused kernels do
    not support -- one clear error instead of a silently wrong second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported on backend={backend!r}; "
            f"use backend='reference' (eager autograd) for higher-order gradients"
        )


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

    One fused reduction plus one host sync (``.item()``) per call. Under ``torch.compile`` the check is
    an in-graph ``torch._assert_async`` instead (no host sync, no graph break; it raises a RuntimeError
    with the same message, without the offending value).
    """
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if torch.compiler.is_compiling():
        torch._assert_async(torch.logical_not(bad.any()),
                            f"{name} must be in [0, {vocab_size}) or equal ignore_index={ignore_index}")  # fmt: skip
        return
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


def check_batch_invariant(value) -> bool:
    """``batch_invariant=`` must be a bool (a truthy string or tensor would silently switch modes)."""
    if not isinstance(value, bool):
        raise TypeError(f"batch_invariant must be a bool, got {value!r}")
    return value


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
