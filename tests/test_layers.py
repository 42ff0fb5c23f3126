"""The import layers of ``pipelines``, ``operators`` and ``connectors`` (see the docstring of
``pipelines/__init__.py``): no import cycle, a base layer that imports nothing above it,
operators and connectors that import nothing from the DSL or the runtime, and no import
deferred into a function without a reason.

The graph is read from the source with :mod:`ast`: one node per module, one edge per import at
module level (one inside a function, or under ``if TYPE_CHECKING:``, runs later or never, and is
not an edge). Importing a module first runs the ``__init__`` of every package above it, except
the importer's own packages, whose ``__init__`` has started already: ``from pipelines.batch
import Batch`` is an edge to ``pipelines.batch`` and to ``pipelines`` in ``operators/base.py``,
and to ``pipelines.batch`` alone in ``pipelines/topic.py``. A name that a package's
``__init__`` binds only under ``if TYPE_CHECKING:`` is one its module ``__getattr__`` imports on
first use (``pipelines.Pipeline``): importing it from the package is an edge to its module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
from support.source import parse

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "operators", "connectors")

BASE_LAYER = (
    "pipelines.record",
    "pipelines.batch",
    "pipelines.errors",
    "pipelines.serde",
    "pipelines.topic",
    "pipelines.log.base",
    "pipelines.state.store",
)
"""The modules everything else builds on (records, batches, errors, serdes, topics, the log
interfaces, the state store)."""
ABOVE_BASE = ("operators", "connectors", "pipelines.pipeline", "pipelines.runtime")
"""Modules (and packages) the base layer must not import, directly or through another module."""
LIBRARIES = ("operators", "connectors")
"""The second layer: the operators and connectors, on the base layer."""
ABOVE_LIBRARIES = ("pipelines.pipeline", "pipelines.steps", "pipelines.runtime")
"""What the operators and connectors must not import, directly or through another module: the
DSL and the runtime, which build and run them."""

DEFERRED = {
    ("pipelines/__init__.py", "pipelines.pipeline"): "Pipeline, imported on first use",
    ("pipelines/pipeline.py", "pipelines.graph"): "the graph compiles the pipeline (notebooks)",
    ("pipelines/log/__init__.py", "pipelines.log.kafka"): "aiokafka, an optional dependency",
    ("pipelines/runtime/reset.py", "aiokafka"): "the Kafka admin client, optional",
    ("pipelines/runtime/runner.py", "pipelines.runtime.metrics"): "prometheus_client, optional",
    ("pipelines/notebook.py", "pandas"): "pandas, an optional dependency",
    ("pipelines/testing.py", "pandas"): "pandas, an optional dependency",
}
"""The imports that stay inside a function, (file, module or its package) -> why: an optional
dependency, or a module above the importer's layer used on a rare path. None is on the way of
a record."""


@dataclass(frozen=True, slots=True)
class Edge:
    target: str
    line: int


@dataclass(slots=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    edges: list[Edge] = field(default_factory=list)

    @property
    def where(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports of ``body`` that run when the module is imported (class bodies included)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _type_checking(node.test):
            yield from _module_level(node.orelse)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _module_level([child])
                elif isinstance(child, ast.excepthandler):
                    yield from _module_level(child.body)


def _in_functions(node: ast.AST, inside: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports of ``node`` made inside a function (at any depth)."""
    for child in ast.iter_child_nodes(node):
        if inside and isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        nested = inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from _in_functions(child, nested)


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _modules() -> dict[str, Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            tree = parse(path)
            modules[name] = Module(name, path, is_package, tree)
    return modules


def _first_use(modules: dict[str, Module]) -> dict[tuple[str, str], str]:
    """(package, name) -> the module a package's ``__getattr__`` imports ``name`` from."""
    lazy = {}
    for module in modules.values():
        if not module.is_package:
            continue
        for node in module.tree.body:
            if isinstance(node, ast.If) and _type_checking(node.test):
                for imported in node.body:
                    if isinstance(imported, ast.ImportFrom) and imported.module:
                        for alias in imported.names:
                            lazy[(module.name, alias.asname or alias.name)] = imported.module
    return lazy


def _graph() -> dict[str, Module]:
    """Every module of the three packages with its edges (see the module docstring)."""
    modules = _modules()
    lazy = _first_use(modules)

    def ours(name: str) -> str | None:
        """The module of ours ``name`` is, or is in (``pipelines.log.base.TopicSpec``)."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for module in modules.values():
        started = {module.name, *_ancestors(module.name)}  # their __init__ runs already
        for node in _module_level(module.tree.body):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package up
                    package = module.name if module.is_package else module.name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(
                        submodule if submodule in modules else lazy.get((base, alias.name), base)
                    )
            for target in targets:
                found = ours(target)
                if found is None:
                    continue
                for name in (*_ancestors(found), found):
                    if name not in started:
                        module.edges.append(Edge(name, node.lineno))
    return modules


def _cycle(modules: dict[str, Module]) -> list[str] | None:
    """One import cycle, as the modules along it (the first one again at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for edge in modules[name].edges:
            if state.get(edge.target) == 1:
                return [*path[path.index(edge.target) :], edge.target]
            if edge.target not in state and (found := visit(edge.target)) is not None:
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(modules):
        if name not in state and (found := visit(name)) is not None:
            return found
    return None


def _line(modules: dict[str, Module], source: str, target: str) -> str:
    module = modules[source]
    line = next(e.line for e in module.edges if e.target == target)
    return f"{module.where}:{line} imports {target}"


def test_no_import_cycle() -> None:
    modules = _graph()
    cycle = _cycle(modules)
    assert cycle is None, (
        "import cycle: "
        + " -> ".join(cycle)
        + "\n  "
        + "\n  ".join(_line(modules, a, b) for a, b in pairwise(cycle))
        + "\nBreak it where it goes up a layer: import a name from the module that defines it, "
        "not from a package whose __init__ imports more; move what both sides need down to the "
        "lower module; or, for a name a package __init__ exports from a higher layer, import it "
        "on first use (module __getattr__, as pipelines/__init__.py does for Pipeline)"
    )


def _crossings(modules: dict[str, Module], start: list[str], above: tuple[str, ...]) -> list[str]:
    """Each import chain from a module of ``start`` to one of ``above`` (modules and packages),
    up to the first module above: what the modules above import in turn does not matter."""
    came_from: dict[str, str | None] = dict.fromkeys(start)
    todo = list(start)
    while todo:
        name = todo.pop()
        for edge in modules[name].edges:
            if edge.target not in came_from:
                came_from[edge.target] = name
                todo.append(edge.target)

    def is_above(name: str | None) -> bool:
        return name is not None and any(name == a or name.startswith(f"{a}.") for a in above)

    crossed = sorted(m for m, prev in came_from.items() if is_above(m) and not is_above(prev))
    chains = []
    for name in crossed:
        chain = [name]
        while (previous := came_from[chain[-1]]) is not None:
            chain.append(previous)
        chains.append(" -> ".join(reversed(chain)))
    return chains


def test_the_base_layer_imports_nothing_above_it() -> None:
    modules = _graph()
    # importing a base module runs its packages' __init__ too (pipelines/__init__.py)
    start = sorted({*BASE_LAYER, *(a for m in BASE_LAYER for a in _ancestors(m))})
    chains = _crossings(modules, start, ABOVE_BASE)
    assert not chains, (
        "the base layer imports a layer above it:\n  "
        + "\n  ".join(chains)
        + f"\nThe base layer ({', '.join(BASE_LAYER)}, and the __init__ of their packages) "
        f"must not import {', '.join(ABOVE_BASE)}: move the code that needs the higher module up "
        "a layer, or what both need down into the base layer; a package __init__ can export a "
        "higher layer's name on first use (module __getattr__)"
    )


def test_operators_and_connectors_import_nothing_from_the_dsl_or_the_runtime() -> None:
    modules = _graph()
    start = sorted(m for m in modules if m.partition(".")[0] in LIBRARIES)
    chains = _crossings(modules, start, ABOVE_LIBRARIES)
    assert not chains, (
        "an operator or connector imports the layers that build and run it:\n  "
        + "\n  ".join(chains)
        + f"\nThe operators and connectors must not import {', '.join(ABOVE_LIBRARIES)}: move "
        "what they share with the runtime down into the base layer (as pipelines.errors holds "
        "StepTimeout, which async operators and the runtime's timers raise)"
    )


def test_importing_the_base_layer_loads_nothing_above_it() -> None:
    """The same, as Python sees it: nothing imported behind the static graph's back."""
    probe = (
        "import sys\n"
        f"import {', '.join(BASE_LAYER)}\n"
        "print(' '.join(sorted(m for m in sys.modules "
        f"if any(m == a or m.startswith(a + '.') for a in {ABOVE_BASE!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], (
        f"importing the base layer loads {done.stdout.strip()}: an import at module level, or "
        "one a package __init__ runs, reaches above the base layer"
    )


def _deferred() -> Iterator[tuple[str, str, int]]:
    """(file, module, line) of every import made inside a function of the three packages."""
    for module in _modules().values():
        for node in _in_functions(module.tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = [node.module or "." * node.level]
            for name in names:
                yield module.where, name, node.lineno


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_is_deferred_without_a_reason(package: str) -> None:
    unexplained = [
        f"{where}:{line} imports {name}"
        for where, name, line in _deferred()
        if where.startswith(f"{package}/")
        and not any(
            where == allowed and (name == module or name.startswith(f"{module}."))
            for allowed, module in DEFERRED
        )
    ]
    assert not unexplained, (
        "imports inside a function:\n  "
        + "\n  ".join(unexplained)
        + "\nImport at the top of the module: the layers have no cycle left to dodge (an "
        "import in a function also costs a lookup on every call, and some run per record). "
        "Only an optional dependency, or a higher layer's module used on a rare path, stays "
        "in the function: then add it to DEFERRED in tests/test_layers.py, with the reason"
    )
