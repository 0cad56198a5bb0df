"""The emulator's own rules, on probe kernels (tests/cuemu/probe): CUDA's shuffle width / segment
rules, votes, barriers over non-exited threads, one shared copy per block, shuffled block order,
and every misuse reported as an error naming the source line, never a hang."""
from __future__ import annotations

import ctypes

import pytest
import torch

from cuemu import emulator

PROBE = emulator.HERE / "probe"


class Probe:
    """The probe kernels' module, called through its C entry point (errors come back as RuntimeError)."""

    def __init__(self, path):
        self.lib = emulator.runtime_of(path)
        self.lib.cuemu_probe.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint, ctypes.c_uint,
                                         ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
        self.emulated = emulator.Emulated(None, path, self.lib)  # its guarded-memory helpers

    def run(self, name, out, blocks, threads):
        error = ctypes.create_string_buffer(4096)
        if self.lib.cuemu_probe(name.encode(), out, blocks, threads, error, len(error)):
            raise RuntimeError(error.value.decode())

    def set_seed(self, seed):
        self.lib.cuemu_set_seed(seed)

    def device(self, t):
        return self.emulated.device(t)

    def free_device(self):
        self.emulated.free_device()


@pytest.fixture(scope="module")
def probe():
    try:
        sources = {p.name: p.read_text() for p in PROBE.iterdir() if p.suffix in (".cu", ".cpp")}
        return Probe(emulator.build(sources, origin="tests/cuemu/probe"))
    except emulator.EmulatorUnavailable as exc:
        pytest.skip(str(exc))


def run(probe, name, blocks=1, threads=64, n=None, dtype=torch.int32):
    out = torch.full((n or blocks * threads * 6,), -7, dtype=dtype)
    probe.run(name, out.data_ptr(), blocks, threads)
    return out


def test_shuffle_width_segment_and_vote_rules(probe):
    out = run(probe, "shuffle_rules", threads=64).view(2, 32, 6)
    lane = torch.arange(32)
    seg16, seg8, seg4 = lane // 16 * 16, lane // 8 * 8, lane // 4 * 4
    xor = lane ^ 3
    expected = torch.stack([
        torch.where(xor < seg8 + 8, xor, lane),
        torch.where(lane + 5 < seg16 + 16, lane + 5, lane),
        torch.where(lane - 2 >= seg4, lane - 2, lane),
        (seg16 + 1) * 10,
        torch.full((32,), sum(1 << l for l in range(0, 32, 3))),  # lanes 0, 3, ..., 30
        torch.full((32,), 3),
    ], dim=1).to(torch.int64)  # fmt: skip
    for warp in range(2):
        assert torch.equal(out[warp].long(), expected), out[warp]


@pytest.mark.parametrize("name,message", [
    ("exited_lane", r"__shfl_xor_sync at tests/cuemu/probe/probe.cu:\d+ with mask 0xffffffff: lane 5 of warp 0 (has exited|exited instead of joining it)"),
    ("outside_mask", r"__shfl_sync at tests/cuemu/probe/probe.cu:\d+: lane 0 of warp 0 reads lane 20, which is outside the mask 0x0000ffff"),
    ("different_intrinsics", r"lanes of warp [01] meet different warp intrinsics: __shfl_(xor|down)_sync"),
    ("barrier_vs_shuffle", r"lane 8 of warp 1 waits at __syncthreads|deadlock|lane 8 of warp 1 waits at __syncthreads"),
    ("two_barriers", r"threads of one block wait at different __syncthreads: tests/cuemu/probe/probe.cu:\d+ and"),
])  # fmt: skip
def test_misuse_is_an_error_naming_the_line(probe, name, message):
    with pytest.raises(RuntimeError, match=message) as info:
        run(probe, name)
    assert "cuemu: kernel launched at tests/cuemu/probe/probe.cu" in str(info.value)


def test_invalid_launch_configuration_reaches_the_host_code(probe):
    with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
        run(probe, "early_exit_barrier", threads=2048, n=64)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
        run(probe, "early_exit_barrier", blocks=0, n=64)


def test_launch_bounds_are_enforced(probe):
    run(probe, "bounded", threads=64, n=64)
    with pytest.raises(RuntimeError, match=r"a block of 128 threads exceeds __launch_bounds__\(64\)"):
        run(probe, "bounded", threads=128, n=128)


def test_read_past_the_end_of_guarded_memory_is_an_error(probe):
    out = probe.device(torch.zeros(64, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="thread 63: out-of-bounds access 0 bytes past the end of a 256-byte buffer"):
        probe.run("read_past_end", out.data_ptr(), 1, 64)
    probe.run("read_past_end", out.data_ptr(), 1, 63)  # in bounds
    probe.free_device()


def test_barrier_counts_only_threads_that_have_not_exited(probe):
    out = run(probe, "early_exit_barrier", threads=64, n=64)
    assert torch.equal(out[:40], torch.arange(39, -1, -1, dtype=torch.int32))
    assert (out[40:] == -7).all()


def test_shared_memory_is_one_copy_per_block_filled_with_poison(probe):
    out = run(probe, "shared_per_block", blocks=5, threads=64, n=10, dtype=torch.float32).view(5, 2)
    assert torch.isnan(out[:, 0]).all(), "a read before the block's first write sees 0xff bytes"
    assert torch.equal(out[:, 1], torch.arange(5, dtype=torch.float32))


def test_blocks_run_in_a_seeded_shuffled_order(probe):
    orders = []
    for seed in (1, 1, 2):
        probe.set_seed(seed)
        orders.append(run(probe, "block_order", blocks=8, threads=32, n=16))
    assert sorted(orders[0].tolist()) == list(range(16))
    assert orders[0].tolist() != list(range(16))
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_free_schedule_gives_the_same_answers(probe, monkeypatch):
    monkeypatch.setenv("CUEMU_SCHEDULE", "free")
    out = run(probe, "early_exit_barrier", threads=64, n=64)
    assert torch.equal(out[:40], torch.arange(39, -1, -1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="lane 5 of warp 0 (has exited|exited)"):
        run(probe, "exited_lane")


# A stand-in for the CUDA runtime that a CUDA build of torch loads with global symbols: same names as
# the emulator's runtime, every call a failure ("no CUDA-capable device", as on a CPU machine).
STANDIN_CUDART = r"""
#include <stdint.h>
static const char* msg = "stand-in libcudart: no CUDA-capable device is detected";
int cudaGetDevice(int* d) { *d = -1; return 100; }
int cudaSetDevice(int d) { return 100; }
int cudaGetLastError(void) { return 100; }
int cudaPeekAtLastError(void) { return 100; }
const char* cudaGetErrorName(int e) { return "cudaErrorNoDevice"; }
const char* cudaGetErrorString(int e) { return msg; }
"""

ISOLATION_CHILD = r"""
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)  # first, with global symbols, as torch's libcudart
sys.path.insert(0, sys.argv[2])
import torch
from alignkernels import _cuda_backend, _utils, token_logprobs
from cuemu import emulator
emu = emulator.load(emulator.build())
_utils.allow_cuda_backend_on_cpu(True)
_cuda_backend.install_emulated_extension(emu.module)
logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
labels = torch.tensor([0, 17, 49])
got = token_logprobs(logits, labels, backend="cuda")
want = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
print("max_abs_err", (got.double() - want).abs().max().item())
"""


def test_emulator_is_isolated_from_a_loaded_cuda_runtime(emulated_build, tmp_path):
    """With a CUDA runtime's symbols already global in the process (a CUDA build of torch), the emulated
    module still calls its own runtime: only ``PyInit_*`` and ``cuemu_*`` leave the module."""
    import shutil
    import subprocess
    import sys

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in CUDA runtime")
    (tmp_path / "cudart.c").write_text(STANDIN_CUDART)
    standin = tmp_path / "libcudart_standin.so"
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "cudart.c"), "-o", str(standin)], check=True)
    proc = subprocess.run([sys.executable, "-c", ISOLATION_CHILD, str(standin), str(emulator.HERE.parent)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("max_abs_err")[-1]) < 1e-5, proc.stdout
    nm = shutil.which("nm")
    if nm:
        exported = subprocess.run([nm, "-D", "--defined-only", str(emulated_build.path)], capture_output=True,
                                  text=True, check=True).stdout.split()  # fmt: skip
        assert not [s for s in exported if s.startswith("cuda")], "the emulator exports CUDA runtime names"
