"""Determinism: with default settings, two runs on the same inputs give bit-identical outputs and
gradients, on every backend (torch, triton -- the interpreter on CPU, the real kernels on a GPU --,
reference), within one process and across processes. The default paths use no float atomics
(checked statically below), so this holds on the GPU as well (GPU-marked test)."""
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import alignkernels as ak
from helpers import HAS_CUDA, TRITON_DEVICE

ROOT = Path(__file__).resolve().parents[1]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else ("cuda" if HAS_CUDA else "cpu")


def _bits_equal(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None:
            assert y is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}[{i}]"
        # bitwise: compare the raw bytes (NaN == NaN, -0 != +0)
        assert torch.equal(x.detach().reshape(-1).view(torch.uint8), y.detach().reshape(-1).view(torch.uint8)), (
            f"{what}[{i}] differs between runs"
        )


def _token_run(backend, dtype=torch.float32, seed=0):
    d = _device(backend)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 7, 5003, generator=g) * 4).to(dtype).to(d)  # V > one 4096 tile
    labels = torch.randint(0, 5003, (3, 6), generator=g)
    labels[0, :2] = -100
    labels = labels.to(d)
    up = torch.randn(2, 3, 6, generator=g).to(d)
    x = logits.clone().requires_grad_()
    logp, ent = ak.token_logprobs(x[:, :-1], labels, temperature=0.9, return_entropy=True, backend=backend)
    ((logp * up[0]).sum() + (ent * up[1]).sum()).backward()
    return logp, ent, x.grad


def _linear_run(backend, seed=0):
    d = _device(backend)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 5, 16, generator=g).to(d).requires_grad_()
    w = (torch.randn(300, 16, generator=g) * 0.3).to(d).requires_grad_()
    b = (torch.randn(300, generator=g) * 0.1).to(d).requires_grad_()
    labels = torch.randint(0, 300, (2, 5), generator=g)
    labels[1, 3:] = -100
    labels = labels.to(d)
    kw = dict(chunk_size=4, vocab_block_size=128) if backend != "reference" else {}  # 2 x 3 tiles
    out = ak.linear_logprobs(h, w, labels, bias=b, return_stats=True, softcap=20.0, temperature=0.8, backend=backend,
                             **kw)  # fmt: skip
    (out.logp.sum() + 0.3 * out.entropy.sum()).backward()
    return (*out, h.grad, w.grad, b.grad)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_logprobs_bit_identical(backend, dtype):
    _bits_equal(_token_run(backend, dtype), _token_run(backend, dtype), f"token_logprobs[{backend}]")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_linear_logprobs_bit_identical(backend):
    _bits_equal(_linear_run(backend), _linear_run(backend), f"linear_logprobs[{backend}]")


def _grpo_run(backend, loss_type, level):
    g = torch.Generator().manual_seed(3)
    d = _device(backend)
    logp = (-torch.rand(4, 33, generator=g) * 3).to(d).requires_grad_()
    old = (logp.detach() + torch.randn(4, 33, generator=g).to(d) * 0.2)
    ref = (logp.detach() + torch.randn(4, 33, generator=g).to(d) * 0.2)
    adv = torch.randn(4, generator=g).to(d)
    mask = (torch.rand(4, 33, generator=g) > 0.2).float().to(d)
    kw = dict(beta=0.04, loss_type=loss_type, importance_sampling_level=level, max_completion_length=33)
    loss, metrics = ak.grpo_loss(logp, old, ref, adv, mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return (loss, grad, *[metrics[k] for k in sorted(metrics)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token")])
def test_grpo_loss_bit_identical(backend, loss_type, level):
    _bits_equal(_grpo_run(backend, loss_type, level), _grpo_run(backend, loss_type, level), f"grpo[{backend}]")


def _small_losses_run(backend):
    g = torch.Generator().manual_seed(5)
    d = _device(backend)
    r, v = torch.randn(3, 40, generator=g).to(d), torch.randn(3, 40, generator=g).to(d)
    m = (torch.rand(3, 40, generator=g) > 0.1).float().to(d)
    adv, ret = ak.gae(r, v, m, gamma=0.99, lam=0.95, whiten=True, backend=backend)
    x = torch.randn(3, 40, 8, generator=g).to(d).requires_grad_()
    pooled = ak.gather_last(x, m, backend=backend if backend != "reference" else "torch")
    (gx,) = torch.autograd.grad(pooled.square().sum(), x)
    return adv, ret, pooled, gx


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gae_and_gather_bit_identical(backend):
    _bits_equal(_small_losses_run(backend), _small_losses_run(backend), f"gae/gather[{backend}]")


def _loss_run():
    g = torch.Generator().manual_seed(7)
    pcs = [(-torch.rand(8, generator=g) * 30).requires_grad_() for _ in range(4)]
    dloss, _ = ak.dpo_loss(*pcs, loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5])
    logp = (-torch.rand(3, 10, generator=g)).requires_grad_()
    ploss, _ = ak.ppo_loss(logp, logp.detach() + 0.1, torch.randn(3, generator=g), torch.ones(3, 10))
    c, r = torch.randn(8, 2, generator=g).requires_grad_(), torch.randn(8, 2, generator=g).requires_grad_()
    bloss, _ = ak.bradley_terry_loss(c, r, center_rewards_coefficient=0.01)
    grads = torch.autograd.grad(dloss + ploss + bloss, [*pcs, logp, c, r])
    return (dloss, ploss, bloss, *grads)


def test_dpo_ppo_bradley_terry_bit_identical():
    _bits_equal(_loss_run(), _loss_run(), "dpo/ppo/bt")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_grpo_bit_identical(backend):
    def run():
        g = torch.Generator().manual_seed(9)
        d = _device(backend)
        h = torch.randn(2, 6, 8, generator=g).to(d).requires_grad_()
        w = (torch.randn(300, 8, generator=g) * 0.4).to(d).requires_grad_()
        ids = torch.randint(0, 300, (2, 6), generator=g).to(d)
        mask = torch.ones(2, 6, device=d)
        mask[1, 4:] = 0
        loss, _ = ak.fused_linear_grpo_loss(h, w, ids, torch.randn(2, generator=g).to(d), mask, chunk_size=4,
                                            backend=backend)  # fmt: skip
        return (loss, *torch.autograd.grad(loss, (h, w)))

    _bits_equal(run(), run(), f"fused_grpo[{backend}]")


_CROSS_PROCESS = textwrap.dedent(
    """
    import hashlib, json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    import helpers  # sets TRITON_INTERPRET=1 without a GPU, before any kernel import
    import test_determinism as t
    out = {}
    for op, run in (("token", t._token_run), ("linear", t._linear_run)):
        for backend in ("torch", "triton"):
            out[op + "-" + backend] = t._digest(run(backend))
    print(json.dumps(out))
    """
)


def _digest(tensors):
    h = hashlib.sha256()
    for x in tensors:
        if x is not None:
            h.update(x.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_bit_identical_across_processes():
    """A fresh interpreter (new allocator state, new thread pool) reproduces the same bits."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", _CROSS_PROCESS, str(ROOT)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=str(ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    here = {
        "token-torch": _digest(_token_run("torch")),
        "token-triton": _digest(_token_run("triton")),
        "linear-torch": _digest(_linear_run("torch")),
        "linear-triton": _digest(_linear_run("triton")),
    }
    assert here == other


def test_default_paths_use_no_float_atomics():
    """Static guard: no Triton atomics in any kernel and no atomicAdd in the CUDA sources, so the
    reduction order (and the bits) never depend on scheduling. A faster atomic mode, if ever added,
    must be opt-in and documented in docs/RELIABILITY.md."""
    offenders = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btl\.atomic_\w+", line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    csrc = ROOT / "csrc"
    for path in sorted(csrc.glob("*.cu*")) if csrc.exists() else []:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\batomic(Add|CAS|Exch)\b", line) and not line.strip().startswith("//"):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, "float atomics in a default path:\n" + "\n".join(offenders)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_bit_identical_real_kernels(dtype):
    """On a real GPU (Triton kernels + cuBLAS tiles): bigger shapes, several runs, same bits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 512, 32000, generator=g).to(dtype).cuda()
    labels = torch.randint(0, 32000, (8, 512), generator=g).cuda()

    def token():
        x = logits.clone().requires_grad_()
        logp, ent = ak.token_logprobs(x, labels, return_entropy=True, backend="triton")
        (logp.sum() + ent.sum()).backward()
        return logp, ent, x.grad

    h = torch.randn(2048, 1024, generator=g).to(dtype).cuda()
    w = (torch.randn(32000, 1024, generator=g) * 0.02).to(dtype).cuda()
    lab = torch.randint(0, 32000, (2048,), generator=g).cuda()

    def linear():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = ak.linear_logprobs(hh, ww, lab, return_entropy=True, backend="triton")
        (logp.sum() + ent.sum()).backward()
        return logp, ent, hh.grad, ww.grad

    ref_t, ref_l = token(), linear()
    for _ in range(2):
        _bits_equal(ref_t, token(), "gpu token_logprobs")
        _bits_equal(ref_l, linear(), "gpu linear_logprobs")
    _bits_equal(_grpo_run("triton", "dapo", "token"), _grpo_run("triton", "dapo", "token"), "gpu grpo")
    _bits_equal(_small_losses_run("triton"), _small_losses_run("triton"), "gpu gae/gather")
