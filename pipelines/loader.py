"""Load a pipeline from ``path/to/module.py[:attribute]`` or ``package.module[:attribute]``,
as the runner and its workers do.

Each worker process imports the module itself, so nothing user-defined is pickled (lambdas and
functions defined anywhere are fine). A dotted name is imported like any module, from the
working directory or the installed packages. Every failure is a
:class:`~pipelines.errors.LoadError` whose message says what to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType

from operators.base import USER_MODULE_PREFIX
from pipelines.errors import LoadError, PipelineError
from pipelines.pipeline import Pipeline

__all__ = ["load_pipeline", "split_spec"]


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``"dir/mod.py:attr"`` -> (path, attribute or None)."""
    path, sep, attribute = spec.rpartition(":")
    if sep and attribute.isidentifier() and path:
        return Path(path), attribute
    return Path(spec), None


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _is_module_name(path: Path) -> bool:
    """``path`` reads as a dotted module name rather than a file."""
    text = str(path)
    return not path.exists() and not text.endswith(".py") and bool(_DOTTED.fullmatch(text))


def _import_failed(where: str, filename: str | None, error: Exception) -> LoadError:
    """The error for a module whose code raised ``error`` on import, naming the line."""
    if isinstance(error, PipelineError):
        return LoadError(f"{where} declares an invalid pipeline: {error}")
    found = next(
        (
            f
            for f in reversed(traceback.extract_tb(error.__traceback__))
            if filename is not None and f.filename == filename
        ),
        None,
    )
    line = f" at line {found.lineno}" if found is not None else ""
    return LoadError(f"importing {where} failed{line}: {type(error).__name__}: {error}")


def _import_name(name: str) -> ModuleType:
    """The module ``name``, imported from the working directory or the installed packages."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and (name + ".").startswith(error.name + "."):
            raise LoadError(
                f"no pipeline module at {name}: no such file, and no module {error.name!r} in "
                "the working directory or the installed packages; give the path of a Python "
                "file (`headwater run jobs/clicks.py`) or a module name (`headwater run "
                "jobs.clicks`)"
            ) from error
        raise _import_failed(name, None, error) from error
    except Exception as error:
        spec = importlib.util.find_spec(name)
        raise _import_failed(name, spec.origin if spec else None, error) from error


def _import(path: Path) -> ModuleType:
    if _is_module_name(path):
        return _import_name(str(path))
    resolved = path.absolute()
    if not path.is_file():
        hint = " (did you mean a .py file?)" if path.is_dir() else ""
        raise LoadError(
            f"no pipeline module at {path}{hint}: give the path of a Python file that defines a "
            "Pipeline, e.g. `headwater run examples/clickstream/pipeline.py`, or a module name"
        )
    name = f"{USER_MODULE_PREFIX}{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise LoadError(f"{path} is not a Python module; pipeline modules end in .py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent = str(path.resolve().parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)  # so the module can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise _import_failed(str(path), str(resolved), error) from error
    return module


def load_pipeline(spec: str) -> Pipeline:
    """The pipeline that ``spec`` (``path/to/module.py[:attribute]`` or
    ``package.module[:attribute]``) names."""
    path, attribute = split_spec(spec)
    module = _import(path)
    if attribute is not None:
        if not hasattr(module, attribute):
            found = _pipelines_in(module)
            raise LoadError(
                f"{path} has no attribute {attribute!r}"
                + (f"; its pipelines are: {', '.join(found)}" if found else "")
            )
        candidate = getattr(module, attribute)
        if callable(candidate) and not isinstance(candidate, Pipeline):
            try:
                candidate = candidate()
            except Exception as error:
                raise LoadError(
                    f"calling {path}:{attribute}() to build the pipeline failed: "
                    f"{type(error).__name__}: {error}"
                ) from error
        if not isinstance(candidate, Pipeline):
            raise LoadError(f"{path}:{attribute} is a {type(candidate).__name__}, not a Pipeline")
        return candidate
    found = _pipelines_in(module)
    if "pipeline" in found:
        found = ["pipeline"]
    if not found:
        raise LoadError(
            f"{path} defines no Pipeline; assign one to a module-level name, "
            "e.g. `pipeline = Pipeline(...)...`"
        )
    if len(found) > 1:
        raise LoadError(
            f"{path} defines several pipelines ({', '.join(found)}); "
            f"name the one to run as {path}:<attribute>"
        )
    pipeline = getattr(module, found[0])
    assert isinstance(pipeline, Pipeline)
    return pipeline


def _pipelines_in(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, Pipeline) and not name.startswith("_")
    )
