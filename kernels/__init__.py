"""Triton kernels (installed as ``alignkernels.kernels``). Only ``@triton.jit`` code and its launch configs live here.

This folder is ``alignkernels.kernels`` and never the top-level package ``kernels``: that name belongs to
Hugging Face's ``kernels`` (a dependency of transformers >= 5.25, imported by
``transformers.integrations.hub_kernels``). Anything that puts the checkout root on ``sys.path`` — pytest's
``pythonpath``, ``python -m bench``, a notebook started at the root — would otherwise let this folder shadow
it. So when this file runs under the name ``kernels`` it hands the name over: it finds the next ``kernels``
on ``sys.path`` outside the checkout root, executes that one and leaves it in ``sys.modules`` (the import
system returns whatever ``sys.modules`` holds once a module's code has run). With no other ``kernels``
installed, ``import kernels`` is a ``ModuleNotFoundError``, as it would be without the checkout. Tested in
``tests/test_packaging.py``.
"""
if __name__ == "kernels":  # imported top-level because the checkout root is on sys.path: step aside
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (the checkout's kernels/ folder is alignkernels.kernels, "
            "not Hugging Face's kernels package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
