"""Python side of the CUDA C++ backend (``csrc/``, built as ``alignkernels._C``).

The extension takes raw device addresses, shapes, strides, dtype codes, the device index and the
CUDA stream handle -- never ``at::Tensor`` -- so it carries no torch ABI. Everything a wrong
pointer could break is therefore checked here first, with errors naming the argument:
device (CUDA, all on one device), dtype, contiguity of what the kernels read linearly, shapes.
Only then is the extension loaded (built on first use, see ``alignkernels._build``) and a GPU
required; both failures raise ``RuntimeError`` saying what is missing.

Kernels launch on ``torch.cuda.current_stream(device)``, so they order correctly with the torch
work around them, CUDA graphs and side streams included. Every call into ``_C`` passes its
arguments by keyword (the pybind names), so two swapped addresses cannot bind and run.

Emulated mode (test infrastructure: ``tests/cuemu/``): after ``_utils.allow_cuda_backend_on_cpu(True)``
and ``install_emulated_extension(module)`` (a host-only ``_C`` built by ``tests/cuemu``), CPU
tensors are accepted, their data pointers stand in for device pointers, and no CUDA device or
stream call is made; the validation and launch arithmetic here are the same code as on a GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import _build
from ._utils import as_rows, cuda_backend_on_cpu_allowed, rocm_build

_FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INDEX_CODES = {torch.int32: 0, torch.int64: 1}

# 8-byte fill pattern used by gather_last for an out-of-range index: the element's NaN repeated
# (floating dtypes), zero bytes otherwise.
_NAN_FILL = {
    torch.float16: 0x7E00_7E00_7E00_7E00,
    torch.bfloat16: 0x7FC0_7FC0_7FC0_7FC0,
    torch.float32: 0x7FC0_0000_7FC0_0000,
    torch.float64: 0x7FF8_0000_0000_0000,
}


_EMULATED = {"module": None}  # a host-only _C from tests/cuemu, used for CPU tensors


# ---------------------------------------------------------------------------------------------
# Extension and device
# ---------------------------------------------------------------------------------------------
def install_emulated_extension(module) -> None:
    """Use ``module`` (a host-built ``_C`` running the kernels on the CUDA emulator of
    ``tests/cuemu``) for CPU tensors while ``_utils.allow_cuda_backend_on_cpu(True)``; ``None``
    removes it. Test infrastructure only."""
    _EMULATED["module"] = module


def _emulated(device: torch.device) -> bool:
    return device.type == "cpu" and cuda_backend_on_cpu_allowed()


def extension():
    """The loaded ``alignkernels._C`` module (built on first use). ``RuntimeError`` if impossible."""
    archs = None
    if not os.environ.get("ALIGNKERNELS_CUDA_ARCHS") and torch.cuda.is_available():
        # A GPU the default targets cannot run (e.g. sm_75) gets its own SASS in the cached build.
        capability = torch.cuda.get_device_capability()
        if not _build.covers(_build.parse_archs(_build.DEFAULT_ARCHS), capability):
            archs = f"{_build.DEFAULT_ARCHS};{capability[0]}{capability[1]}"
    try:
        return _build.load_extension(archs=archs)
    except Exception as exc:  # ExtensionBuildError, ImportError, filelock.Timeout, ...
        raise RuntimeError(
            "backend='cuda' needs the CUDA extension alignkernels._C, which is not built and could not be "
            f"built here: {exc}\nBuild it ahead of time with `ALIGNKERNELS_BUILD_CUDA=1 pip install -e .` "
            "(needs nvcc, pybind11, ninja), or use backend='triton'."
        ) from exc


def is_available() -> bool:
    """True when a CUDA GPU is visible and the extension is importable or buildable here (never under
    a ROCm build of torch: the extension is NVIDIA-only)."""
    if not torch.cuda.is_available() or rocm_build():
        return False
    try:
        extension()
    except RuntimeError:
        return False
    return True


def _ready(device: torch.device):
    """Extension + GPU check, done after argument validation; returns (module, stream handle)."""
    if _emulated(device):
        if _EMULATED["module"] is None:
            raise RuntimeError(
                "backend='cuda' on CPU tensors runs the CUDA emulator: build one with tests/cuemu and pass it to "
                "_cuda_backend.install_emulated_extension"
            )
        return _EMULATED["module"], 0
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' needs a CUDA GPU, and torch.cuda.is_available() is False")
    ext = extension()
    return ext, torch.cuda.current_stream(device).cuda_stream


def _device_index(device: torch.device) -> int:
    if _emulated(device):
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` on a GPU; nothing in emulated mode."""
    return contextlib.nullcontext() if _emulated(device) else torch.cuda.device(device)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_is_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name, t, allowed=tuple(_FLOAT_CODES)):
    _check_is_tensor(name, t)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names} for backend='cuda', got {t.dtype}")


def _check_index(name, t):
    _check_is_tensor(name, t)
    if t.dtype not in _INDEX_CODES:
        raise TypeError(f"{name} must be int32 or int64 for backend='cuda', got {t.dtype}")


def _check_flat(name, t, n, dtype=None):
    """``t`` is a contiguous vector of ``n`` elements (the kernels index it as ``t[row]``)."""
    _check_is_tensor(name, t)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_cuda_devices(**tensors):
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda" and not _emulated(t.device):
            raise ValueError(f"backend='cuda' needs CUDA tensors: {name} is on {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            desc = ", ".join(f"{n} on {x.device}" for n, x in tensors.items() if x is not None)
            raise ValueError(f"all tensors must be on the same CUDA device, got {desc}")
    return device


def _check_logits(logits):
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(
            f"logits must have a contiguous last dimension (stride 1), got strides {tuple(logits.stride())}; "
            "call .contiguous() first"
        )


def _logits_rows(logits):
    # as_rows reads strided leading dims in place (e.g. logits[:, :-1]); it copies only layouts that
    # two strides cannot describe.
    rows, n_rows, rows_per_outer, stride_outer, stride_inner = as_rows(logits)
    return rows, n_rows, max(rows_per_outer, 1), stride_outer, stride_inner


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------
def _check_support(support, n_rows, V):
    """``support`` (the sampler's kept tokens, ``ops/_support.py``): None, or int32 ``[n_rows, ceil(V/32)]``
    with a contiguous last dim. Returns ``(address, row stride)``, ``(0, 0)`` for None."""
    if support is None:
        return 0, 0
    _check_is_tensor("support", support)
    if support.dtype != torch.int32:
        raise TypeError(f"support must be an int32 tensor, got {support.dtype}")
    words = -(-V // 32)
    if tuple(support.shape) != (n_rows, words) or support.stride(-1) != 1:
        raise ValueError(f"support must be [{n_rows}, {words}] with a contiguous last dim, got shape "
                         f"{tuple(support.shape)} strides {support.stride()}")  # fmt: skip
    return support.data_ptr(), support.stride(0)


def token_logprobs_forward(logits, labels, temperature: float, ignore_index: int, support=None):
    """Forward of ``token_logprobs`` on the CUDA kernels.

    Args:
        logits: ``[..., V]`` fp32 / fp16 / bf16 CUDA tensor, last dim contiguous (leading dims may
            be strided, e.g. ``logits[:, :-1]``, read in place).
        labels: contiguous ``[N]`` int32 / int64, ``N = logits.numel() // V``.
        temperature: > 0; the kernels use ``z = logits * (1 / temperature)``.
        ignore_index: label marking rows to skip (their logits are not read).

    Returns:
        ``(logp, row_max, log_sum, entropy)``, fp32 ``[N]``: log-prob of the label
        ``(z_label - row_max) - log_sum``, the row max of ``z``, ``log Σ e^(z - row_max)`` (so
        ``logsumexp = row_max + log_sum``) and the entropy ``log_sum - Σp·(z - row_max)``; all 0 on
        ignored rows; ``logp`` is NaN for a label outside ``[0, V)`` (never an out-of-bounds
        read). Same numbers as the Triton kernels. With ``support`` (int32 ``[N, ceil(V/32)]`` kept-token
        words) the logits outside each row's kept set count as ``-inf``: the renormalised distribution.
    """
    _check_logits(logits)
    V = logits.shape[-1]
    n_rows = logits.numel() // V
    _check_index("labels", labels)
    _check_flat("labels", labels, n_rows)
    support_ptr, support_stride = _check_support(support, n_rows, V)
    device = _check_cuda_devices(logits=logits, labels=labels, support=support)
    temperature = float(temperature)
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    ext, stream = _ready(device)
    rows, n_rows, rows_per_outer, stride_outer, stride_inner = _logits_rows(logits)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    row_max, log_sum, entropy = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
    if n_rows:
        with _on_device(device):
            ext.token_logprobs_forward(
                logits=rows.data_ptr(), logits_dtype=_FLOAT_CODES[rows.dtype],
                labels=labels.data_ptr(), labels_dtype=_INDEX_CODES[labels.dtype],
                logp=logp.data_ptr(), row_max=row_max.data_ptr(), log_sum=log_sum.data_ptr(),
                entropy=entropy.data_ptr(), support=support_ptr, support_stride=support_stride, n_rows=n_rows,
                vocab=V, rows_per_outer=rows_per_outer,
                stride_outer=stride_outer, stride_inner=stride_inner, inv_temperature=1.0 / temperature,
                ignore_index=int(ignore_index), device=_device_index(device), stream=stream,
            )  # fmt: skip
    return logp, row_max, log_sum, entropy


def token_logprobs_backward(logits, labels, row_max, log_sum, entropy, grad_logp, grad_entropy,
                            temperature: float, ignore_index: int, support=None):
    """Backward of ``token_logprobs``: ``grad_logits`` (contiguous, shape and dtype of ``logits``).

    ``dlogits_i = [g_logp (onehot_i - p_i) - g_H p_i (z_i - Σp·z)] / T`` with
    ``p = exp((z - row_max) - log_sum)`` and ``z - Σp·z = (z - row_max) - (log_sum - entropy)``
    (``row_max``, ``log_sum``, ``entropy``: fp32 ``[N]`` from the forward), never from one fp32
    logsumexp. Either upstream gradient may be ``None`` (zero); ignored rows get a zero gradient.
    ``support`` as the forward (zero gradient outside the kept set).
    """
    _check_logits(logits)
    V = logits.shape[-1]
    n_rows = logits.numel() // V
    _check_index("labels", labels)
    _check_flat("labels", labels, n_rows)
    for name, t in (("row_max", row_max), ("log_sum", log_sum), ("entropy", entropy)):
        _check_flat(name, t, n_rows, torch.float32)
    grads = {}
    for name, g in (("grad_logp", grad_logp), ("grad_entropy", grad_entropy)):
        if g is not None:
            _check_float(name, g, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
            if g.numel() != n_rows:
                raise ValueError(f"{name} must have {n_rows} elements, got shape {tuple(g.shape)}")
            g = g.reshape(n_rows).to(torch.float32).contiguous()  # no copy for the usual fp32 [N]
        grads[name] = g
    support_ptr, support_stride = _check_support(support, n_rows, V)
    device = _check_cuda_devices(
        logits=logits, labels=labels, row_max=row_max, log_sum=log_sum, entropy=entropy,
        grad_logp=grads["grad_logp"], grad_entropy=grads["grad_entropy"], support=support,
    )  # fmt: skip
    temperature = float(temperature)
    ext, stream = _ready(device)
    rows, n_rows, rows_per_outer, stride_outer, stride_inner = _logits_rows(logits)
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=device)
    if n_rows:
        g_logp, g_entropy = grads["grad_logp"], grads["grad_entropy"]
        with _on_device(device):
            ext.token_logprobs_backward(
                logits=rows.data_ptr(), logits_dtype=_FLOAT_CODES[rows.dtype],
                labels=labels.data_ptr(), labels_dtype=_INDEX_CODES[labels.dtype],
                row_max=row_max.data_ptr(), log_sum=log_sum.data_ptr(), entropy=entropy.data_ptr(),
                grad_logp=g_logp.data_ptr() if g_logp is not None else 0,
                grad_entropy=g_entropy.data_ptr() if g_entropy is not None else 0,
                grad_logits=grad_logits.data_ptr(), support=support_ptr, support_stride=support_stride,
                n_rows=n_rows, vocab=V, rows_per_outer=rows_per_outer,
                stride_outer=stride_outer, stride_inner=stride_inner, inv_temperature=1.0 / temperature,
                ignore_index=int(ignore_index), device=_device_index(device), stream=stream,
            )  # fmt: skip
    return grad_logits


# ---------------------------------------------------------------------------------------------
# gather_last
# ---------------------------------------------------------------------------------------------
def gather_last_cuda(x: torch.Tensor, index: torch.Tensor, *, check_index: bool = False) -> torch.Tensor:
    """``out[b] = x[b, index[b]]`` for ``x`` of shape ``[B, T, *feature]`` and ``index`` ``[B]``.

    Any dtype of 1, 2, 4 or 8 bytes. Each ``x[b, t]`` must be one contiguous block (the
    feature dims contiguous); the batch and sequence dims may have any strides. ``index`` is
    int32 / int64 in ``[0, T)``; an index outside that range gives a row of NaN (zeros for
    non-floating dtypes) rather than an out-of-bounds read, or a ``ValueError`` with
    ``check_index=True`` (one host sync). Returns a new contiguous ``[B, *feature]`` tensor.
    Forward only: its gradient is a scatter (``grad_x[b, index[b]] = grad_out[b]``).
    """
    _check_is_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...], got shape {tuple(x.shape)}")
    if x.element_size() not in (1, 2, 4, 8) or x.is_complex():
        raise TypeError(f"x must have a 1, 2, 4 or 8-byte real dtype, got {x.dtype}")
    _check_index("index", index)
    B, T = x.shape[0], x.shape[1]
    feature = tuple(x.shape[2:])
    if index.dim() != 1 or index.numel() != B:
        raise ValueError(f"index must have shape ({B},) (one position per row of x), got {tuple(index.shape)}")
    if not index.is_contiguous():
        raise ValueError("index must be contiguous")
    row_elems = 1
    for s in feature:
        row_elems *= s
    expected = 1
    for size, stride in reversed(list(zip(feature, x.stride()[2:]))):
        if size != 1 and stride != expected:
            raise ValueError(
                f"x must have contiguous feature dims (x[b, t] one block), got strides {tuple(x.stride())}; "
                "call .contiguous() first"
            )
        expected *= size
    device = _check_cuda_devices(x=x, index=index)
    if check_index and B and bool(((index < 0) | (index >= T)).any().item()):
        bad = ((index < 0) | (index >= T)).nonzero()[0].item()
        raise ValueError(f"index must be in [0, {T}); found {index[bad].item()} at position {bad}")
    ext, stream = _ready(device)
    out = torch.empty((B, *feature), dtype=x.dtype, device=device)
    if B and row_elems:
        with _on_device(device):
            ext.gather_last(
                x=x.data_ptr(), elem_size=x.element_size(), index=index.data_ptr(),
                index_dtype=_INDEX_CODES[index.dtype], out=out.data_ptr(), batch=B, seq_len=T,
                row_elems=row_elems, stride_batch=x.stride(0), stride_seq=x.stride(1),
                fill_bits=_NAN_FILL.get(x.dtype, 0), device=_device_index(device), stream=stream,
            )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------
def gae_cuda(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
             lam: float = 0.95):
    """Generalised advantage estimation as one reverse-scan kernel (one block per row).

    Same recursion as ``alignkernels.reference.gae_reference`` (verl
    ``compute_gae_advantage_return``; for right padding it equals TRL PPOTrainer's loop, whose
    padded rewards and values are 0). From the end of each ``[B, T]`` row, over positions with
    ``mask != 0``::

        delta_t   = rewards_t + gamma * V_next - values_t
        A_t       = delta_t + gamma * lam * A_next
        returns_t = A_t + values_t

    where ``V_next`` / ``A_next`` belong to the next position with ``mask != 0`` (0 past the
    end). Masked positions are skipped (holes such as tool outputs are bridged) and get
    ``A = returns = 0``. No whitening (the caller does it).

    Args:
        rewards, values: ``[B, T]`` fp32 / fp16 / bf16 CUDA tensors (any strides; math in fp32).
        mask: ``[B, T]`` bool, integer or floating; nonzero marks a trajectory step.
        gamma, lam: discount and GAE lambda.

    Returns:
        ``(advantages, returns)``, fp32 ``[B, T]``, contiguous.
    """
    for name, t in (("rewards", rewards), ("values", values)):
        _check_float(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(t.shape)}")
    _check_is_tensor("mask", mask)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    shape = tuple(rewards.shape)
    for name, t in (("values", values), ("mask", mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of rewards {shape}, got {tuple(t.shape)}")
    device = _check_cuda_devices(rewards=rewards, values=values, mask=mask)
    gamma, lam = float(gamma), float(lam)
    ext, stream = _ready(device)
    # [B, T] is small: one fp32 contiguous copy (no-op when already so) keeps the kernel simple.
    r = rewards.to(torch.float32).contiguous()
    v = values.to(torch.float32).contiguous()
    m = mask.to(torch.float32).contiguous()
    advantages = torch.empty(shape, dtype=torch.float32, device=device)
    returns = torch.empty_like(advantages)
    B, T = shape
    if B and T:
        with _on_device(device):
            ext.gae(
                rewards=r.data_ptr(), values=v.data_ptr(), mask=m.data_ptr(), advantages=advantages.data_ptr(),
                returns=returns.data_ptr(), batch=B, seq_len=T, gamma=gamma, lam=lam,
                device=_device_index(device), stream=stream,
            )  # fmt: skip
    return advantages, returns
