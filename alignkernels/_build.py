"""Build and load the CUDA extension ``alignkernels._C`` (sources in ``csrc/``).

``load_extension()`` returns the module:

1. ``alignkernels._C`` if it is importable (built by ``setup.py`` with
   ``ALIGNKERNELS_BUILD_CUDA=1``);
2. else the copy cached under ``${ALIGNKERNELS_CACHE_DIR:-~/.cache/alignkernels}/<key>/``, where
   ``<key>`` hashes the sources, the compile flags, the GPU targets, nvcc and the Python ABI;
3. else it builds that copy first (``build.ninja`` driving nvcc for the kernels and the host
   compiler for the pybind11 bindings, linked with the static CUDA runtime).

Concurrency: eight training ranks starting at once build once. The build runs under a file lock
(``filelock``) in a private temporary folder, and the finished module is moved into place with
an atomic rename, so a reader sees either no module or a complete one, never a half-written
file. An interrupted build (Ctrl-C, a killed rank) leaves only its temporary folder, which the
next builder deletes; a failed build leaves ``build-failed.log`` so the ranks that waited for it
report the failure instead of each compiling again.

Environment:
- ``ALIGNKERNELS_CUDA_ARCHS``: GPU targets, default ``"80;90+PTX"`` (SASS for sm_80 and sm_90,
  plus compute_90 PTX that newer GPUs JIT-compile). Accepts ``80``, ``8.0``, ``sm_80``, ``90a``,
  ``9.0+PTX``, separated by ``;``, ``,`` or spaces.
- ``ALIGNKERNELS_CACHE_DIR``: cache root. ``ALIGNKERNELS_NVCC`` / ``CUDA_HOME``: which nvcc.
- ``ALIGNKERNELS_BUILD_VERBOSE=1``: echo the build commands and compiler output.

This module imports neither torch nor the rest of the package (``setup.py`` loads it by path).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MODULE_NAME = "alignkernels._C"
DEFAULT_ARCHS = "80;90+PTX"
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
_PACKAGE_DIR = Path(__file__).resolve().parent
LOCK_TIMEOUT_S = float(os.environ.get("ALIGNKERNELS_BUILD_LOCK_TIMEOUT", "1800"))

_loaded = None  # the module, once loaded in this process


class ExtensionBuildError(RuntimeError):
    """The CUDA extension could not be built (no nvcc, a compiler error, ...)."""


# ---------------------------------------------------------------------------------------------
# Locating the toolchain and the sources
# ---------------------------------------------------------------------------------------------
def find_csrc() -> Path:
    """The ``csrc/`` folder: next to the package in a source checkout / editable install, or
    inside the package when installed from a wheel that ships it."""
    for candidate in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise ExtensionBuildError(
        f"CUDA sources (csrc/) not found next to {_PACKAGE_DIR}; install alignkernels from a source "
        "checkout (pip install -e .) to build the CUDA extension"
    )


def source_files(csrc: Path) -> list[Path]:
    return sorted(p for p in csrc.iterdir() if p.suffix in (".cu", ".cpp", ".cuh", ".h"))


def find_nvcc() -> str | None:
    explicit = os.environ.get("ALIGNKERNELS_NVCC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_cuda_include(nvcc: str | None = None) -> Path | None:
    """The CUDA toolkit's include folder (``cuda_runtime.h``, ``cuda_bf16.h``, ...) next to nvcc."""
    nvcc = nvcc or find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc is not None:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    homes.append("/usr/local/cuda")  # e.g. nvcc on PATH is a wrapper script elsewhere
    for home in filter(None, homes):
        for candidate in (Path(home) / "include", Path(home) / "targets" / "x86_64-linux" / "include"):
            if (candidate / "cuda_runtime.h").is_file():
                return candidate
    return None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the `ninja` PyPI package ships its binary inside the module
        import ninja  # type: ignore

        candidate = Path(ninja.BIN_DIR) / "ninja"
        return str(candidate) if candidate.is_file() else None
    except Exception:
        return None


def find_cxx() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise ExtensionBuildError("no host C++ compiler found (set CXX)")


def parse_archs(spec: str | None = None) -> list[tuple[str, bool]]:
    """``"80;90+PTX"`` -> ``[("80", False), ("90", True)]`` (arch number, also embed PTX)."""
    spec = spec if spec is not None else os.environ.get("ALIGNKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([a-z]?)(\+ptx)?", token.lower())
        if not m:
            raise ExtensionBuildError(
                f"ALIGNKERNELS_CUDA_ARCHS: cannot parse {token!r} (examples: '80', '8.0', 'sm_90', '90a', '9.0+PTX')"
            )
        number = m.group(1) + (m.group(2) or "") + m.group(3)
        archs.append((number, m.group(4) is not None))
    if not archs:
        raise ExtensionBuildError(f"ALIGNKERNELS_CUDA_ARCHS={spec!r} names no GPU target")
    return archs


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for number, ptx in archs:
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


def archs_label(archs: list[tuple[str, bool]]) -> str:
    parts = []
    for number, ptx in archs:
        parts.append(f"sm_{number}")
        if ptx:
            parts.append(f"compute_{number}")
    return ";".join(parts)


def covers(archs: list[tuple[str, bool]], capability: tuple[int, int]) -> bool:
    """Whether a device of compute ``capability`` can run a build for ``archs``: SASS sm_XY runs
    on X.y with y >= Y (not on arch-specific ``a`` targets of another chip); PTX compute_XY is
    JIT-compiled on any device >= X.Y."""
    major, minor = capability
    for number, ptx in archs:
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if ptx and (major, minor) >= (arch_major, arch_minor):
            return True
        if digits == number and major == arch_major and minor >= arch_minor:
            return True
        if digits != number and (major, minor) == (arch_major, arch_minor):
            return True
    return False


def _python_include() -> str:
    return sysconfig.get_paths()["include"]


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - pybind11 is a build requirement
        raise ExtensionBuildError("pybind11 is needed to build the CUDA extension: pip install pybind11") from exc
    return pybind11.get_include()


# ---------------------------------------------------------------------------------------------
# The build plan: compile + link commands, written as build.ninja (or run one by one)
# ---------------------------------------------------------------------------------------------
@dataclass
class BuildStep:
    output: Path
    inputs: list[Path]
    command: list[str]
    rule: str


@dataclass
class BuildPlan:
    steps: list[BuildStep] = field(default_factory=list)
    output: Path | None = None


def make_plan(build_dir: Path, output: Path, *, archs=None, nvcc: str | None = None, cxx: str | None = None,
              csrc: Path | None = None, debug: bool = False) -> BuildPlan:
    """Commands that build ``output`` (the extension module) from ``csrc/`` inside ``build_dir``."""
    csrc = csrc or find_csrc()
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise ExtensionBuildError(
            "nvcc not found (set CUDA_HOME or ALIGNKERNELS_NVCC, or put nvcc on PATH) -- "
            "the CUDA backend needs it once to build its extension"
        )
    cxx = cxx or find_cxx()
    archs = parse_archs(archs) if not isinstance(archs, list) else archs
    opt = ["-O0", "-g"] if debug else ["-O3"]
    includes = [f"-I{csrc}"]
    nvcc_flags = [
        "-std=c++17", *opt, "--threads", "2", "--expt-relaxed-constexpr",
        "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        f"-DALIGNKERNELS_ARCHS=\"{archs_label(archs)}\"", *gencode_flags(archs), *includes,
    ]
    cxx_flags = [
        "-std=c++17", *opt, "-fPIC", "-fvisibility=hidden", *includes,
        f"-I{_pybind11_include()}", f"-I{_python_include()}",
    ]
    plan = BuildPlan(output=output)
    objects = []
    for src in source_files(csrc):
        if src.suffix not in (".cu", ".cpp"):
            continue
        obj = build_dir / (src.stem + (".cu.o" if src.suffix == ".cu" else ".o"))
        if src.suffix == ".cu":
            cmd = [nvcc, *nvcc_flags, "-c", str(src), "-o", str(obj)]
            rule = "nvcc"
        else:
            cmd = [cxx, *cxx_flags, "-c", str(src), "-o", str(obj)]
            rule = "cxx"
        plan.steps.append(BuildStep(obj, [src], cmd, rule))
        objects.append(obj)
    # nvcc drives the link so the static CUDA runtime (and its -lrt -lpthread -ldl) comes along;
    # static: the module needs no libcudart.so at import and no GPU until the first launch.
    link = [nvcc, "-shared", "-cudart", "static", *map(str, objects), "-o", str(output)]
    plan.steps.append(BuildStep(output, objects, link, "link"))
    return plan


def write_ninja(plan: BuildPlan, path: Path) -> None:
    lines = ["ninja_required_version = 1.3", ""]
    for rule in sorted({s.rule for s in plan.steps}):
        lines += [f"rule {rule}", "  command = $cmd", f"  description = {rule.upper()} $out", ""]
    for step in plan.steps:
        esc = lambda p: str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
        lines.append(f"build {esc(step.output)}: {step.rule} {' '.join(esc(i) for i in step.inputs)}")
        lines.append(f"  cmd = {shlex.join(step.command).replace('$', '$$')}")
    path.write_text("\n".join(lines) + "\n")


def _verbose() -> bool:
    return os.environ.get("ALIGNKERNELS_BUILD_VERBOSE", "0") not in ("", "0")


def run_plan(plan: BuildPlan, build_dir: Path, *, verbose: bool | None = None) -> None:
    verbose = _verbose() if verbose is None else verbose
    build_dir.mkdir(parents=True, exist_ok=True)
    ninja = find_ninja()
    if ninja:
        write_ninja(plan, build_dir / "build.ninja")
        commands = [[ninja, "-C", str(build_dir)] + (["-v"] if verbose else [])]
    else:  # same commands, one after the other
        commands = [step.command for step in plan.steps]
    for cmd in commands:
        if verbose:
            print("[alignkernels build]", shlex.join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, cwd=build_dir, capture_output=not verbose, text=True)
        if proc.returncode != 0:
            log = ((proc.stdout or "") + (proc.stderr or ""))[-6000:]
            raise ExtensionBuildError(f"building the CUDA extension failed ({shlex.join(cmd[:3])} ...):\n{log}")
    if plan.output is None or not plan.output.is_file():
        raise ExtensionBuildError(f"the build finished without producing {plan.output}")


def compile_extension(output: Path, *, build_dir: Path | None = None, archs=None, verbose: bool | None = None,
                      debug: bool = False) -> Path:
    """Compile ``csrc/`` into the extension module file ``output`` (no caching, no lock).
    Used by ``setup.py`` and as the default builder of ``load_extension``."""
    output = Path(output).resolve()
    build_dir = Path(build_dir or output.parent / "build").resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    run_plan(make_plan(build_dir, output, archs=archs, debug=debug), build_dir, verbose=verbose)
    return output


# ---------------------------------------------------------------------------------------------
# Cache, lock, atomic publish
# ---------------------------------------------------------------------------------------------
def cache_root() -> Path:
    root = os.environ.get("ALIGNKERNELS_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "alignkernels"


def build_key(archs=None, extra: str = "") -> str:
    """Hash of everything the built module depends on: sources, flags, nvcc, Python ABI."""
    h = hashlib.sha256()
    try:
        csrc = find_csrc()
        for src in source_files(csrc):
            h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    except ExtensionBuildError:
        h.update(b"no-csrc")
    h.update(archs_label(parse_archs(archs) if not isinstance(archs, list) else archs).encode())
    nvcc = find_nvcc()
    if nvcc:
        st = Path(nvcc).resolve().stat()
        h.update(f"{Path(nvcc).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    try:
        import pybind11

        h.update(pybind11.__version__.encode())
    except ImportError:
        pass
    h.update(f"{sys.implementation.cache_tag}:{EXT_SUFFIX}:{sys.platform}:{extra}".encode())
    h.update(Path(__file__).read_bytes())  # the build recipe itself
    return h.hexdigest()[:20]


Builder = Callable[[Path, Path], None]


def _default_builder(archs) -> Builder:
    def build(build_dir: Path, output: Path) -> None:
        label = archs_label(parse_archs(archs) if not isinstance(archs, list) else archs)
        print(f"alignkernels: compiling the CUDA extension for {label} into {build_dir.parent} "
              "(once per source version; about a minute)", file=sys.stderr)  # fmt: skip
        compile_extension(output, build_dir=build_dir, archs=archs)

    return build


def _import_from(path: Path, register: bool = True):
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the CUDA extension from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if register:
        sys.modules[MODULE_NAME] = module
    return module


def cached_module_path(cache_dir: Path | None = None, archs=None, key: str | None = None) -> Path:
    """Where the module built for ``archs`` is cached; ``key`` replaces the default hash (other
    builders of ``_C``, e.g. the CPU emulator in ``tests/cuemu``, hash their own inputs)."""
    return (Path(cache_dir) if cache_dir else cache_root()) / (key or build_key(archs)) / f"_C{EXT_SUFFIX}"


def build_cached(cache_dir: Path | None = None, *, archs=None, builder: Builder | None = None,
                 lock_timeout: float | None = None, key: str | None = None) -> tuple[Path, bool]:
    """Make sure the cached module exists; returns ``(path, built_here)``.

    ``builder(build_dir, output)`` must create the file ``output`` (default: nvcc via ninja);
    tests inject a stub. At most one process per key runs it; the others wait on the lock and
    then use the result.
    """
    from filelock import FileLock

    artifact = cached_module_path(cache_dir, archs, key)
    if artifact.is_file():
        return artifact, False
    key_dir = artifact.parent
    key_dir.mkdir(parents=True, exist_ok=True)
    failed_log = key_dir / "build-failed.log"
    waited_since = time.time()
    with FileLock(str(key_dir / "build.lock"), timeout=LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout):
        if artifact.is_file():  # another process built it while we waited
            return artifact, False
        if failed_log.is_file() and failed_log.stat().st_mtime >= waited_since - 1.0:
            raise ExtensionBuildError(
                f"building the CUDA extension failed moments ago; not retrying now (log: {failed_log}):\n"
                + failed_log.read_text()[-3000:]
            )
        # Holding the lock, no other build of this key is running: leftovers are stale.
        for stale in key_dir.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = key_dir / f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp_dir.mkdir()
        tmp_out = tmp_dir / artifact.name
        try:
            (builder or _default_builder(archs))(tmp_dir, tmp_out)
            if not tmp_out.is_file() or tmp_out.stat().st_size == 0:
                raise ExtensionBuildError(f"the build produced no module at {tmp_out}")
            os.replace(tmp_out, artifact)  # atomic: readers see no file or the whole file
        except BaseException as exc:
            if isinstance(exc, Exception):
                failed_log.write_text(f"{type(exc).__name__}: {exc}\n")
            raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        failed_log.unlink(missing_ok=True)
    return artifact, True


def load_extension(*, prefer_installed: bool = True, cache_dir: Path | None = None, archs=None,
                   builder: Builder | None = None):
    """Return the ``alignkernels._C`` module, building it on first use (see module docstring).

    Raises ``ExtensionBuildError`` with the reason (no nvcc, compiler output) when it can be
    neither imported nor built.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if prefer_installed:
        try:
            _loaded = importlib.import_module(MODULE_NAME)
            return _loaded
        except ImportError:
            pass
    path, _ = build_cached(cache_dir, archs=archs, builder=builder)
    _loaded = _import_from(path)
    return _loaded
