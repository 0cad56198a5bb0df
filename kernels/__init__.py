"""Triton kernels (installed as ``alignkernels.kernels``). Only ``@triton.jit`` code and its launch configs live here."""
