"""Shared by every test directory.

hypothesis is imported here, at collection, whichever tests run: otherwise its pytest plugin
imports it only in the terminal summary, deep in pytest's stack, where CPython 3.11's parser
can fail with "AST constructor recursion depth mismatch" and turn a passing run into exit 1."""

import hypothesis  # noqa: F401
