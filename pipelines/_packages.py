"""Headwater's import packages are ``pipelines``, ``operators`` and ``connectors``: common
names, which another installed distribution or a directory on ``sys.path`` can use as well.

If ``operators`` or ``connectors`` is not Headwater's own (not next to this ``pipelines``, or
without the modules Headwater's has), importing ``pipelines`` fails at once with an
:class:`ImportError` that names what was found and where, instead of an ``AttributeError``
somewhere in a pipeline. The check runs when this module is imported (``pipelines/__init__.py``
imports it first); it only looks the packages up and imports nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["check_packages"]

_MARKERS = {"operators": "stateless.py", "connectors": "files.py"}
"""A module each of Headwater's packages has."""


def check_packages() -> None:
    """Raise :class:`ImportError` if ``operators`` or ``connectors`` is not Headwater's."""
    home = Path(__file__).resolve().parent.parent
    for name, marker in _MARKERS.items():
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if (
            origin is not None
            and origin.parent.parent == home
            and (origin.parent / marker).exists()
        ):
            continue
        found = f"the one in {origin.parent}" if origin is not None else "none"
        raise ImportError(
            f"Headwater's {name!r} package was not found next to its 'pipelines' package "
            f"({home}): Python imports {found}. Another installed distribution or a directory "
            f"on sys.path (the current directory, PYTHONPATH) provides a package named "
            f"{name!r}: rename or uninstall it (`pip show -f` lists what a distribution "
            "installs), or run from another directory"
        )


check_packages()
