"""The emulator can fail: deliberately broken copies of the kernels, each caught.

Each mutant is ``csrc/`` with one textual change, built like the real module (only the changed
file recompiles: objects are cached by the headers each file includes) and run on a case of the
correct-kernel tests. "Caught" means: wrong numbers against the fp64 reference, or an emulator
error naming the broken intrinsic or the out-of-bounds access (inputs sit in guarded memory
whose end touches a PROT_NONE page).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from alignkernels import _cuda_backend, _utils
from alignkernels.reference import gae_reference, token_logprobs_reference
from cuemu import emulator


def _token_case(rows, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 3
    labels = torch.randint(0, V, (rows,), generator=g)
    return logits, labels


def token_logprobs_agrees(rows, V):
    """True when forward and backward match the fp64 reference (the correct kernels pass this)."""
    logits, labels = _token_case(rows, V)
    logits, labels = emulator.device(logits), emulator.device(labels)
    logp, row_max, log_sum, ent = _cuda_backend.token_logprobs_forward(logits, labels, 1.0, -100)
    g = torch.ones(rows)
    grad = _cuda_backend.token_logprobs_backward(logits, labels, row_max, log_sum, ent, g, g, 1.0, -100)
    x = logits.double().requires_grad_(True)
    ref_logp, ref_ent = token_logprobs_reference(x, labels, return_entropy=True)
    (ref_grad,) = torch.autograd.grad((ref_logp + ref_ent).sum(), x)
    return all(torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5)
               for a, b in ((logp, ref_logp), (ent, ref_ent), (grad, ref_grad)))  # fmt: skip


def gae_agrees(B, T):
    """GAE vs the reference, inputs in guarded memory (a read past their end fails the launch)."""
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[:, T // 2] = 0
    dev = emulator.device
    adv, ret = _cuda_backend.gae_cuda(dev(rewards), dev(values), dev(mask), 0.99, 0.95)
    ref_adv, ref_ret = gae_reference(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    return torch.allclose(adv.double(), ref_adv, atol=1e-4) and torch.allclose(ret.double(), ref_ret, atol=1e-4)


# (id, file, original text, broken text, check that the correct kernels pass, expected error or None)
MUTANTS = [
    ("barrier removed from the block reduction", "softmax.cuh",
     "  __syncthreads();\n  if (warp == 0) {", "  if (warp == 0) {",
     lambda: token_logprobs_agrees(6, 5000), None),
    ("butterfly level skipped", "softmax.cuh",
     "for (int offset = WIDTH / 2; offset > 0; offset >>= 1)", "for (int offset = WIDTH / 2; offset > 1; offset >>= 1)",
     lambda: token_logprobs_agrees(4, 300), None),
    ("lanes leave before the shuffle", "token_logprobs.cu",
     "  OnlineStats st = row_stats_partial<T, THREADS_PER_ROW>(",
     "  if (lane >= V) return;  // lanes without elements leave\n  OnlineStats st = row_stats_partial<T, THREADS_PER_ROW>(",
     lambda: token_logprobs_agrees(3, 20), r"__shfl_xor_sync at csrc/softmax.cuh:\d+ .*(has exited|exited instead)"),
    ("tail loop reads one element past the row", "token_logprobs.cu",
     "for (int64_t i = tail_start + lane; i < V; i += GROUP)", "for (int64_t i = tail_start + lane; i <= V; i += GROUP)",
     lambda: token_logprobs_agrees(4, 1001), r"out-of-bounds access 0 bytes past the end of a 16016-byte buffer"),
    ("GAE scan without its range guard", "gae.cu",
     "valid[j] = t < T && m[t] != 0.f;", "valid[j] = m[t] != 0.f;",
     lambda: gae_agrees(3, 37), r"out-of-bounds access \d+ bytes past the end of a 444-byte buffer"),
]  # fmt: skip


@pytest.fixture(scope="module")
def mutant_builds():
    """All mutants built at once (two at a time: each recompiles one file)."""
    try:
        emulator.toolchain()
    except emulator.EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = pool.map(lambda m: emulator.build(emulator.mutated_sources(m[1], m[2], m[3])), MUTANTS)
        return dict(zip((m[0] for m in MUTANTS), paths))


@pytest.fixture
def on_emulator():
    _utils.allow_cuda_backend_on_cpu(True)
    installed = []
    yield installed
    for emu in installed:
        emu.free_device()
    emulator.activate(None)
    _cuda_backend.install_emulated_extension(None)
    _utils.allow_cuda_backend_on_cpu(False)


def _install(path, installed):
    emu = emulator.load(path)
    emu.set_seed(0)
    _cuda_backend.install_emulated_extension(emu.module)
    emulator.activate(emu)
    installed.append(emu)


@pytest.mark.parametrize("name,file,old,new,agrees,error", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(mutant_builds, on_emulator, name, file, old, new, agrees, error):
    _install(mutant_builds[name], on_emulator)
    if error is None:
        assert not agrees(), f"mutant not caught: {name}"
    else:
        with pytest.raises(RuntimeError, match=error):
            agrees()


def test_the_same_checks_pass_on_the_real_kernels(on_emulator):
    try:
        _install(emulator.build(), on_emulator)
    except emulator.EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    for *_, agrees, _error in MUTANTS:
        assert agrees()
