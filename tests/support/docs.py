"""The code blocks of the project's Markdown pages, which the documentation tests run."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["DOCS", "code_blocks"]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def code_blocks(page: Path, language: str) -> list[str]:
    """The code of every ```` ```language ```` block of ``page``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)
