"""The test suite is a regular package so that ``tests.<...>`` names resolve to it first.

Worker processes started with ``spawn`` (``tests/ops/test_vocab_parallel.py``) import the test module
by its pytest name, ``tests.ops.test_vocab_parallel``. verl and OpenRLHF wheels install a top-level
``tests`` package into site-packages; a folder without ``__init__.py`` is only a namespace portion, which
any installed regular package wins over, so the workers would import theirs. As a regular package at
the checkout root (first on ``sys.path`` under pytest), ours wins.
"""
