"""Build ``csrc/`` (or a changed copy of it) into a host-only ``alignkernels._C`` on the emulator.

Pipeline: every file of the source folder is copied into a generated folder through
``rewrite_source`` (launch syntax and ``__shared__`` declarations, line numbers kept, ``#line``
names the original file so compiler and emulator messages point at ``csrc/``); each ``.cu`` is
compiled by g++ as C++17 with ``-include cuemu.h`` against the CUDA toolkit's host headers; the
untouched ``bindings.cpp`` with pybind11; ``runtime.cpp`` once; all linked into ``_C.so``.

Cache: object files by a hash of (compiler, flags, translation unit, every header), the module by
the hash of its objects, under ``${ALIGNKERNELS_CACHE_DIR:-~/.cache/alignkernels}/cuemu/`` through
``alignkernels._build.build_cached`` (file lock, atomic publish). So a mutant of one kernel file
recompiles only that file, and an unchanged checkout builds nothing.

Symbol isolation: the module exports only ``PyInit_*`` (the pybind entry point) and ``cuemu_*`` (the
control functions reached with ctypes); everything else, the runtime's ``cudaGetDevice``,
``cudaGetLastError``, ... included, is bound inside the module at link time (``EXPORTS``, a linker
version script). Without it, in a process that already holds a CUDA runtime (a CUDA build of torch
loads ``libcudart`` with global symbols), the kernels' host code called that runtime instead of the
emulator's and every emulated test failed. ``tests/cuemu/test_emulator.py`` loads a stand-in
``libcudart`` first to prove it.

Sanitizers: ``CUEMU_SANITIZE=asan`` (AddressSanitizer + UBSan) or ``tsan`` (ThreadSanitizer)
builds an instrumented module; the Python process must then preload the sanitizer runtime, so
``run_sanitized`` re-runs pytest in a subprocess with ``LD_PRELOAD`` set.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkernels import _build

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
SANITIZERS = {
    "": [],
    "asan": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"],
    "tsan": ["-fsanitize=thread"],
}


# Linker version script: what the module exports (see "Symbol isolation" above).
EXPORTS = "{\n  global: PyInit_*; cuemu_*;\n  local: *;\n};\n"


class EmulatorUnavailable(RuntimeError):
    """g++ or the CUDA host headers are missing: the emulated tests skip with this reason."""


# ---------------------------------------------------------------------------------------------
# Source rewrite (same line count; only `<<<`, `>>>` and `__shared__` declarations change)
# ---------------------------------------------------------------------------------------------
_SHARED_DECL = re.compile(r"__shared__\s+(?P<type>[A-Za-z_][\w:<>]*)\s+(?P<decls>[^;{}()]+);")
_DECLARATOR = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(\[[^\]]+\]\s*)*)$")


def _rewrite_shared(match: re.Match) -> str:
    names = []
    for decl in match.group("decls").split(","):
        m = _DECLARATOR.match(decl)
        if m is None or not m.group("dims"):
            raise ValueError(f"cuemu: unsupported __shared__ declaration {match.group(0)!r} (sized arrays only)")
        names.append(m.group("name"))
    # One static copy (blocks run one at a time), re-filled with 0xff bytes for each block.
    init = " ".join(f"::cuemu::shared_block_init({n}, sizeof({n}));" for n in names)
    return f"static {match.group('type')} {match.group('decls')}; {init}"


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start] == "("``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("cuemu: unbalanced parentheses")


def _rewrite_launch_bounds(text: str, original: str) -> str:
    """``__launch_bounds__(N)`` is kept as a check at the top of the kernel body (a launch with
    more threads fails on a GPU: too many resources requested)."""
    out, pos = [], 0
    while (at := text.find("__launch_bounds__", pos)) >= 0:
        open_paren = text.index("(", at)
        close = _balanced(text, open_paren)
        bound = text[open_paren + 1 : close - 1]
        params = text.index("(", close)
        body = text.index("{", _balanced(text, params))
        out += [text[pos:at], " " * (close - at), text[close : body + 1],
                f" ::cuemu::check_launch_bounds(({bound}), __FILE__, __LINE__);"]  # fmt: skip
        pos = body + 1
    return "".join(out) + text[pos:]


def rewrite_source(text: str, original: str) -> str:
    """The emulator's copy of one csrc file: ``K<<<cfg>>>(args)`` becomes
    ``K ->* ::cuemu::LaunchConfig(cfg)(args)``; each ``__shared__`` array becomes a static plus a
    per-block initialisation; ``__launch_bounds__(N)`` a check at the top of the kernel body.
    Everything stays on its line; ``#line 1`` names the original."""
    if "extern __shared__" in text:
        raise ValueError(f"cuemu: dynamic shared memory (extern __shared__) in {original} is not emulated")
    out = text.replace("<<<", " ->* ::cuemu::LaunchConfig(").replace(">>>", ")")
    out = _SHARED_DECL.sub(_rewrite_shared, out)
    out = _rewrite_launch_bounds(out, original)
    if "__shared__" in out:
        line = out[: out.index("__shared__")].count("\n") + 1
        raise ValueError(f"cuemu: cannot rewrite the __shared__ declaration at {original}:{line}")
    assert out.count("\n") == text.count("\n")
    return f'#line 1 "{original}"\n' + out


# ---------------------------------------------------------------------------------------------
# Toolchain
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Toolchain:
    cxx: str
    cuda_include: Path
    sanitize: str

    def version(self) -> str:
        out = subprocess.run([self.cxx, "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else self.cxx


def toolchain(sanitize: str | None = None) -> Toolchain:
    sanitize = os.environ.get("CUEMU_SANITIZE", "") if sanitize is None else sanitize
    if sanitize not in SANITIZERS:
        raise ValueError(f"CUEMU_SANITIZE must be one of {sorted(SANITIZERS)}, got {sanitize!r}")
    cxx = shutil.which(os.environ.get("CUEMU_CXX", "g++"))
    if cxx is None:
        raise EmulatorUnavailable("g++ not found (set CUEMU_CXX): the CUDA emulator cannot build csrc/")
    include = _build.find_cuda_include()
    if include is None:
        raise EmulatorUnavailable("CUDA host headers (cuda_runtime.h, cuda_bf16.h) not found next to nvcc "
                                  "(set CUDA_HOME): the CUDA emulator cannot build csrc/")  # fmt: skip
    try:
        import pybind11  # noqa: F401
    except ImportError as exc:
        raise EmulatorUnavailable("pybind11 is not installed: the emulator cannot build bindings.cpp") from exc
    return Toolchain(cxx, include, sanitize)


def _flags(tc: Toolchain) -> list[str]:
    # -O0: the kernels' template instantiations compile ~40% faster, and the emulated run time is
    # dominated by thread hand-offs, not arithmetic. Sanitized builds use -O1 (their usual level).
    opt = ["-O1", "-g"] if tc.sanitize else ["-O0", "-g"]
    return ["-std=c++17", *opt, "-fPIC", "-pthread", "-w", *SANITIZERS[tc.sanitize],
            f"-DCUEMU_STACK_KB={4096 if tc.sanitize else 512}"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _included(name: str, sources: dict[str, str]) -> list[str]:
    """The local headers ``name`` includes, transitively, as "name\0text" (its object's key): a
    change to one header recompiles only the files that include it."""
    seen, todo = {}, [name]
    while todo:
        for inc in _INCLUDE.findall(sources.get(todo.pop(), "")):
            if inc in sources and inc not in seen:
                seen[inc] = sources[inc]
                todo.append(inc)
    return [f"{n}\0{t}" for n, t in sorted(seen.items())]


def cache_dir() -> Path:
    return _build.cache_root() / "cuemu"


def _compile(cmd: list[str], obj: Path) -> None:
    if obj.is_file():
        return
    tmp = obj.with_suffix(f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.o")
    proc = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise _build.ExtensionBuildError(f"cuemu: compiling failed: {' '.join(cmd[-3:])}\n{proc.stderr[-6000:]}")
    os.replace(tmp, obj)


def build(sources: dict[str, str] | None = None, *, sanitize: str | None = None, origin: str = "csrc") -> Path:
    """Build the emulated module from ``sources`` (file name -> text; default: ``csrc/`` as is,
    ``origin`` names their folder in messages) and return its path. Cached: nothing is compiled
    twice for the same inputs."""
    tc = toolchain(sanitize)
    if sources is None:
        sources = {p.name: p.read_text() for p in _build.source_files(CSRC)}
    import pybind11

    flags = _flags(tc)
    key_common = (tc.version(), " ".join(flags), tc.cuda_include, sys.implementation.cache_tag,
                  pybind11.__version__, (HERE / "cuemu.h").read_bytes())  # fmt: skip
    objects_dir = cache_dir() / "objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    gen_key = _digest(*key_common, origin, *(f"{n}\0{t}" for n, t in sorted(sources.items())))
    gen = cache_dir() / "gen" / gen_key
    if not gen.is_dir():
        tmp = gen.with_name(gen.name + f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in sources.items():
            rewritten = text if name.endswith(".cpp") else rewrite_source(text, f"{origin}/{name}")
            (tmp / name).write_text(rewritten)
        try:
            os.replace(tmp, gen)
        except OSError:  # another process published the same folder first
            shutil.rmtree(tmp, ignore_errors=True)
    common = [tc.cxx, *flags, f"-I{gen}", f"-I{HERE}", f"-isystem{tc.cuda_include}"]
    jobs = []  # (command, object)
    for name, text in sorted(sources.items()):
        if name.endswith(".cu"):
            cmd = [*common, "-x", "c++", "-include", str(HERE / "cuemu.h"), "-c", str(gen / name)]
            key = _digest(*key_common, "cu", origin, name, text, *_included(name, sources))
        elif name.endswith(".cpp"):
            cmd = [*common, "-fvisibility=hidden", f"-isystem{pybind11.get_include()}",
                   f"-isystem{sysconfig.get_paths()['include']}", "-c", str(gen / name)]  # fmt: skip
            key = _digest(*key_common, "cpp", name, text, *_included(name, sources))
        else:
            continue
        jobs.append((cmd, objects_dir / f"{Path(name).stem}-{key}.o"))
    runtime_key = _digest(*key_common, (HERE / "runtime.cpp").read_bytes())
    jobs.append(([*common, "-c", str(HERE / "runtime.cpp")], objects_dir / f"runtime-{runtime_key}.o"))
    module_key = "cuemu-" + _digest(*key_common, EXPORTS, *(obj.name for _, obj in jobs))

    def builder(build_dir: Path, output: Path) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for f in [pool.submit(_compile, cmd, obj) for cmd, obj in jobs]:
                f.result()
        exports = build_dir / "exports.map"
        exports.write_text(EXPORTS)
        link = [tc.cxx, "-shared", "-pthread", *SANITIZERS[tc.sanitize], f"-Wl,--version-script={exports}",
                *(str(o) for _, o in jobs), "-o", str(output)]  # fmt: skip
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise _build.ExtensionBuildError(f"cuemu: linking failed\n{proc.stderr[-6000:]}")

    path, _ = _build.build_cached(cache_dir(), builder=builder, key=module_key, lock_timeout=600)
    return path


# ---------------------------------------------------------------------------------------------
# Loading and control
# ---------------------------------------------------------------------------------------------
@dataclass
class Emulated:
    """A loaded emulated ``_C``: the pybind module plus the runtime's control functions."""

    module: object
    path: Path
    runtime: ctypes.CDLL
    _guarded: list = field(default_factory=list)

    def set_seed(self, seed: int) -> None:
        self.runtime.cuemu_set_seed(ctypes.c_uint64(seed))

    def device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (same shape, strides, values) in "device memory": a buffer whose last byte touches
        a PROT_NONE page, so a kernel that reads or writes past the end of it fails its launch with
        "out-of-bounds access". Freed by ``free_device()`` (the ``emulated`` fixture does it)."""
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) if t.numel() else 0
        if span == 0:
            return t.clone()
        nbytes = span * t.element_size()
        addr = self.runtime.cuemu_alloc_guarded(nbytes)
        if not addr:
            raise MemoryError("cuemu_alloc_guarded failed")
        self._guarded.append(addr)
        flat = torch.frombuffer((ctypes.c_char * nbytes).from_address(addr), dtype=t.dtype, count=span)
        flat.copy_(t.as_strided((span,), (1,), t.storage_offset()))
        return flat.as_strided(t.shape, t.stride(), 0)

    def free_device(self) -> None:
        while self._guarded:
            self.runtime.cuemu_free_guarded(ctypes.c_void_p(self._guarded.pop()))

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_uint64 * 3)()
        self.runtime.cuemu_stats(out)
        return {"launches": out[0], "blocks": out[1], "threads": out[2]}


_ACTIVE: list[Emulated] = []  # the build behind backend="cuda" in the running test (conftest sets it)


def device(t: torch.Tensor) -> torch.Tensor:
    """``Emulated.device`` of the active build: ``t`` copied into guarded "device memory"."""
    if not _ACTIVE:
        raise RuntimeError("no emulated build is active (use the `emulated` fixture)")
    return _ACTIVE[-1].device(t)


def activate(emu: Emulated | None) -> None:
    _ACTIVE.clear()
    if emu is not None:
        _ACTIVE.append(emu)


def load(path: Path) -> Emulated:
    # A unique package name per build: CPython / pybind11 hand back the first module loaded under
    # one name ("alignkernels._C") for every later file, so two builds in one process need two names.
    spec = importlib.util.spec_from_file_location(f"cuemu_{path.parent.name.replace('-', '_')}._C", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Emulated(module, path, runtime_of(path))


def runtime_of(path: Path) -> ctypes.CDLL:
    """The runtime's C control functions in a built module (the same loaded image, same state)."""
    runtime = ctypes.CDLL(str(path))
    runtime.cuemu_set_seed.argtypes = [ctypes.c_uint64]
    runtime.cuemu_alloc_guarded.argtypes = [ctypes.c_size_t]
    runtime.cuemu_alloc_guarded.restype = ctypes.c_void_p
    runtime.cuemu_free_guarded.argtypes = [ctypes.c_void_p]
    return runtime


def mutated_sources(file: str, old: str, new: str, count: int = 1) -> dict[str, str]:
    """``csrc/`` with ``old`` replaced by ``new`` in ``file`` (exactly ``count`` occurrences must exist)."""
    sources = {p.name: p.read_text() for p in _build.source_files(CSRC)}
    found = sources[file].count(old)
    if found != count:
        raise AssertionError(f"mutant: expected {count} occurrence(s) of {old!r} in csrc/{file}, found {found}")
    sources[file] = sources[file].replace(old, new)
    return sources
