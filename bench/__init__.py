"""The benchmark suite and its scripts (not part of the installed package).

A package only so that pytest imports bench/conftest.py as ``bench.conftest``: the test suite
(pyproject testpaths: tests and bench/tests) also has a conftest.py, and two top-level ``conftest``
modules would shadow each other (tests import names from theirs).
"""
