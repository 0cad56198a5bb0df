"""The checkout's top-level folders never shadow installed packages.

``kernels/`` is ``alignkernels.kernels``; the top-level name ``kernels`` is Hugging Face's package
(a transformers >= 5.25 dependency, imported by ``transformers.integrations.hub_kernels`` whenever a
trainer or PEFT is imported). Whatever puts the checkout root first on ``sys.path`` — pytest's
``pythonpath``, ``python -m bench``, ``python -c`` — must still give the installed one. Each case runs
in a fresh interpreter started at the repository root, as a user would.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))


def run_python(args, *, cwd=ROOT, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def has_hf_kernels() -> bool:
    from importlib import metadata

    try:
        metadata.version("kernels")
        return True
    except metadata.PackageNotFoundError:
        return False


needs_hf_kernels = pytest.mark.skipif(not has_hf_kernels(), reason="Hugging Face's kernels package not installed")


@needs_hf_kernels
def test_installed_kernels_wins_from_the_checkout_root():
    code = textwrap.dedent("""
        import json, sys
        import transformers.integrations.hub_kernels  # from kernels import CUDAProperties, ...
        import kernels, alignkernels.kernels, alignkernels.kernels.token_logprobs as tl
        import os
        print(json.dumps(dict(first=os.path.abspath(sys.path[0]), kernels=kernels.__file__, ours=alignkernels.kernels.__file__,
                              kernel=tl.__name__, cuda_properties=hasattr(kernels, "CUDAProperties"))))
    """)
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["first"]).resolve() == ROOT  # the hazard is real: the root is searched first
    assert not Path(out["kernels"]).resolve().is_relative_to(ROOT), out
    assert out["cuda_properties"]
    assert Path(out["ours"]).resolve().parent.name == "kernels", out
    assert out["kernel"] == "alignkernels.kernels.token_logprobs"


@needs_hf_kernels
def test_installed_kernels_wins_inside_pytest():
    """This process: pytest's ``pythonpath = [".", "tests"]`` put the root and ``tests/`` on sys.path."""
    import alignkernels.kernels
    import kernels

    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT)
    assert hasattr(kernels, "CUDAProperties")
    assert Path(alignkernels.kernels.__file__).resolve().parent.name == "kernels"


@needs_hf_kernels
@pytest.mark.slow
def test_python_m_bench_case_that_imports_trl_runs():
    """``python -m bench --e2e`` builds TRL's GRPOTrainer in a worker started as ``python -m bench.e2e`` at
    the root: the import chain trl -> transformers trainer -> hub_kernels -> ``kernels``."""
    proc = run_python(["-m", "bench", "--e2e", "--trainers", "grpo", "--modes", "trl", "--seq-len", "8",
                       "--vocab-size", "64", "--steps", "1", "--device", "cpu", "--out", os.devnull])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower(), proc.stdout[-2000:]


def test_the_checkout_kernels_folder_hands_the_name_to_another_kernels(tmp_path):
    """Independent of what is installed: a stand-in ``kernels`` later on sys.path is the one imported."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    (tmp_path / "kernels" / "sub.py").write_text("VALUE = 7\n")
    code = "import kernels, kernels.sub; print(kernels.STAND_IN, kernels.sub.VALUE, kernels.__file__)"
    proc = run_python(["-S", "-c", code], env_extra={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["True", "7"]
    assert Path(proc.stdout.split()[2]).resolve().is_relative_to(tmp_path)


def test_no_other_kernels_is_a_module_not_found_error():
    """``-S``: no site-packages, so only the checkout root offers a ``kernels``; it is not taken."""
    code = "import kernels"
    proc = run_python(["-S", "-c", code])
    assert proc.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in proc.stderr, proc.stderr
    assert "alignkernels.kernels" in proc.stderr  # the message says what the folder is


def test_top_level_folders_that_are_regular_packages_are_ours():
    """Only ``alignkernels`` (ours), ``bench`` (``python -m bench``), ``kernels`` (guarded above) and
    ``tests`` (``tests/__init__.py``: it must win over the stray ``tests`` package verl and OpenRLHF install)
    may be regular packages at the root; any other folder with ``__init__.py`` would shadow an installed
    package of its name for everyone who starts Python at the root. Folders without ``__init__.py`` are
    namespace portions, which any installed regular package wins over."""
    packages = [name for name in TOP_LEVEL_FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert packages == ["alignkernels", "bench", "kernels", "tests"], packages
    tests_packages = [p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").exists()]
    assert tests_packages == ["cuemu"], tests_packages  # tests/ is on pytest's pythonpath too


def test_tests_package_wins_over_an_installed_tests_package(tmp_path):
    """A stand-in ``tests`` regular package (as verl's and OpenRLHF's wheels install) later on sys.path:
    ``tests.ops`` still resolves to the checkout's suite, as a spawned worker needs."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("STRAY = True\n")
    code = "import tests, tests.ops; print(tests.__file__); print(hasattr(tests, 'STRAY'))"
    proc = run_python(["-S", "-c", code], env_extra={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    first, stray = proc.stdout.split()
    assert Path(first).resolve() == ROOT / "tests" / "__init__.py"
    assert stray == "False"
