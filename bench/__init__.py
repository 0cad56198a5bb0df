"""Benchmarks of alignkernels: ``python -m bench --help``.

``bench.harness`` measures (timing, peak memory, OOM handling), ``bench.cases_*`` define what is
measured (ops, shapes, providers), ``bench.report`` prints tables and writes JSON and PNG plots.
"""
