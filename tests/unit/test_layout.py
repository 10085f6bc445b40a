"""The package's layout holds (issue 16): imports point one way, modules stay readable.

The import graph is read from the source (ast), so the test needs nothing imported. A module
is named by its dotted path (`target_orb.orb.delivery`); its *area* is its folder under
`target_orb/` (`orb`), or `root` for a module directly in `target_orb/`. README
"Development", "Layout", says the same in words.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import target_orb

PACKAGE = Path(target_orb.__file__).parent
FEATURES = frozenset({"backfill", "corrections", "identify"})
# What each area may import (besides the standard library, third-party packages and itself).
# `root` is the root modules that are shared utilities (settings, config checks, errors,
# jsonutil); the root modules that wire the run (ROOT_WIRING) may import every area, and
# only the wiring imports them.
ALLOWED: dict[str, frozenset[str]] = {
    "singer": frozenset({"root"}),
    "mapping": frozenset({"root"}),
    "state": frozenset({"root"}),
    "orb": frozenset({"root", "mapping"}),
    "pipeline": frozenset({"root", "mapping", "orb"}),
    "backfill": frozenset({"root", "mapping", "orb", "pipeline", "state"}),
    "corrections": frozenset({"root", "mapping", "orb", "pipeline", "state"}),
    "identify": frozenset({"root", "mapping", "orb", "pipeline", "state"}),
}
ROOT_WIRING = frozenset(
    {
        "target_orb.__main__",  # python -m target_orb
        "target_orb.target",  # the Singer target (the `target-orb` command)
        "target_orb.sinks",
        "target_orb.runtime",  # what all sinks share; builds every feature
        "target_orb.deadletter",  # the `target-orb-deadletter` command
    },
)
# The stand-in Orb still lives in target_orb/ until it moves to its own package.
STANDIN_PREFIX = "fake_orb"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name.startswith(STANDIN_PREFIX):
            continue
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("target_orb", *parts))] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING") or (
        isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported target_orb module, at run time) for every import in the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for inner in node.body:
                typing_only |= {id(n) for n in ast.walk(inner)}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from target_orb.orb import delivery` imports the module target_orb.orb.delivery.
            names = [node.module]
            names += [f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in MODULES
                      or a.name.startswith(STANDIN_PREFIX)]
        for name in names:
            # `from target_orb import jsonutil` names the package too: only the module counts.
            if name.startswith("target_orb."):
                found.append((name, id(node) not in typing_only))
    return found


def _area(module: str) -> str:
    path = MODULES[module].relative_to(PACKAGE)
    return "root" if len(path.parts) == 1 else path.parts[0]


def _graph(*, runtime_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, at_runtime in _imports(path):
            if runtime_only and not at_runtime:
                continue
            if name in MODULES and name != module:
                graph[module].add(name)
    return graph


def test_the_graph_sees_every_area():
    areas = {_area(m) for m in MODULES}
    assert areas == {"root", *ALLOWED}, areas


def test_no_import_cycle():
    """No cycle among the imports that run (imports under `if TYPE_CHECKING:` never run)."""
    graph = _graph(runtime_only=True)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], f"import cycles: {cycles}"


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_imports_point_down(area):
    """Features import the layers below them, never each other; the layers import no feature.

    Type-only imports count too: a layer that names a feature's type depends on the feature.
    """
    graph = _graph(runtime_only=False)
    wrong = {}
    for module, imported in graph.items():
        if _area(module) != area:
            continue
        bad = sorted(
            name for name in imported
            if _area(name) != area
            and (_area(name) not in ALLOWED[area] or name in ROOT_WIRING)
        )
        if bad:
            wrong[module] = bad
    assert wrong == {}, f"{area} may import {sorted(ALLOWED[area])} only: {wrong}"


def test_root_utilities_import_no_feature_and_no_wiring():
    graph = _graph(runtime_only=False)
    wrong = {
        m: sorted(n for n in imported if _area(n) in FEATURES or n in ROOT_WIRING)
        for m, imported in graph.items() if _area(m) == "root" and m not in ROOT_WIRING
    }
    assert {m: v for m, v in wrong.items() if v} == {}


def test_mapping_imports_no_io_layer():
    graph = _graph(runtime_only=False)
    wrong = {
        m: sorted(n for n in imported if _area(n) in {"orb", "pipeline", "state", *FEATURES})
        for m, imported in graph.items() if _area(m) == "mapping"
    }
    assert {m: v for m, v in wrong.items() if v} == {}


def test_only_the_entry_point_imports_target():
    importers = sorted(
        m for m, imported in _graph(runtime_only=False).items() if "target_orb.target" in imported
    )
    assert importers == ["target_orb.__main__"]


def test_target_orb_never_imports_the_stand_in():
    offenders = {}
    for module, path in MODULES.items():
        names = [
            n for n, _ in _imports(path)
            if n.split(".")[-1].startswith(STANDIN_PREFIX)
        ]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names += [
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names if alias.name.split(".")[0] == STANDIN_PREFIX
        ]
        names += [
            node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.split(".")[0] == STANDIN_PREFIX
        ]
        if names:
            offenders[module] = names
    assert offenders == {}


def test_no_module_over_600_lines():
    long = {
        m: n for m, p in MODULES.items()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these by concern (at most {MAX_MODULE_LINES} lines): {long}"


def test_no_function_over_60_lines():
    """Long functions are split into named steps."""
    long = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - first + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{module}.{node.name}"] = length
    assert long == {}, f"split these into named steps (at most {MAX_FUNCTION_LINES}): {long}"
