"""The phases of ``bash bench/gpu_session.sh`` (one GPU window -> committed numbers); see docs/GPU.md.

The shell script runs each phase as its own process under ``timeout``; each phase writes what it
has measured to ``<work>/<phase>.json`` after every step, so a phase killed at its limit still
leaves its finished steps behind, and ``summary`` (always run last) turns whatever exists into at
most eight files in the output folder (tables through ``bench.report.markdown_tables``, the one renderer):

==========================  =====================================================================
``SUMMARY.md``              device, driver, versions, commit; each phase's status; the tables
``session.json``            everything measured, machine-readable (the source of the README table)
``pytest.log``              the tests phase's pytest output, group after group
``tuning.md``               phase 3's proposed launch-config table
``headline.png``            phase 2's headline cases: forward+backward time per provider
``memory.png``              ``linear_logprobs`` peak memory against N per provider
``memory_snapshot.pickle``  one ``torch.cuda.memory`` snapshot (open at pytorch.org/memory_viz)
``phases.log``              every phase's stdout and stderr
==========================  =====================================================================

Phases (``python -m bench.gpu_session PHASE --work DIR [--dry-run] [--deadline EPOCH]``), one module each
(``env``, ``build``, ``gpu_tests``, ``benchmarks``, ``tune``, ``summary``; ``record`` the phase records,
``plan`` the headline shapes; the install is the shell's own):

- ``env``: versions, commit, toolchain, ``pip check``, device, driver, TF32 flags.
- ``build``: the CUDA extension for the local arch (first use of ``backend="cuda"``), before the
  tests so that neither the tests (which reuse it) nor the benchmarks pay for it.
- ``tests``: the ``gpu``-marked files, one pytest process per folder, with a per-test timeout; each
  group's junit XML is reduced to counts and the failures' first lines. Failures are data, never
  the end of the run.
- ``bench``: measured copy bandwidth and bf16 GEMM throughput, eager and our rows of the headline
  cases through ``bench.harness.run_suite`` (each provider counted by ``bench.cost``), the bare
  GEMMs of the ``linear_logprobs`` shape, peak memory at large N, one memory snapshot; the peers last.
- ``tune``: each launch knob swept on the headline shapes (``*_CONFIGS`` through the kernel
  module's ``pick_config``; ``chunk_size`` x ``vocab_block_size`` of ``linear_logprobs``).
- ``summary``: the output files above.

``--dry-run`` runs every phase on CPU with tiny shapes, the Triton providers under the interpreter;
CI runs it (``bench/test_gpu_session.py``) so the script cannot rot between GPU windows.
"""
