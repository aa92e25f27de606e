"""The import graph keeps its layers: a lower layer never imports a higher one, and no two files
import each other in a loop (docs: README "Layout"; ../shared/ARCHITECTURE.md).

Layers, low to high: lh_cp/section.py; lh_cp/ops (the op) and lh_cp/data; lh_cp/model;
parallel/ (lh_cp.parallel); lh_cp/train; lh_cp/torchtitan; the top (lh_cp/__init__.py, api.py,
cli.py, demo.py, export.py). Every import counts, also those inside functions (loaded lazily
they still tie the layers together).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ("lh_cp.section", "lh_cp.version"),
    ("lh_cp.ops", "lh_cp.data"),
    ("lh_cp.model",),
    ("lh_cp.parallel",),
    ("lh_cp.train",),
    ("lh_cp.torchtitan",),
    ("lh_cp", "lh_cp.api", "lh_cp.cli", "lh_cp.demo", "lh_cp.export"),
]


def _module_files() -> dict[str, Path]:
    files = {}
    for base, package in ((ROOT / "lh_cp", "lh_cp"), (ROOT / "parallel", "lh_cp.parallel")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _layer(module: str) -> int:
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best


def _imports(path: Path, module: str, known: set[str], top_level_only: bool) -> set[str]:
    """The project modules `path` imports (resolved to files that exist)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_no_import_runs_up_a_layer():
    files = _module_files()
    upward = []
    for module, path in files.items():
        for target in _imports(path, module, set(files), top_level_only=False):
            # A sub-package's own __init__ is its face: importing it from inside is not upward
            # (the root lh_cp/__init__.py is the top floor, so it is not exempt).
            if target != "lh_cp" and module.startswith(target + "."):
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that run up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    files = _module_files()
    graph = {m: _imports(p, m, set(files), top_level_only=True) for m, p in files.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: an ops file importing the trainer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from lh_cp.train.trainer import Trainer\n")
    files = _module_files()
    targets = _imports(bad, "lh_cp.ops.bad", set(files), top_level_only=False)
    assert "lh_cp.train.trainer" in targets
    assert _layer("lh_cp.train.trainer") > _layer("lh_cp.ops.bad")
