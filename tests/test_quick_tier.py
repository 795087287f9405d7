"""The quick tier, `python -m pytest -q -m quick tests`: the inner loop's few minutes, beside the whole suite (CI).

Checked from the test files themselves (their `quick` marks and what the marked tests import or run), so a module
added to `d3/` without a quick test on its path fails here, and so does a tier that shrinks below 30 tests:
- the marker is registered (pyproject.toml), so `-m quick` selects and `--strict-markers` accepts it;
- at least 30 test functions are marked (parametrized cases count once);
- every module of `d3` is on a quick test's path: imported by it, or by a command it runs (`infer.py`, `evaluate.py`,
  `train_*.py`, `python -m d3.x`, a `d3-*` console command), or by a module it imports; one step only, not the whole
  import closure (which from any entry point is nearly the whole package). A `__main__` that dispatches to its
  package's modules by name (`python -m d3.prepare <source>`) reaches them all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from tests.test_architecture import ROOT, import_graph, imports_of, module_name

pytestmark = pytest.mark.quick

ENTRY_POINTS = ("infer", "evaluate", "train_depth", "train_normal", "train_matting")
MIN_QUICK_TESTS = 30
# pyproject.toml's console commands -> the module of the function each runs ("d3-infer" -> "d3.cli")
_SCRIPTS_TABLE = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
CONSOLE_SCRIPTS = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+):', _SCRIPTS_TABLE, re.M))


def is_quick_mark(node: ast.AST) -> bool:
    """`pytest.mark.quick`, alone or inside a list/tuple (`pytestmark = [pytest.mark.quick, ...]`)."""
    return any(isinstance(n, ast.Attribute) and n.attr == "quick" and isinstance(n.value, ast.Attribute)
               and n.value.attr == "mark" for n in ast.walk(node))


def quick_tests(tree: ast.Module) -> tuple[list[ast.FunctionDef], bool]:
    """The test functions marked quick (all of them when the module's `pytestmark` is), and whether the module is."""
    whole = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                and is_quick_mark(n.value) for n in tree.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            if whole or any(is_quick_mark(d) for d in node.decorator_list):
                found.append(node)
    return found, whole


def commands_of(modules: set[str]) -> set[str]:
    """The modules of `d3` that `python -m` runs: a package with a `__main__`, a module with a `__main__` block."""
    out = set()
    for name in modules:
        path = ROOT / Path(*name.split("."))
        if (path / "__main__.py").is_file() or (path.with_suffix(".py").is_file()
                                                 and 'if __name__ == "__main__"' in path.with_suffix(".py").read_text()):
            out.add(name)
    return out


def names_run(node: ast.AST, commands: set[str]) -> set[str]:
    """Entry points and `d3` commands a test names in strings: "infer.py", ROOT / "evaluate.py", "-m", "d3.tiny"."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            text = n.value
            for name in ENTRY_POINTS:
                if re.search(rf"(^|[/\s]){name}\.py\b", text):
                    found.add(name)
            if text.split(" ")[0] in commands:  # "d3.tiny", or "d3.prepare hypersim" (a subcommand)
                found.add(text.split(" ")[0])
            if text in CONSOLE_SCRIPTS:  # "d3-infer": pyproject.toml's console command, run from its module
                found.add(CONSOLE_SCRIPTS[text])
    return found


def quick_reach(tests_dir: Path = ROOT / "tests") -> tuple[int, set[str]]:
    """(number of quick test functions, the modules of `d3` they reach): a module a quick test imports, or a command
    it runs (`infer.py`, `python -m d3.tiny`, `d3-infer`) or whose `__main__` it imports, with the modules that one
    imports (one step: those it calls into; a package's, its own modules)."""
    graph = import_graph()
    modules = set(graph)
    # What running an entry point imports, with the package modules that are links to it (d3/_scripts/infer.py).
    links = {(ROOT / f"{name}.py").resolve(): name for name in ENTRY_POINTS}
    scripts = {name: imports_of(ROOT / f"{name}.py", modules) for name in ENTRY_POINTS}
    for path in (ROOT / "d3").rglob("*.py"):
        if path.is_symlink() and path.resolve() in links:
            scripts[links[path.resolve()]].add(module_name(path))
    commands = commands_of(modules)
    count, reached = 0, set()
    for path in sorted(tests_dir.glob("test_*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue  # this file's own cases are text, not tests of d3
        tree = ast.parse(path.read_text())
        tests, whole = quick_tests(tree)
        if not tests:
            continue
        count += len(tests)
        top = ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))],
                         type_ignores=[])
        for node in [top, *tests] + ([tree] if whole else []):
            for name in _imports(node):
                if name in scripts:
                    reached |= scripts[name]
                elif name.endswith(".__main__"):  # a command's module, imported to call its main: it runs, with
                    package = name.rpartition(".")[0]  # the subcommands it dispatches to (the package's modules)
                    reached |= {name} | graph[name] | {m for m in modules if m.startswith(package + ".")}
                elif name in modules:  # the module, and the modules it calls into (one step)
                    reached |= {name} | graph[name]
            for name in names_run(node, commands):
                start = scripts[name] if name in scripts else {name, f"{name}.__main__"} & modules
                if f"{name}.__main__" in modules:  # `python -m d3.prepare`: the subcommands are the package's modules
                    start |= {m for m in modules if m.startswith(name + ".")}
                reached |= start | set().union(*(graph[m] for m in start if m in graph))
    reached |= {m.rpartition(".")[0] for m in reached}  # importing a module runs its package's __init__
    return count, reached & modules


def _imports(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
    return out


def test_the_quick_marker_is_registered(pytestconfig):
    assert "quick" in [m.split(":")[0].strip() for m in pytestconfig.getini("markers")]
    assert CONSOLE_SCRIPTS["d3-infer"] == "d3.cli"  # and the console commands are read


def test_the_quick_tier_has_enough_tests_and_reaches_every_module():
    count, reached = quick_reach()
    packages = {"d3.data", "d3.prepare", "d3._scripts"}  # __init__ files without code of their own
    missing = sorted(set(import_graph()) - reached - packages)
    assert count >= MIN_QUICK_TESTS, f"only {count} quick tests"
    assert missing == [], "mark a test on these modules' main path `@pytest.mark.quick`"


def test_the_reach_check_sees_marks_imports_and_commands(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import pytest\nfrom d3.metrics import abs_rel\n\n"
        "@pytest.mark.quick\ndef test_one():\n    from d3 import losses\n    run(['python', 'infer.py'])\n\n"
        "def test_two():\n    from d3 import heads\n")
    (tmp_path / "test_b.py").write_text("import pytest\nimport d3.io\npytestmark = pytest.mark.quick\n\n"
                                        "def test_three():\n    run(['python', '-m', 'd3.tiny'])\n")
    count, reached = quick_reach(tmp_path)
    assert count == 2
    assert {"d3.metrics", "d3.losses", "d3.io", "d3.tiny", "d3.outputs", "d3.flags"} <= reached
    assert "d3.heads" not in reached  # imported by an unmarked test only
    assert "d3.tiny_vae" in reached and "d3.data.synthetic" not in reached  # one step from d3.tiny, not two
