"""Build script. A plain ``pip install -e .`` is pure Python and fast; it never compiles CUDA.

The optional CUDA C++ extension ``alignkernels._C`` (sources in ``csrc/``) is compiled here only
when asked for with ``ALIGNKERNELS_BUILD_CUDA``:

- unset / ``0``: skip (the CUDA backend then builds the extension on first use into a per-user
  cache, see ``alignkernels/_build.py``);
- ``1``: build, and fail the install if that fails (e.g. no nvcc);
- ``auto``: build when nvcc is found, warn and skip if that build fails.

GPU targets: ``ALIGNKERNELS_CUDA_ARCHS`` (default ``"80;90+PTX"``: sm_80, sm_90 and PTX for
newer GPUs). The recipe is the same as the on-first-use build: ``alignkernels/_build.py``,
loaded by path (the package is not importable while it is being built).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MODE = os.environ.get("ALIGNKERNELS_BUILD_CUDA", "0").strip().lower()


def _load_build_recipe():
    spec = importlib.util.spec_from_file_location("_alignkernels_build", ROOT / "alignkernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


class BuildCudaExtension(build_ext):
    """Builds ``alignkernels._C`` with nvcc (ninja when available) instead of distutils."""

    def build_extension(self, ext):
        recipe = _load_build_recipe()
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "alignkernels_cuda"
        try:
            recipe.compile_extension(output, build_dir=build_dir, archs=os.environ.get("ALIGNKERNELS_CUDA_ARCHS"))
        except Exception as exc:
            if MODE == "auto":
                print(f"alignkernels: skipping the CUDA extension ({exc})", file=sys.stderr)
                return
            raise


def _ext_modules():
    if MODE in ("", "0", "false", "no", "off"):
        return []
    if MODE == "auto":
        if _load_build_recipe().find_nvcc() is None:
            print("alignkernels: nvcc not found, skipping the CUDA extension", file=sys.stderr)
            return []
    elif MODE not in ("1", "true", "yes", "on"):
        raise SystemExit(f"ALIGNKERNELS_BUILD_CUDA must be 0, 1 or auto, got {MODE!r}")
    return [Extension("alignkernels._C", sources=[])]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildCudaExtension})
