"""The CUDA C++ backend (``csrc/`` -> ``alignkernels._C``), its build and its Python side.

Without a GPU (CI): the sources compile with nvcc for sm_80 and sm_90 (one real build per test
session, ``built_extension``; with ``ALIGNKERNELS_CUDA_ARCHS`` set, as ``bench/gpu_session.sh`` sets it
after its build phase, the cached build for those targets instead), the module imports in a fresh process with no GPU and no
libcudart, the cache lock lets exactly one of several processes build while all of them get a
valid module (stub compile step), interrupted / failed builds leave nothing that passes for a
module, and the Python side rejects bad tensors before any pointer reaches C++.
With a GPU (``gpu`` marker): CUDA results and gradients match the eager reference and the Triton
backend, plus gather_last and GAE against plain PyTorch.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch

from alignkernels import _build, _cuda_backend

HAS_CUDA = torch.cuda.is_available()
NVCC = _build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# One real nvcc build per session (default targets: sm_80, sm_90 + compute_90 PTX), or the one the
# GPU session's build phase made
# ---------------------------------------------------------------------------------------------
def extension_under_test(fresh_cache: Path) -> tuple[Path, bool, str]:
    """``(module path, built here, targets)`` of the extension the tests use. With
    ``ALIGNKERNELS_CUDA_ARCHS`` set (``bench/gpu_session.sh`` sets it to the GPU's arch, and its
    build phase has then built that into the user cache): that cached build, reused (built there
    only if missing). Otherwise a fresh build for the default targets in ``fresh_cache``."""
    archs = os.environ.get("ALIGNKERNELS_CUDA_ARCHS")
    if archs:
        path, built = _build.build_cached(None, archs=archs)
        return path, built, archs
    path, built = _build.build_cached(fresh_cache, archs=_build.DEFAULT_ARCHS)
    return path, built, _build.DEFAULT_ARCHS


@pytest.fixture(scope="session")
def built_extension(tmp_path_factory):
    """The extension of ``extension_under_test``, loaded; the CUDA backend then uses it."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA extension cannot be compiled here")
    start = time.perf_counter()
    path, built, archs = extension_under_test(tmp_path_factory.mktemp("alignkernels_cache"))
    seconds = time.perf_counter() - start
    print(f"\n[test_cuda_ext] alignkernels._C for {archs}: {'built' if built else 'reused'} in {seconds:.1f} s")
    assert path.is_file()
    module = _build._import_from(path, register=False)
    previous = _build._loaded
    _build._loaded = module  # _cuda_backend.extension() now returns this build
    yield path, module
    _build._loaded = previous


def expected_archs_label() -> str:
    return _build.archs_label(_build.parse_archs(os.environ.get("ALIGNKERNELS_CUDA_ARCHS") or _build.DEFAULT_ARCHS))


@needs_nvcc
def test_sources_compile_for_sm80_sm90_and_module_imports(built_extension):
    path, ext = built_extension
    for name in ("token_logprobs_forward", "token_logprobs_backward", "gather_last", "gae"):
        assert callable(getattr(ext, name)), name
    assert ext.compiled_archs() == expected_archs_label()
    assert ext.cuda_runtime_version() >= 11000
    assert (ext.FLOAT32, ext.FLOAT16, ext.BFLOAT16, ext.INT32, ext.INT64) == (0, 1, 2, 0, 1)
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", "--list-ptx", str(path)], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
        for target in expected_archs_label().split(";"):
            assert target.replace("compute_", "sm_") in listing, (target, listing)


def test_tests_reuse_the_gpu_sessions_build(tmp_path, monkeypatch, stub_module):
    """With ``ALIGNKERNELS_CUDA_ARCHS`` set, the tests take the module the session's build phase put in
    the cache for those targets: no second build (it cost 37 s for three targets inside the tests' limit)."""
    monkeypatch.setenv("ALIGNKERNELS_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setenv("ALIGNKERNELS_CUDA_ARCHS", "90")
    session_build, built = _build.build_cached(None, archs="90", builder=_copy_builder(stub_module))
    assert built

    def no_second_build(archs):
        raise AssertionError(f"the tests built the extension again (for {archs})")

    monkeypatch.setattr(_build, "_default_builder", no_second_build)
    path, built, archs = extension_under_test(tmp_path / "fresh")
    assert (path, built, archs) == (session_build, False, "90")
    monkeypatch.delenv("ALIGNKERNELS_CUDA_ARCHS")  # without it: a fresh build for the default targets
    with pytest.raises(AssertionError, match="built the extension again"):
        extension_under_test(tmp_path / "fresh")


@needs_nvcc
def test_module_imports_in_fresh_process_without_gpu_runtime(built_extension):
    """No libcudart.so dependency (static runtime) and no device touched at import."""
    path, _ = built_extension
    code = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("alignkernels._C", {str(path)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        print(m.compiled_archs())
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected_archs_label()
    ldd = shutil.which("ldd")
    if ldd:
        deps = subprocess.run([ldd, str(path)], capture_output=True, text=True).stdout
        assert "libcudart" not in deps and "libtorch" not in deps and "libc10" not in deps, deps


@needs_nvcc
@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised when no GPU is present")
def test_launch_without_gpu_raises_runtime_error(built_extension):
    _, ext = built_extension
    with pytest.raises(RuntimeError, match="cudaGetDevice"):
        ext.gae(0, 0, 0, 0, 0, 1, 4, 1.0, 0.95, 0, 0)


def test_parse_archs():
    assert _build.parse_archs("80;90+PTX") == [("80", False), ("90", True)]
    assert _build.parse_archs("8.0, sm_90a 10.0+ptx") == [("80", False), ("90a", False), ("100", True)]
    flags = _build.gencode_flags(_build.parse_archs("80;90+PTX"))
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                     "-gencode", "arch=compute_90,code=compute_90"]  # fmt: skip
    with pytest.raises(_build.ExtensionBuildError, match="cannot parse"):
        _build.parse_archs("ampere")
    with pytest.raises(_build.ExtensionBuildError, match="no GPU target"):
        _build.parse_archs(" ; ")


def test_covers():
    default = _build.parse_archs(_build.DEFAULT_ARCHS)
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert _build.covers(default, capability), capability
    assert not _build.covers(default, (7, 5))
    assert not _build.covers(_build.parse_archs("90a"), (10, 0)) and _build.covers(_build.parse_archs("90a"), (9, 0))
    assert not _build.covers(_build.parse_archs("80"), (9, 0))


def test_build_plan_and_ninja_file(tmp_path):
    plan = _build.make_plan(tmp_path, tmp_path / "_C.so", archs="80;90", nvcc="/opt/cuda/bin/nvcc", cxx="g++")
    by_rule = {}
    for step in plan.steps:
        by_rule.setdefault(step.rule, []).append(step)
    assert {s.inputs[0].name for s in by_rule["nvcc"]} == {p.name for p in (REPO / "csrc").glob("*.cu")}
    assert [s.inputs[0].name for s in by_rule["cxx"]] == ["bindings.cpp"]
    for step in by_rule["nvcc"]:
        cmd = " ".join(step.command)
        assert "arch=compute_80,code=sm_80" in cmd and "arch=compute_90,code=sm_90" in cmd
    link = by_rule["link"][0].command
    assert link[:4] == ["/opt/cuda/bin/nvcc", "-shared", "-cudart", "static"]
    _build.write_ninja(plan, tmp_path / "build.ninja")
    text = (tmp_path / "build.ninja").read_text()
    assert text.count("\nbuild ") == len(plan.steps) and "rule link" in text


@pytest.mark.parametrize("use_ninja", [True, False])
def test_run_plan_with_and_without_ninja(tmp_path, monkeypatch, use_ninja):
    """The same plan runs through build.ninja or, without ninja, command by command."""
    if use_ninja and _build.find_ninja() is None:
        pytest.skip("ninja not installed")
    if not use_ninja:
        monkeypatch.setattr(_build, "find_ninja", lambda: None)
    src, obj, out = tmp_path / "a b.txt", tmp_path / "obj:1.o", tmp_path / "_C.so"  # odd characters
    src.write_text("kernel")
    plan = _build.BuildPlan(output=out)
    upper = ["sh", "-c", 'tr a-z A-Z < "$0" > "$1"', str(src), str(obj)]
    plan.steps.append(_build.BuildStep(obj, [src], upper, "nvcc"))
    plan.steps.append(_build.BuildStep(out, [obj], ["cp", str(obj), str(out)], "link"))
    _build.run_plan(plan, tmp_path / "build", verbose=False)
    assert out.read_text() == "KERNEL"
    assert (tmp_path / "build" / "build.ninja").is_file() == use_ninja
    failing = _build.BuildPlan(output=tmp_path / "never.so")
    fail = ["sh", "-c", "echo 'error: boom' >&2; exit 3"]
    failing.steps.append(_build.BuildStep(tmp_path / "never.so", [src], fail, "nvcc"))
    with pytest.raises(_build.ExtensionBuildError, match="boom"):
        _build.run_plan(failing, tmp_path / "build2", verbose=False)


def test_build_key_tracks_sources_and_targets(tmp_path, monkeypatch):
    key = _build.build_key("80;90")
    assert key == _build.build_key("80;90") and key != _build.build_key("80")
    fake = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", fake)
    monkeypatch.setattr(_build, "find_csrc", lambda: fake)
    assert _build.build_key("80;90") == key
    (fake / "gae.cu").write_text((fake / "gae.cu").read_text() + "\n// changed\n")
    assert _build.build_key("80;90") != key


# ---------------------------------------------------------------------------------------------
# Cache + lock with a stub compile step (no nvcc needed)
# ---------------------------------------------------------------------------------------------
STUB_MODULE_C = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject* answer(PyObject* self, PyObject* args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "42"}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
"""


@pytest.fixture(scope="module")
def stub_module(tmp_path_factory):
    """A tiny real extension module named ``_C`` that the stub compile step 'produces'."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub extension module")
    d = tmp_path_factory.mktemp("stub")
    (d / "stub.c").write_text(STUB_MODULE_C)
    out = d / f"_C{_build.EXT_SUFFIX}"
    include = sysconfig.get_paths()["include"]
    subprocess.run([cc, "-shared", "-fPIC", f"-I{include}", str(d / "stub.c"), "-o", str(out)], check=True)
    return out


CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from alignkernels import _build

    cache, stub, log, start_at = sys.argv[1:5]

    def stub_builder(build_dir, output):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        data = Path(stub).read_bytes()
        with open(output, "wb") as f:  # written slowly, in two halves
            f.write(data[: len(data) // 2]); f.flush(); time.sleep(0.3); f.write(data[len(data) // 2 :])

    while time.time() < float(start_at):
        time.sleep(0.005)
    path, built = _build.build_cached(Path(cache), archs="80;90", builder=stub_builder)
    module = _build._import_from(path, register=False)
    print(json.dumps({"built": built, "answer": module.answer(), "path": str(path)}))
    """
)


def test_concurrent_processes_build_once_and_all_load(tmp_path, stub_module):
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    n = 4
    start_at = time.time() + 3.0  # every child is up and waiting before the first one starts
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(stub_module), str(log), str(start_at)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        for _ in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(log.read_text().split()) == 1, "the compile step must run exactly once"
    assert sum(r["built"] for r in results) == 1
    assert all(r["answer"] == 42 for r in results)
    assert len({r["path"] for r in results}) == 1
    key_dir = Path(results[0]["path"]).parent
    assert not list(key_dir.glob("tmp-*")), "temporary build folders must be removed"


def _copy_builder(stub):
    def build(build_dir, output):
        shutil.copyfile(stub, output)

    return build


def test_interrupted_build_leaves_nothing_that_passes_for_a_module(tmp_path, stub_module):
    def interrupted(build_dir, output):
        output.write_bytes(stub_module.read_bytes()[:1000])  # half-written module
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build.build_cached(tmp_path, archs="80;90", builder=interrupted)
    artifact = _build.cached_module_path(tmp_path, "80;90")
    assert not artifact.exists()
    assert not list(artifact.parent.glob("tmp-*"))
    # A build killed outright (kill -9) leaves its temporary folder: the next builder removes it.
    stale = artifact.parent / "tmp-12345-deadbeef"
    stale.mkdir()
    (stale / artifact.name).write_bytes(b"\x7fELF truncated")
    path, built = _build.build_cached(tmp_path, archs="80;90", builder=_copy_builder(stub_module))
    assert built and path == artifact and not stale.exists()
    assert _build._import_from(path, register=False).answer() == 42
    # Once published, nobody rebuilds.
    path2, built2 = _build.build_cached(tmp_path, archs="80;90", builder=lambda b, o: pytest.fail("rebuilt"))
    assert path2 == path and not built2


def test_failed_build_is_reported_not_repeated(tmp_path, stub_module):
    def broken(build_dir, output):
        raise _build.ExtensionBuildError("nvcc: fatal error: kernel.cu: boom")

    with pytest.raises(_build.ExtensionBuildError, match="boom"):
        _build.build_cached(tmp_path, archs="80;90", builder=broken)
    artifact = _build.cached_module_path(tmp_path, "80;90")
    assert not artifact.exists()
    failed_log = artifact.parent / "build-failed.log"
    assert "boom" in failed_log.read_text()
    # A rank that was waiting on the lock during that failure gets the error without rebuilding.
    with pytest.raises(_build.ExtensionBuildError, match="failed moments ago"):
        _build.build_cached(tmp_path, archs="80;90", builder=lambda b, o: pytest.fail("rebuilt"))
    # A later attempt (the failure is older than its wait) builds again.
    old = time.time() - 60
    os.utime(failed_log, (old, old))
    path, built = _build.build_cached(tmp_path, archs="80;90", builder=_copy_builder(stub_module))
    assert built and path.is_file() and not failed_log.exists()


def test_missing_nvcc_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKERNELS_NVCC", str(tmp_path / "no-such-nvcc"))
    with pytest.raises(_build.ExtensionBuildError, match="nvcc not found"):
        _build.build_cached(tmp_path, archs="80")
    # ... and the backend turns it into a RuntimeError that says what to do.
    monkeypatch.setattr(_build, "_loaded", None)
    monkeypatch.setattr(_build, "load_extension", lambda archs=None: _build.build_cached(tmp_path, archs="80"))
    with pytest.raises(RuntimeError, match="ALIGNKERNELS_BUILD_CUDA=1"):
        _cuda_backend.extension()


def test_setup_py_is_pure_python_by_default():
    """``pip install -e .`` must stay fast: no extension unless ALIGNKERNELS_BUILD_CUDA asks."""
    code = (
        "import setuptools; setuptools.setup = lambda **kw: print(len(kw['ext_modules'])); "
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})"
    )
    for value, expected in (("", "0"), ("0", "0"), ("1", "1")):
        env = dict(os.environ, ALIGNKERNELS_BUILD_CUDA=value)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected


# ---------------------------------------------------------------------------------------------
# Python-side validation (before any pointer reaches C++); runs without GPU and extension
# ---------------------------------------------------------------------------------------------
def _logits(shape=(2, 3, 11), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def test_token_logprobs_validation():
    logits, labels = _logits(), torch.zeros(6, dtype=torch.int64)
    fwd = _cuda_backend.token_logprobs_forward
    with pytest.raises(ValueError, match="CUDA tensors: logits is on cpu"):
        fwd(logits, labels, 1.0, -100)
    with pytest.raises(TypeError, match="logits must have dtype float32, float16, bfloat16"):
        fwd(logits.double(), labels, 1.0, -100)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        fwd(logits, labels.float(), 1.0, -100)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        fwd(logits.transpose(1, 2), torch.zeros(2 * 11, dtype=torch.int64), 1.0, -100)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        fwd(logits, torch.zeros(5, dtype=torch.int64), 1.0, -100)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        fwd(logits, torch.zeros(2, 3, dtype=torch.int64), 1.0, -100)
    with pytest.raises(ValueError, match="labels must be contiguous"):
        fwd(logits, torch.zeros(12, dtype=torch.int64)[::2], 1.0, -100)
    with pytest.raises(ValueError, match="V > 0"):
        fwd(torch.zeros(3, 0), torch.zeros(3, dtype=torch.int64), 1.0, -100)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fwd(logits.numpy(), labels, 1.0, -100)


def test_token_logprobs_backward_validation():
    logits, labels = _logits(), torch.zeros(6, dtype=torch.int64)
    mx, ls, ent, g = torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6)
    bwd = _cuda_backend.token_logprobs_backward
    with pytest.raises(TypeError, match="row_max must be torch.float32"):
        bwd(logits, labels, mx.half(), ls, ent, g, None, 1.0, -100)
    with pytest.raises(ValueError, match=r"log_sum must have shape \(6,\)"):
        bwd(logits, labels, mx, torch.zeros(5), ent, g, None, 1.0, -100)
    with pytest.raises(ValueError, match=r"entropy must have shape \(6,\)"):
        bwd(logits, labels, mx, ls, torch.zeros(7), g, None, 1.0, -100)
    with pytest.raises(ValueError, match="grad_logp must have 6 elements"):
        bwd(logits, labels, mx, ls, ent, torch.ones(5), None, 1.0, -100)
    with pytest.raises(TypeError, match="grad_entropy must have dtype"):
        bwd(logits, labels, mx, ls, ent, None, torch.ones(6, dtype=torch.int32), 1.0, -100)
    with pytest.raises(ValueError, match="CUDA tensors: logits is on cpu"):
        bwd(logits, labels, mx, ls, ent, g, None, 1.0, -100)


def test_gather_last_and_gae_validation():
    x, idx = torch.randn(3, 5, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"index must have shape \(3,\)"):
        _cuda_backend.gather_last_cuda(x, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        _cuda_backend.gather_last_cuda(x, idx.float())
    with pytest.raises(ValueError, match="contiguous feature dims"):
        _cuda_backend.gather_last_cuda(torch.randn(3, 5, 4, 2).transpose(2, 3), idx)
    with pytest.raises(ValueError, match=r"x must be \[B, T, ...\]"):
        _cuda_backend.gather_last_cuda(torch.randn(3), idx)
    with pytest.raises(ValueError, match="CUDA tensors: x is on cpu"):
        _cuda_backend.gather_last_cuda(x, idx)
    r, v, m = torch.randn(2, 6), torch.randn(2, 6), torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"values must have the shape of rewards \(2, 6\)"):
        _cuda_backend.gae_cuda(r, torch.randn(2, 5), m)
    with pytest.raises(ValueError, match=r"rewards must be \[B, T\]"):
        _cuda_backend.gae_cuda(torch.randn(12), v, m)
    with pytest.raises(TypeError, match="values must have dtype"):
        _cuda_backend.gae_cuda(r, v.double(), m)
    with pytest.raises(ValueError, match="CUDA tensors: rewards is on cpu"):
        _cuda_backend.gae_cuda(r, v, m)


def test_extension_is_called_by_keyword(monkeypatch):
    """Every call into _C names its arguments (pybind names), so swapped addresses cannot bind."""
    calls = {}

    class Recorder:
        def __getattr__(self, name):
            def record(*args, **kwargs):
                calls[name] = (args, kwargs)

            return record

    monkeypatch.setattr(_cuda_backend, "_ready", lambda device: (Recorder(), 0))
    monkeypatch.setattr(_cuda_backend, "_check_cuda_devices", lambda **t: torch.device("cpu"))
    monkeypatch.setattr(_cuda_backend, "_on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_cuda_backend, "_device_index", lambda device: 0)
    logits, labels = _logits(), torch.zeros(6, dtype=torch.int64)
    _, mx, ls, ent = _cuda_backend.token_logprobs_forward(logits, labels, 1.0, -100)
    _cuda_backend.token_logprobs_backward(logits, labels, mx, ls, ent, torch.ones(6), None, 1.0, -100)
    _cuda_backend.gather_last_cuda(torch.randn(3, 5, 4), torch.zeros(3, dtype=torch.int64))
    _cuda_backend.gae_cuda(torch.randn(2, 6), torch.randn(2, 6), torch.ones(2, 6))
    assert set(calls) == {"token_logprobs_forward", "token_logprobs_backward", "gather_last", "gae"}
    bindings = (REPO / "csrc" / "bindings.cpp").read_text()
    for name, (args, kwargs) in calls.items():
        assert args == (), f"{name} called with positional arguments"
        declared = bindings[bindings.index(f'm.def("{name}"'):].split(";")[0]
        assert list(kwargs) == re.findall(r'"(\w+)"_a', declared), name


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised when no GPU is present")
def test_no_gpu_gives_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        _cuda_backend._ready(torch.device("cuda", 0))
    assert _cuda_backend.is_available() is False


def test_public_op_rejects_cpu_tensors_for_cuda_backend():
    from alignkernels import token_logprobs

    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        token_logprobs(_logits(), torch.zeros(2, 3, dtype=torch.int64), backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU: numbers and gradients vs the eager reference and the Triton backend
# ---------------------------------------------------------------------------------------------
# Same tolerances as tests/test_token_logprobs.py: values vs the fp64 reference; gradients (written
# in the logits' dtype) relative to the gradient's scale.
VALUE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2e-5), torch.float16: (1e-5, 2e-5)}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 4e-3), torch.float16: (2e-3, 1e-3)}
# (leading shape, V, slice the sequence like logits[:, :-1]): the token_logprobs test shapes + a
# strided slice with an odd V (rows misaligned for 16-byte loads) and Qwen's 152064 vocabulary.
SHAPES = [((1,), 7, False), ((5,), 1000, False), ((2, 3), 50257, False), ((3,), 4096, False),
          ((2,), 4097, False), ((4, 5), 300, False), ((3, 17), 2051, True), ((2, 6), 50257, True),
          ((5,), 152064, False)]  # fmt: skip


def _case(lead, V, sliced, dtype, labels_dtype=torch.int64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (*lead[:-1], lead[-1] + 1, V) if sliced else (*lead, V)
    logits = (torch.randn(shape, device="cuda", generator=g) * 3).to(dtype)
    if sliced:
        logits = logits[..., :-1, :]  # strided rows, read in place
    labels = torch.randint(0, V, lead, device="cuda", generator=g)
    labels.view(-1)[::3] = -100  # ignored rows
    return logits, labels.to(labels_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,V,sliced", SHAPES)
def test_cuda_matches_reference_and_triton(built_extension, lead, V, sliced, dtype):
    from alignkernels import token_logprobs
    from alignkernels.reference import token_logprobs_reference

    logits, labels = _case(lead, V, sliced, dtype, torch.int32 if V % 2 else torch.int64)
    g_logp = torch.randn(lead, device="cuda")
    g_ent = torch.randn(lead, device="cuda")
    results = {}
    for backend in ("cuda", "triton", "reference"):
        x = logits.detach().requires_grad_(True)  # a sliced view stays strided
        if backend == "reference":  # the truth: eager, in fp64
            logp, ent = token_logprobs_reference(x.double(), labels, temperature=0.7, return_entropy=True)
        else:
            logp, ent = token_logprobs(x, labels, temperature=0.7, return_entropy=True, backend=backend)
        (logp * g_logp + ent * g_ent).sum().backward()
        results[backend] = (logp.float(), ent.float(), x.grad.float())
    rtol, atol = VALUE_TOL[dtype]
    grad_rtol, grad_atol = GRAD_TOL[dtype]
    scale = results["reference"][2].abs().max().item() or 1.0
    for other in ("reference", "triton"):
        cu, ot = results["cuda"], results[other]
        torch.testing.assert_close(cu[0], ot[0], rtol=rtol, atol=atol, msg=lambda m: f"logp vs {other}: {m}")
        torch.testing.assert_close(cu[1], ot[1], rtol=rtol, atol=atol, msg=lambda m: f"entropy vs {other}: {m}")
        torch.testing.assert_close(cu[2], ot[2], rtol=grad_rtol, atol=grad_atol * scale,
                                   msg=lambda m: f"grad vs {other}: {m}")  # fmt: skip
    ignored = labels == -100
    assert (results["cuda"][0][ignored] == 0).all() and (results["cuda"][1][ignored] == 0).all()
    assert (results["cuda"][2][ignored] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_cuda_backward_one_output(built_extension, which):
    logits, labels = _case((3, 40), 3001, False, torch.float32)
    lp, mx, ls, ent = _cuda_backend.token_logprobs_forward(logits, labels.reshape(-1), 1.3, -100)
    g = torch.randn(lp.shape, device="cuda")
    args = (g, None) if which == "logp" else (None, g)
    grad = _cuda_backend.token_logprobs_backward(logits, labels.reshape(-1), mx, ls, ent, *args, 1.3, -100)
    x = logits.detach().requires_grad_(True)
    from alignkernels.reference import token_logprobs_reference

    ref_lp, ref_ent = token_logprobs_reference(x, labels, temperature=1.3, return_entropy=True)
    ((ref_lp if which == "logp" else ref_ent).reshape(-1) * g).sum().backward()
    torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_out_of_range_label_gives_nan_and_fully_ignored_rows(built_extension):
    logits = torch.randn(4, 100, device="cuda")
    labels = torch.tensor([3, 100, -5, -100], device="cuda")
    lp, mx, ls, ent = _cuda_backend.token_logprobs_forward(logits, labels, 1.0, -100)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2]) and lp[3] == 0
    assert torch.isfinite(ent[:3]).all() and ent[3] == 0 and mx[3] == 0 and ls[3] == 0
    all_ignored = torch.full((4,), -100, device="cuda")
    lp, mx, ls, ent = _cuda_backend.token_logprobs_forward(logits, all_ignored, 1.0, -100)
    grad = _cuda_backend.token_logprobs_backward(logits, all_ignored, mx, ls, ent, torch.ones(4, device="cuda"),
                                                 torch.ones(4, device="cuda"), 1.0, -100)  # fmt: skip
    assert (lp == 0).all() and (ent == 0).all() and (grad == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_gather_last_cuda(built_extension, dtype):
    x = (torch.randn(5, 13, 7, 3, device="cuda") * 100).to(dtype)
    for view in (x, x[:, 1:]):  # contiguous and strided sequence dim
        idx = torch.randint(0, view.shape[1], (5,), device="cuda")
        expected = view[torch.arange(5, device="cuda"), idx]
        assert torch.equal(_cuda_backend.gather_last_cuda(view, idx.int()), expected)
    idx = torch.tensor([0, 12, 13, -1, 5], device="cuda")
    out = _cuda_backend.gather_last_cuda(x, idx)
    assert torch.equal(out[[0, 1, 4]], x[[0, 1, 4], idx[[0, 1, 4]]])
    if dtype.is_floating_point:
        assert torch.isnan(out[[2, 3]].float()).all()
    else:
        assert (out[[2, 3]] == 0).all()
    with pytest.raises(ValueError, match=r"index must be in \[0, 13\)"):
        _cuda_backend.gather_last_cuda(x, idx, check_index=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(1, 1), (3, 37), (4, 1024), (2, 2100), (8, 8192)])
def test_gae_cuda_matches_reference(built_extension, B, T):
    from alignkernels.reference import gae_reference

    g = torch.Generator(device="cuda").manual_seed(T)
    rewards = torch.randn(B, T, device="cuda", generator=g)
    values = torch.randn(B, T, device="cuda", generator=g)
    lengths = torch.randint(0, T + 1, (B,), device="cuda", generator=g)
    mask = torch.arange(T, device="cuda")[None] < lengths[:, None]  # right padding
    mask &= torch.rand(B, T, device="cuda", generator=g) > 0.25  # holes (tool outputs)
    mask[0] = True
    for gamma, lam in ((1.0, 0.95), (0.99, 0.0), (0.9, 1.0)):
        adv, ret = _cuda_backend.gae_cuda(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
        torch.testing.assert_close(adv.double(), ref_adv, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ret.double(), ref_ret, atol=1e-4, rtol=1e-4)
    # bf16 inputs and a strided view: same numbers as fp32 math on the same values
    big = torch.randn(B, T + 3, device="cuda", generator=g).bfloat16()
    adv, ret = _cuda_backend.gae_cuda(big[:, :T], values.bfloat16(), mask.int(), 1.0, 0.95)
    ref_adv, ref_ret = gae_reference(big[:, :T].float(), values.bfloat16().float(), mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, ref_adv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret, ref_ret, atol=1e-4, rtol=1e-4)
