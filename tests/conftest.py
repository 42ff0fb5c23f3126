"""Shared by every test directory.

hypothesis is imported here, at collection, whichever tests run: otherwise its pytest plugin
imports it only in the terminal summary, deep in pytest's stack, where CPython 3.11's parser
can fail with "AST constructor recursion depth mismatch" and turn a passing run into exit 1.

Hypothesis profiles, loaded here before any test module is imported (a test's ``@settings``
takes the profile loaded when it is declared as its parent):

- ``ci`` (the default): deterministic. The examples are derived from each test function
  (``derandomize``), no example database replays earlier runs' failures, no deadline (a shared
  machine's pauses are not failures), and a failure prints the blob that reproduces it
  (``@reproduce_failure``).
- ``dev`` (``HYPOTHESIS_PROFILE=dev``): random exploration with the example database, more
  examples for the tests that do not set their own.

A test's own ``@settings(max_examples=...)`` overrides the profile's example count in both.

The fixtures of the test servers are plugins of every directory: the Kafka broker's
(tests/support/kafka.py) and the PostgreSQL server's (tests/support/postgres.py). ``tests/`` is
on the path (pyproject.toml's ``pythonpath``): tests import what they share from the
``support`` package.
"""

import os

import hypothesis  # noqa: F401
from hypothesis import settings

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=100
)
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytest_plugins = ["support.kafka", "support.postgres"]
