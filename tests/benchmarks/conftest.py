"""Fixtures of the benchmark tests: the harness tests' tiny data set (``tests/adapters``)."""

from tests.adapters.conftest import tiny_dirs, tiny_tree  # noqa: F401
