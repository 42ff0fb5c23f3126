"""Load a pipeline from ``path/to/module.py[:attribute]``, as the runner and its workers do.

Each worker process imports the module by path itself, so nothing user-defined is pickled
(lambdas and functions defined anywhere are fine). Every failure is a
:class:`~pipelines.errors.LoadError` whose message says what to fix.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from pipelines.errors import LoadError, PipelineError
from pipelines.pipeline import Pipeline

__all__ = ["load_pipeline", "split_spec"]


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``"dir/mod.py:attr"`` -> (path, attribute or None)."""
    path, sep, attribute = spec.rpartition(":")
    if sep and attribute.isidentifier() and path:
        return Path(path), attribute
    return Path(spec), None


def _import(path: Path) -> ModuleType:
    resolved = path.absolute()
    if not path.is_file():
        hint = " (did you mean a .py file?)" if path.is_dir() else ""
        raise LoadError(
            f"no pipeline module at {path}{hint}: give the path of a Python file that defines a "
            "Pipeline, e.g. `headwater run examples/clickstream/pipeline.py`"
        )
    name = f"headwater_user_{abs(hash(str(path.resolve())))}"
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
    except PipelineError as error:
        del sys.modules[name]
        raise LoadError(f"{path} declares an invalid pipeline: {error}") from error
    except Exception as error:
        del sys.modules[name]
        where = next(
            (
                f
                for f in reversed(traceback.extract_tb(error.__traceback__))
                if f.filename == str(resolved)
            ),
            None,
        )
        line = f" at line {where.lineno}" if where is not None else ""
        raise LoadError(
            f"importing {path} failed{line}: {type(error).__name__}: {error}"
        ) from error
    return module


def load_pipeline(spec: str) -> Pipeline:
    """The pipeline that ``spec`` (``path/to/module.py[:attribute]``) names."""
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
