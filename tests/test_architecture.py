"""The house plan of ARCHITECTURE.md, checked: its layer table names every module of the package, imports point
down that table (or stay within a layer), they form no cycle, training and inference do not reach each other,
benchmarks do not import tests. Every import counts, at module top or inside a function. The table is read from
ARCHITECTURE.md itself, so the document and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = {"d3.predictor", "d3.loading", "d3.convert", "d3.pipeline", "d3.model_card", "d3.outputs", "d3.prefetch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports (relative imports resolved; `from a import b` may name a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def import_graph(folder: str = "d3") -> dict[str, set[str]]:
    files = sorted((ROOT / folder).rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_training_does_not_reach_the_inference_modules():
    graph = import_graph()
    # d3.train_cli is above both: it hands d3.validation (the live student scored as evaluate.py does) to the loop
    for module in ("d3.training", "d3.training_args", "d3.training_setup", "d3.training_data",
                   "d3.training_checkpoints", "d3.objective", "d3.reference_step", "d3.losses", "d3.data.folders"):
        assert not reachable(graph, module) & INFERENCE, module


def test_benchmarks_do_not_import_tests():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n == "tests" or n.startswith("tests.")], path.name


def test_inference_does_not_reach_training():
    graph = import_graph()
    training = {"d3.training", "d3.training_args", "d3.training_setup", "d3.training_data", "d3.training_checkpoints",
                "d3.train_cli", "d3.reference_step", "d3.data.mixing"}
    for module in sorted(INFERENCE):
        assert not reachable(graph, module) & training, module


def layer_table(text: str | None = None) -> list[tuple[str, list[str]]]:
    """ARCHITECTURE.md's "Layers (bottom to top)" table: (layer, module names without the `d3.` prefix)."""
    text = (ROOT / "ARCHITECTURE.md").read_text() if text is None else text
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")]
    return [(cells[1].strip(), re.findall(r"`([^`]+)`", cells[2])) for cells in rows if "`" in cells[2]]


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """The rank of a module's layer (0 = bottom); `prepare.*` in the table covers every module of the package."""
    for rank, (_, names) in enumerate(table):
        for name in names:
            if module == f"d3.{name}" or (name.endswith(".*") and module.startswith(f"d3.{name[:-2]}.")):
                return rank
    return None


def upward_imports(graph: dict[str, set[str]], table: list[tuple[str, list[str]]]) -> list[str]:
    found = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            low, high = layer_of(module, table), layer_of(dep, table)
            if low is not None and high is not None and high > low:
                found.append(f"{module} ({table[low][0]}) imports {dep} ({table[high][0]})")
    return found


def test_the_layer_table_names_every_module():
    table = layer_table()
    packages = {"d3", "d3.data", "d3.prepare", "d3._scripts"}  # their __init__ files hold no code of a layer
    unlisted = [m for m in import_graph() if m not in packages and layer_of(m, table) is None]
    assert unlisted == [], "add these to ARCHITECTURE.md's layer table"


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph(), layer_table()) == []


def test_the_layer_check_finds_an_upward_import():
    table = layer_table("## Layers\n| layer | modules | owns |\n|---|---|---|\n| low | `a` | x |\n| high | `b` `c.*` | y |\n")
    graph = {"d3.a": {"d3.c.x"}, "d3.b": {"d3.a"}, "d3.c.x": set()}
    assert upward_imports(graph, table) == ["d3.a (low) imports d3.c.x (high)"]


MAX_LINES = 450
LONG_MODULES_ALLOWED = {"d3/data/synthetic.py"}  # the procedural scene generator: one concern, drawn in one place


def oversized(folder: Path, limit: int = MAX_LINES, allowed: set[str] = LONG_MODULES_ALLOWED) -> list[str]:
    """Modules under `folder` longer than `limit` lines (paths relative to the repository root), except `allowed`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        lines = len(path.read_text().splitlines())
        if lines > limit and rel not in allowed:
            found.append(f"{rel}: {lines} lines")
    return found


def test_no_module_of_the_package_is_over_450_lines():
    assert oversized(ROOT / "d3") == [], "split these by concern (ARCHITECTURE.md)"


def test_the_size_check_finds_a_long_module(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert oversized(tmp_path) == [f"long.py: {MAX_LINES + 1} lines"]
