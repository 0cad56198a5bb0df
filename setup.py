"""Build script. Pure-Python install by default; the optional CUDA C++ extension
(`alignkernels._C`, sources in `csrc/`) is added by `alignkernels/_build_ext.py`
when nvcc is found or ALIGNKERNELS_BUILD_CUDA=1 asks for it."""
from setuptools import setup

setup()
