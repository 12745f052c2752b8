"""The package's folders are layers: each imports only the folders its ``__init__`` docstring names
(every arrow points down), and no module imports itself back through others (no import circle), in
``src/preftune`` and in ``benchmarks``. Every import counts: at the top, inside a function, or under
``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "preftune"

#: shared leaves: any folder may import them; they import no preftune module
LEAVES = {"cli_args", "quiet", "stats"}
#: folder -> the folders it may import (besides itself and the leaves);
#: "cli" is cli.py, __init__.py, __main__.py
ALLOWED = {
    "hardware": set(),
    "data": set(),
    "losses": {"data"},
    "model": {"data", "losses"},
    "rewards": {"model", "losses", "data"},
    "engine": {"rewards", "model", "losses", "data", "hardware"},
    "methods": {"engine", "rewards", "model", "losses", "data"},
    "eval": {"rewards", "model", "losses", "data"},
    "doctor": {"engine", "rewards", "model", "losses", "data"},
    "lab": {"methods", "engine", "eval", "rewards", "model", "losses", "data"},
    "cli": {"lab", "doctor", "eval", "methods", "engine", "rewards", "model", "losses", "data", "hardware"},
}


def modules(root: Path, prefix: str) -> dict[str, Path]:
    out = {}
    for file in root.rglob("*.py"):
        parts = file.relative_to(root).with_suffix("").parts
        name = ".".join((prefix, *parts) if prefix else parts)
        out[name.removesuffix(".__init__")] = file
    return out


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``file`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = {**modules(PACKAGE, "preftune"), **modules(ROOT / "benchmarks", "")}
    return {name: imports(name, file, known) for name, file in known.items()}


def folder(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "preftune":
        return "benchmarks"
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles(graph()) == []


def test_every_arrow_points_down():
    edges = graph()
    wrong = defaultdict(list)
    for source, targets in edges.items():
        here = folder(source)
        for target in targets:
            there = folder(target)
            if here == "benchmarks" or there == here:
                continue
            allowed = there in LEAVES and here not in LEAVES or there in ALLOWED.get(here, set())
            if not allowed:
                wrong[f"{here} -> {there}"].append(f"{source} imports {target}")
    assert dict(wrong) == {}


def test_every_folder_states_its_rule():
    for name in ALLOWED.keys() - {"cli"}:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert "rule" in doc.lower(), f"{name}/__init__.py: no layer rule in its docstring"
    assert ({p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
            == ALLOWED.keys() - {"cli"})


def test_the_checks_find_what_they_look_for():
    """A circle and an upward arrow, made up, are found (the checks above cannot pass vacuously)."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = graph()
    assert "preftune.engine.loop" in edges["preftune.methods.dpo"]  # imports are read
    assert folder("preftune.model.logps") == "model" and "engine" not in ALLOWED["model"]
