"""Python source read as syntax trees, for the tests that check the code itself."""

from __future__ import annotations

import ast
import gc
from pathlib import Path


def parse(source: str | Path) -> ast.Module:
    """The syntax tree of ``source`` (code, or a file), parsed with the garbage collector held
    off. In CPython 3.11 a finalizer that logs a traceback in the middle of a parse breaks the
    parse with ``SystemError: AST constructor recursion depth mismatch`` (the traceback's own
    parse resets the parser's state); a fenced aiokafka producer leaves such futures behind
    ("Future exception was never retrieved"), and a Kafka test before can leave them unfreed."""
    text, name = (
        (source.read_text(encoding="utf-8"), str(source))
        if isinstance(source, Path)
        else (source, "<source>")
    )
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text, name)
    finally:
        if enabled:
            gc.enable()
