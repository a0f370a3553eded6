"""The package layers, read from the source with an ast walk: no package cycle, and the libraries below
the worker never import it.

    handler.py, modal_app.py, */__main__.py     entrypoints: read the environment and arguments
    bench                                       benchmarks, on top of everything
    app                                         the worker: families, contract, service, storage
    weights, preflight                          libraries of plain arguments: never import app

An entrypoint may import any package and nothing imports an entrypoint. Imports inside functions
count too (a function-level import is still a dependency).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "weights", "preflight", "bench")
ENTRY_FILES = ("handler.py", "modal_app.py")


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every absolute module name `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from app import upstream` is app.upstream
    return out


def _is_entrypoint(module: str) -> bool:
    return module.endswith("__main__") or module in ("handler", "modal_app")


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the project modules it imports} for every library module and entrypoint."""
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")] + [root / f for f in ENTRY_FILES]
    known = {_module_name(p, root) for p in files}
    graph = {}
    for p in files:
        me, deps = _module_name(p, root), set()
        for name in _imports(p, root):
            while name and name not in known:  # `from app.errors import X` -> app.errors
                name = name.rpartition(".")[0]
            if name and name != me:
                deps.add(name)
        graph[me] = deps
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level package dependencies between library modules (entrypoints left out: they are the top)."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        if _is_entrypoint(mod):
            continue
        top = mod.split(".")[0]
        out.setdefault(top, set()).update(d.split(".")[0] for d in deps if d.split(".")[0] != top
                                          and not _is_entrypoint(d))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


@pytest.fixture(scope="module")
def graph():
    return module_graph()


def test_no_package_cycle(graph):
    packages = package_graph(graph)
    assert find_cycle(packages) is None, f"package cycle: {' -> '.join(find_cycle(packages))}"
    assert set(packages) == set(PACKAGES)


def test_no_module_cycle_among_library_modules(graph):
    libs = {m: {d for d in deps if not _is_entrypoint(d)} for m, deps in graph.items() if not _is_entrypoint(m)}
    cycle = find_cycle(libs)
    assert cycle is None, f"module cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("lower", ["weights", "preflight"])
def test_libraries_below_the_worker_never_import_it(graph, lower):
    offenders = {m: sorted(d for d in deps if d.split(".")[0] in ("app", "bench"))
                 for m, deps in graph.items() if m.split(".")[0] == lower and not _is_entrypoint(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_worker_never_imports_the_benchmarks_or_an_entrypoint(graph):
    bad = {m: sorted(d for d in deps if d.startswith("bench") or _is_entrypoint(d))
           for m, deps in graph.items() if m.startswith("app")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_nothing_imports_an_entrypoint(graph):
    assert {m: sorted(d for d in deps if _is_entrypoint(d)) for m, deps in graph.items()
            if any(_is_entrypoint(d) for d in deps)} == {}


def test_the_walk_sees_function_level_imports_and_reports_a_cycle(tmp_path):
    """The checker itself: a function-level import back into a caller is a cycle it reports."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "weights" / "load.py").write_text("def f():\n    from app.service import Service\n")
    (tmp_path / "app" / "service.py").write_text("from weights.load import f\n")
    for f in ENTRY_FILES:
        (tmp_path / f).write_text("")
    g = module_graph(tmp_path)
    assert g["weights.load"] == {"app.service"}
    assert find_cycle(package_graph(g)) == ["app", "weights", "app"]


# Family names compared outside the family modules: `== "flux"`, `in ("flux", ...)`, `.name == "sdxl"`.
_NAME_TEST = re.compile(r"""(==|!=|\bin)\s*[(\[{]?\s*["'](flux|sdxl)["']|["'](flux|sdxl)["']\s*(==|!=)""")


def test_nothing_outside_a_family_module_tests_a_family_name():
    files = [p for pkg in ("app", "weights", "preflight") for p in (ROOT / pkg).rglob("*.py")
             if "families" not in p.parts] + [ROOT / f for f in ENTRY_FILES]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if _NAME_TEST.search(line)]
    assert hits == []
    assert _NAME_TEST.search('if family.name == "flux":') and _NAME_TEST.search('name in ("sdxl",)')
