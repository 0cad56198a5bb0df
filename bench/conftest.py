"""pytest settings for ``bench/``.

``bench/test_bench_*.py`` carry the benchmark cases for pytest-benchmark. A plain ``pytest`` run
(CI) only checks that they work: unless a benchmarking option is given (``--benchmark-only``,
``--benchmark-enable``, ``--benchmark-save``, ``--benchmark-autosave``, ``--benchmark-json``,
``--benchmark-compare``), benchmarks are disabled, i.e. each case runs exactly once.
"""
import pytest

_BENCHMARK_OPTIONS = (
    "benchmark_only", "benchmark_enable", "benchmark_save", "benchmark_autosave", "benchmark_json",
    "benchmark_compare",
)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not hasattr(config.option, "benchmark_disable"):
        return  # pytest-benchmark not installed: the bench tests skip themselves
    if not any(getattr(config.option, name, None) for name in _BENCHMARK_OPTIONS):
        config.option.benchmark_disable = True
