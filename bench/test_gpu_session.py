"""``bash bench/gpu_session.sh --dry-run``: every phase of the GPU session on CPU (tiny shapes, Triton
interpreted), so the one command that spends a GPU window cannot rot between windows. The install
phase is rehearsed too: offline, into a throwaway folder and venv, with an old setuptools and no
``wheel`` (what Ubuntu's Python 3.12 ships), from the wheels of ``../shared/gpu-wheels/``."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_session.gpu_tests import gpu_test_groups, last_test_started, merge_groups, parse_junit, run_group
from bench.gpu_session.record import read_status
from bench.gpu_session.summary import tuning_markdown
from bench.gpu_session.tune import forced_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "gpu_session.sh"
MAX_FILES, MAX_BYTES = 8, 16 << 20
OLD_SETUPTOOLS = "68.1.2"  # Ubuntu 24.04's python3-setuptools: builds no wheel without the `wheel` package
WHEEL_CACHE = Path.home() / ".cache" / "alignkernels" / "wheels"


def gpu_wheels() -> Path:
    """The wheels the GPU machine gets (``.gpu-wheels/`` in the checkout, else ``../shared/gpu-wheels/``)."""
    for d in (REPO_ROOT / ".gpu-wheels", REPO_ROOT.parent / "shared" / "gpu-wheels"):
        if glob.glob(str(d / "setuptools-*.whl")) and glob.glob(str(d / "wheel-*.whl")):
            return d
    raise AssertionError("no wheels with setuptools and wheel in .gpu-wheels/ or ../shared/gpu-wheels/ (see docs/GPU.md)")


def old_setuptools_wheel() -> Path:
    """setuptools 68.1.2 from the local cache, downloaded there once (the index is reachable from CI;
    the install itself is then offline); failing that, the one ensurepip bundles (65.5 on Python 3.11:
    also older than 70.1, the first setuptools with its own bdist_wheel)."""
    cached = WHEEL_CACHE / f"setuptools-{OLD_SETUPTOOLS}-py3-none-any.whl"
    if not cached.is_file():
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"setuptools=={OLD_SETUPTOOLS}",
                        "-d", str(WHEEL_CACHE)], capture_output=True, timeout=120)  # fmt: skip
    if cached.is_file():
        return cached
    import ensurepip

    bundled = sorted(Path(ensurepip.__file__).parent.glob("_bundled/setuptools-*.whl"))
    assert bundled, f"setuptools {OLD_SETUPTOOLS} could not be downloaded and ensurepip bundles none"
    return bundled[-1]


@pytest.fixture(scope="module")
def old_setuptools_python(tmp_path_factory) -> Path:
    """A venv's python holding pip, setuptools < 70.1 and no ``wheel``: the GPU machine's Python."""
    venv = tmp_path_factory.mktemp("old-setuptools") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall"]
    subprocess.run([*pip, str(old_setuptools_wheel())], check=True, capture_output=True, timeout=300)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "wheel"], capture_output=True, timeout=120)
    probe = "import importlib.util as u, setuptools; print(setuptools.__version__, u.find_spec('wheel') is None)"
    version, no_wheel = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert tuple(map(int, version.split(".")[:2])) < (70, 1) and no_wheel == "True", (version, no_wheel)
    return py


def run_session(out: Path, budget: int, timeout: float, install_python: Path | None = None,
                wheels: Path | None = None, limits: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["PYTHON"] = sys.executable
    if install_python is not None:
        env["GPU_SESSION_INSTALL_PYTHON"] = str(install_python)
    if limits is not None:
        env["GPU_SESSION_LIMITS"] = limits
    cmd = ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--budget", str(budget)]
    cmd += ["--wheels", str(wheels)] if wheels is not None else []
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def check_outputs(out: Path) -> list[str]:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert all((out / f).is_file() and (out / f).stat().st_size < MAX_BYTES for f in files)
    return files


@pytest.mark.slow
def test_dry_run_runs_every_phase(tmp_path, old_setuptools_python):
    """Every phase, the install included: offline into a venv with setuptools 68 and no ``wheel``
    (the install limit is raised for CI's slower pip; the rest keep theirs)."""
    proc = run_session(tmp_path, budget=360, timeout=460, install_python=old_setuptools_python,
                       wheels=gpu_wheels(), limits="120 60 130 180")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = check_outputs(tmp_path)
    assert {"SUMMARY.md", "session.json", "tuning.md", "pytest.log", "phases.log", "headline.png"} <= set(files)
    session = json.loads((tmp_path / "session.json").read_text())
    assert session["dry_run"] is True
    status = {s["phase"]: s["exit"] for s in session["status"]}
    phases_log = (tmp_path / "phases.log").read_text()
    # exit 1 = some wheel refused: only a wheel built for another Python (multiprocess is py312-only)
    refused = re.findall(r"FAILED to install (\S+)", phases_log)
    this_python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert all(re.search(r"-py3\d+-", w) and this_python not in w for w in refused), refused
    assert status == {"install": "1" if refused else "0", "probe": "0", "env": "0", "build": "0", "tests": "0", "bench": "0",
                      "tune": "0"}, phases_log[-4000:]  # fmt: skip
    assert "alignkernels.kernels -> " + str(REPO_ROOT / "kernels" / "__init__.py") in phases_log
    assert "bdist_wheel" not in phases_log
    tools = session["env"]["steps"]["toolchain"]
    assert {"nvcc_version", "gcc_version", "python_headers", "pip_check"} <= set(tools)
    assert {"pip", "setuptools", "wheel", "pyarrow", "huggingface_hub", "fsspec"} <= set(tools["packaging"])
    assert set(session["env"]["steps"]["device"]["tf32"]) == {"cuda.matmul.allow_tf32", "cudnn.allow_tf32",
                                                              "float32_matmul_precision"}  # fmt: skip
    tests = session["tests"]["steps"]["pytest"]
    assert tests["exit_code"] == 0 and tests["passed"] > 0 and tests["failures"] == 0
    assert [g["group"] for g in tests["groups"]] == ["bench", "tests"]  # one pytest process per group
    assert "-v -rA --durations=15" in tests["groups"][0]["command"]
    bench = session["bench"]["steps"]
    for op in ("token_logprobs", "linear_logprobs", "cross_entropy", "grpo", "dpo"):
        rows = {r["provider"]: r for r in bench[f"headline:{op}"]["rows"]}
        assert rows["eager"]["status"] == "ok", op
        assert all(r["status"] in ("ok", "skipped") for r in rows.values()), (op, rows)
    # the Triton kernels really ran, interpreted, and agree with the eager row's shape of output
    assert {r["provider"]: r["status"] for r in bench["headline:token_logprobs"]["rows"]}["alignkernels:triton"] == "ok"
    assert bench["bare_gemms"]["four_gemms_ms"] > bench["bare_gemms"]["three_gemms_ms"] > 0
    assert len({r["shape_str"] for r in bench["memory:linear_logprobs"]["rows"]}) == 2
    tune = session["tune"]["steps"]
    assert all(r["status"] == "ok" for r in tune["token_logprobs"]["rows"])
    assert all(r["status"] == "ok" for r in tune["linear_logprobs"]["rows"] + tune["linear_logprobs"]["fold"]["rows"])
    assert "**proposed:" in (tmp_path / "tuning.md").read_text()
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "DRY RUN" in summary and "### headline:linear_logprobs" in summary


def test_a_spent_budget_still_writes_the_summary(tmp_path):
    """With no time for any phase (the summary's reserve is 25 s), every phase is skipped and the
    summary says so: the run ends inside its budget and leaves its files."""
    t0 = time.time()
    proc = run_session(tmp_path, budget=26, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 26 + 10
    check_outputs(tmp_path)
    session = json.loads((tmp_path / "session.json").read_text())
    assert {s["phase"]: s["exit"] for s in session["status"]} == {
        "install": "skip", "probe": "skip", "env": "skip", "build": "skip", "tests": "skip", "bench": "skip",
        "tune": "skip"}  # fmt: skip
    assert {s["note"] for s in session["status"]} == {"budget spent"}  # not a device probe that hung
    assert "skipped" in (tmp_path / "SUMMARY.md").read_text()


def test_junit_counts_and_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure message="assert 1 == 2">'
        'tb</failure></testcase><testcase classname="b" name="boom"><error message="RuntimeError: x"/></testcase>'
        '<testcase classname="b" name="skip"><skipped/></testcase></testsuite></testsuites>'
    )
    got = parse_junit(xml)
    assert (got["passed"], got["failures"], got["errors"], got["skipped"]) == (1, 1, 1, 1)
    assert [f["test"] for f in got["failed"]] == ["a::bad", "b::boom"]
    assert got["failed"][0]["message"] == "assert 1 == 2"


def test_status_rows_name_timeouts(tmp_path):
    (tmp_path / "status.tsv").write_text("tests\t124\t150\t150\t\nbench\t0\t12\t210\t\n")
    rows = {r["phase"]: r["status"] for r in read_status(tmp_path)}
    assert rows == {"tests": "TIMEOUT (killed at its limit)", "bench": "ok"}


def test_forced_config_reaches_the_launcher_and_is_undone():
    import alignkernels.kernels.token_logprobs as kmod

    before = (kmod.TOKEN_LOGPROBS_CONFIGS, kmod.pick_config(10**6))
    with forced_config(kmod.__name__, "TOKEN_LOGPROBS_CONFIGS", (512, 2)):
        assert kmod.pick_config(10**6) == (512, 2) and kmod.TOKEN_LOGPROBS_CONFIGS == ((512, 2),)
    assert (kmod.TOKEN_LOGPROBS_CONFIGS, kmod.pick_config(10**6)) == before


def test_tuning_table_proposes_the_fastest():
    tune = {"steps": {"token_logprobs": {"status": "ok", "knob": "K", "shape": {}, "current": [1, 1], "rows": [
        {"config": [1, 1], "status": "ok", "fwd_ms": 1.0, "fwdbwd_ms": 3.0},
        {"config": [2, 2], "status": "ok", "fwd_ms": 1.0, "fwdbwd_ms": 2.0},
        {"config": [3, 3], "status": "error", "note": "OOM"}]}}}  # fmt: skip
    text = tuning_markdown(tune)
    assert "**proposed: [2, 2]**" in text and "error OOM" in text


def test_old_setuptools_without_wheel_cannot_install_editable(old_setuptools_python, tmp_path):
    """The rehearsal's interpreter really has the GPU machine's problem: without the tool wheels the
    editable install fails with "invalid command 'bdist_wheel'" (the dry run above installs them first)."""
    proc = subprocess.run([str(old_setuptools_python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", str(REPO_ROOT)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "invalid command 'bdist_wheel'" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_checkout_imports_alignkernels_kernels_with_no_install(tmp_path):
    """The last resort when every install fails: from the checkout's root, ``alignkernels.kernels`` is
    the checkout's ``kernels/`` folder without any install (the editable install's finder removed)."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', ''))]\n"
        "for name in [m for m in sys.modules if m.startswith('alignkernels')]:\n"
        "    del sys.modules[name]\n"
        "import alignkernels.kernels.token_logprobs as k\n"
        "print(k.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(REPO_ROOT / "kernels" / "token_logprobs.py")


def test_gpu_test_groups_cover_every_gpu_marked_file():
    groups = gpu_test_groups()
    files = [f for fs in groups.values() for f in fs]
    assert "tests/kernels/test_cuda_ext.py" in groups["tests/kernels"] and "bench/test_e2e.py" in groups["bench"]
    for f in files:
        assert re.search(r"mark\.gpu\b", (REPO_ROOT / f).read_text()), f
    marked = [str(p.relative_to(REPO_ROOT)) for d in ("tests", "bench") for p in (REPO_ROOT / d).rglob("test_*.py")
              if re.search(r"mark\.gpu\b", p.read_text())]  # fmt: skip
    assert sorted(files) == sorted(marked)


HUNG, FAULT, OK = (
    "import time\ndef test_hangs():\n    time.sleep(600)\n",
    "def test_faults():\n    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
    "def test_after_the_fault():\n    pass\n",
    "def test_fine():\n    assert 1 + 1 == 2\n",
)


@pytest.mark.slow
def test_a_hang_or_a_fault_costs_only_its_group(tmp_path):
    """Each group is its own pytest process: a hung test is killed at the group's limit and named from
    the ``-v`` log, a device fault is recorded, and the next group runs unharmed."""
    work = tmp_path / "work"
    work.mkdir()
    files = {}
    for name, text in (("hang", HUNG), ("fault", FAULT), ("ok", OK)):
        (tmp_path / name).mkdir()
        files[name] = tmp_path / name / f"test_{name}.py"
        files[name].write_text(text)
    t0 = time.time()
    hung = run_group(work, "hang", [str(files["hang"])], True, 60, deadline=time.time() + 15)
    assert time.time() - t0 < 30
    assert hung["status"] == "timeout" and "test_hang.py::test_hangs" in hung["note"], hung
    fault = run_group(work, "fault", [str(files["fault"])], True, 60, deadline=time.time() + 120)
    assert (fault["status"], fault["failures"], fault["passed"]) == ("failed", 1, 1)
    assert fault["device_fault"] == "illegal memory access"
    ok = run_group(work, "ok", [str(files["ok"])], True, 60, deadline=time.time() + 120)
    assert (ok["status"], ok["passed"]) == ("ok", 1)
    total = merge_groups([hung, fault, ok])
    assert (total["status"], total["passed"], total["failures"]) == ("failed", 2, 1)
    log = (work / "pytest.log").read_text()
    assert log.count("===== group") == 3 and "test_fine PASSED" in log


def test_last_test_started_names_the_running_test():
    log = "tests/a.py::test_one PASSED [ 50%]\ntests/a.py::test_two[cuda-4] "
    assert last_test_started(log) == "tests/a.py::test_two[cuda-4]"
    assert last_test_started("collecting ...") is None


def test_a_hung_cuda_initialisation_costs_the_probe_only(tmp_path):
    """The device probe runs under its own limit: when ``torch.cuda`` hangs (here: an interpreter whose
    capability query never returns), the probe is killed after 15 s, the device phases are skipped
    with that reason, and the summary is still written well inside the budget."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\ncase "$*" in *get_device_capability*) exec sleep 300;; esac\n'
                       f'exec {sys.executable} "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHON=str(wrapper), GPU_SESSION_LIMITS="1 60 130 180")  # install skipped (under 10 s)
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--budget", "300"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 120
    session = json.loads((out / "session.json").read_text())
    status = {s["phase"]: (s["exit"], s["note"]) for s in session["status"]}
    assert status["probe"][0] == "124" and status["env"][0] == "0", status
    for phase in ("build", "tests", "bench", "tune"):
        assert status[phase][0] == "skip" and "device probe did not finish" in status[phase][1], status
    assert "device probe did not finish" in (out / "SUMMARY.md").read_text()


def test_per_test_timeout_ends_a_hung_test_and_names_it(tmp_path, monkeypatch):
    """With pytest-timeout 2.4.0 (the wheel the session installs first) importable, a group's pytest
    gets ``--timeout`` with the thread method: a hung test ends its group after the per-test limit,
    not the phase's, and the ``-v`` log names it."""
    site = tmp_path / "site"
    wheel = sorted(gpu_wheels().glob("pytest_timeout-*.whl"))
    assert wheel, "no pytest-timeout wheel next to setuptools and wheel"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel[-1])], check=True, capture_output=True, timeout=300)  # fmt: skip
    monkeypatch.syspath_prepend(str(site))  # what PYTHONPATH does in the session's tests phase
    monkeypatch.setenv("PYTHONPATH", str(site))
    (tmp_path / "hang").mkdir()
    (tmp_path / "hang" / "test_hang.py").write_text(HUNG)
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.time()
    hung = run_group(work, "hang", [str(tmp_path / "hang" / "test_hang.py")], True, 3, deadline=time.time() + 120)
    assert time.time() - t0 < 60, "the per-test timeout, not the group's limit, ended the test"
    assert "--timeout=3" in hung["command"] and "--timeout-method=thread" in hung["command"]
    assert hung["status"] == "failed" and "test_hang.py::test_hangs" in hung["note"], hung
    assert "Timeout" in (work / "pytest.log").read_text()


def test_peers_run_after_our_rows_and_join_the_same_table(tmp_path):
    """The bench phase measures eager and alignkernels first (what a cut-short window must keep); the
    peers' rows, measured last, are merged into the same step with speed-ups against its eager row."""
    from bench.gpu_session.benchmarks import add_rows, ours, peers
    from bench.gpu_session.plan import GPU_HEADLINES
    from bench.gpu_session.record import PhaseRecord, load_phase

    for h in GPU_HEADLINES:
        assert "eager" in ours(h.providers) and not any(p.startswith("alignkernels") for p in peers(h.providers))
        assert set(ours(h.providers)) | set(peers(h.providers)) == set(h.providers)
    assert peers(GPU_HEADLINES[0].providers) == ("trl", "liger")

    def row(provider, role, ms):
        return {"op": "x", "provider": provider, "role": role, "shape_str": "N=1", "dtype": "bf16", "status": "ok",
                "fwdbwd_ms": {"median": ms}, "peak_fwdbwd_bytes": 100 * ms}  # fmt: skip

    record = PhaseRecord(tmp_path, "bench")
    record.step("headline:x", {"status": "ok", "rows": [row("eager", "eager", 4.0), row("ak", "ours", 1.0)], "notes": []})
    short = add_rows(record, "headline:x", {"rows": [row("liger", "peer", 2.0)], "notes": ["liger: compiled"]})
    assert short == {"merged_into": "headline:x", "rows": 1, "providers": ["liger"]}
    step = load_phase(tmp_path, "bench")["steps"]["headline:x"]
    assert [r["provider"] for r in step["rows"]] == ["eager", "ak", "liger"] and step["notes"] == ["liger: compiled"]
    assert [r["speedup_vs_eager"] for r in step["rows"]] == [1.0, 4.0, 2.0]
    assert step["rows"][2]["mem_ratio_vs_eager"] == 0.5
