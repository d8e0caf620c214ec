"""The import graph of privlm, built from the source with `ast` (module-level AND function-level "lazy" imports,
``TYPE_CHECKING`` blocks excluded: they never run).

What it enforces:
  * no cycle between privlm modules (a package's ``__init__`` counts as the module ``privlm.X``; importing
    ``privlm.X.Y`` also depends on ``privlm.X``'s ``__init__``, as Python runs it first);
  * no ``privlm.report`` module imports a ``privlm.train`` module, directly or through other modules;
  * layers point one way: ``privlm.config`` imports no other privlm module but ``privlm.errors`` /
    ``privlm.fileio``-level leaves; ``privlm.model`` and ``privlm.entropy`` import nothing from ``train``,
    ``report``, ``pi``, ``sweep``, ``demo`` or ``cli``; ``train`` / ``pi`` / ``report`` import no ``cli`` module
    and nothing from each other except ``report`` -> ``pi`` (the report prints PI costs);
  * no module imports a private name (``_x``) from another privlm module.
The test checks the graph builder itself on a synthetic package first (a checker that finds nothing proves
nothing)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_pkg: bool):
    """(imported module, imported names) for every import statement that can run (lazy ones included)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            yield base, [a.name for a in node.names]
        stack.extend(ast.iter_child_nodes(node))


def build_graph(root: Path, top: str = "privlm") -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Edges module -> privlm modules it imports, and the private names imported across modules
    (importer, module, name)."""
    files = {module_name(p, root): p for p in (root / top).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    private: list[tuple[str, str, str]] = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, names in _imports(tree, mod, path.name == "__init__.py"):
            if not (target == top or target.startswith(top + ".")):
                continue
            deps = []
            for n in names:  # `from privlm.x import y`: y may be a submodule
                if f"{target}.{n}" in files:
                    deps.append(f"{target}.{n}")
                elif n.startswith("_") and not n.startswith("__") and target != mod:
                    private.append((mod, target, n))
            deps.append(target)
            for d in deps:
                while d not in files and "." in d:
                    d = d.rsplit(".", 1)[0]
                parts = d.split(".")  # importing a.b.c runs a.b's __init__ (and a's) first
                for i in range(len(parts), 1, -1):
                    anc = ".".join(parts[:i])
                    if anc in files and anc != mod and not mod.startswith(anc + "."):
                        graph[mod].add(anc)
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as a list of modules (first repeated at the end), or []."""
    color: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        color[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if color.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        color[node] = 2
        path.pop()
        return []

    for n in sorted(graph):
        if color.get(n) is None:
            c = visit(n)
            if c:
                return c
    return []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph():
    return build_graph(SRC)


def test_graph_builder_finds_lazy_imports_cycles_and_private_names(tmp_path):
    pkg = tmp_path / "privlm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from privlm.sub.b import thing\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import privlm.c\n"
                              "def f():\n    from privlm.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\nthing = 1\n")
    (pkg / "c.py").write_text("def g():\n    from privlm.a import _hidden\n")
    g, private = build_graph(tmp_path)
    assert "privlm.sub.b" in g["privlm.a"] and "privlm.sub" in g["privlm.a"]  # lazy import, and its package
    assert "privlm.c" not in g["privlm.a"]  # TYPE_CHECKING never runs
    assert g["privlm.sub.b"] == {"privlm.c"}  # relative import resolved
    assert private == [("privlm.c", "privlm.a", "_hidden")]
    cycle = find_cycle(g)
    assert cycle and cycle[0] == cycle[-1] and set(cycle) >= {"privlm.a", "privlm.c", "privlm.sub.b"}
    (pkg / "c.py").write_text("x = 1\n")
    assert find_cycle(build_graph(tmp_path)[0]) == []


def test_privlm_import_graph_has_no_cycle(graph):
    g, _ = graph
    assert len(g) > 50 and "privlm.train.loop" in g["privlm.train.cli"]
    assert find_cycle(g) == []


def test_report_imports_no_train_module(graph):
    g, _ = graph
    report = [m for m in g if m == "privlm.report" or m.startswith("privlm.report.")]
    assert len(report) >= 5
    for m in report:
        bad = sorted(d for d in reachable(g, m) if _layer(d) == "train")
        assert bad == [], f"{m} imports {bad}"


def test_dependencies_point_one_way(graph):
    g, _ = graph
    lower = {"config": {"train", "report", "pi", "model", "entropy", "sweep", "demo", "cli", "run"},
             "model": {"train", "report", "pi", "sweep", "demo", "cli"},
             "entropy": {"train", "report", "pi", "sweep", "demo", "cli"},
             "train": {"report", "pi", "sweep", "demo", "cli"},
             "pi": {"train", "report", "sweep", "demo", "cli"},
             "report": {"train", "sweep", "demo", "cli"}}
    problems = []
    for mod, deps in g.items():
        layer = _layer(mod)
        if layer not in lower or mod.endswith(".cli"):  # each package's cli module is the top of its package
            continue
        for d in deps:
            if _layer(d) in lower[layer] or d.endswith(".cli"):
                problems.append(f"{mod} -> {d}")
    assert problems == []


def test_no_private_name_crosses_modules(graph):
    _, private = graph
    assert private == []
