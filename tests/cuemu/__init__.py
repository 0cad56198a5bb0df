"""cuemu: the CUDA execution model on the CPU, to run ``csrc/`` unchanged in CI (test infrastructure,
not shipped in the wheel).

- ``emulator.py``: source rewrite (launch syntax, ``__shared__``; line numbers kept), the g++ build of
  ``csrc/`` + ``bindings.cpp`` + ``runtime.cpp`` into a host-only ``_C`` (objects and module cached by
  source hash), loading, mutants, sanitizer flavours (``CUEMU_SANITIZE=asan|tsan``).
- ``cuemu.h``: force-included into every ``.cu``: built-in indices, ``__syncthreads``, warp
  intrinsics with CUDA's mask / width / segment rules, ``__ldg``, ``__expf``, the launch operator.
- ``runtime.cpp``: one OS thread per CUDA thread; barriers over non-exited threads; shuffles met per
  warp; blocks in a seeded shuffled order (``CUEMU_SEED``); warps one at a time between barriers in a
  shuffled order (default) or all free (``CUEMU_SCHEDULE=free``); errors, deadlocks and timeouts
  (``CUEMU_TIMEOUT_S``) raised to the test, never a hang.

See ``csrc/README.md`` ("How the GPU code is proven") for what this proves and what it cannot.
"""
