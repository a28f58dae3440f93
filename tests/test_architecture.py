"""The shape of the code: data flows one way (etl → queries → analysis), no import cycles,
small modules and functions."""

import ast
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("etl", "queries", "analysis")
MAX_MODULE_LINES = 320
"""About 300 lines: a module is read in one sitting."""
MAX_FUNCTION_LINES = 55
"""About 50 lines: a function is read in one screen (docstring included); Triton kernels
are exempt (see ``_device_code``)."""
LAYERS = {"etl": 0, "queries": 1, "analysis": 2}
"""A package imports only from its own layer or lower ones."""


def modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports, at any depth of its code."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """An import cycle of ``graph`` (its modules, the first repeated last), or none."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        return [exc.args[1]]
    return []


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    from etl.lens import kernels\n"
                    "    from . import config\n")
    known = {"etl.lens.kernels": path, "etl.config": path, "etl.lens": path}
    assert imported("etl.m", path, known) == {"etl.lens", "etl.lens.kernels", "etl.config"}
    [cycle] = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert sorted(set(cycle)) == ["a", "b", "c"] and cycle[0] == cycle[-1]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_data_flows_one_way():
    wrong = [(name, target) for name, targets in import_graph().items()
             for target in targets
             if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]]
    assert wrong == []


def test_etl_imports_without_warehouse_and_chart_libraries():
    """The extraction side needs neither DuckDB, polars nor Altair (GPU images lack them)."""
    code = ("import sys\n"
            "for name in ('duckdb', 'polars', 'altair'):\n"
            "    sys.modules[name] = None\n"
            "import etl.extract, etl.runner, etl.bench, etl.lens.baseline, etl.gpu_check\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def _device_code(node: ast.FunctionDef) -> bool:
    """A Triton kernel (``@triton.jit``): it stays one function as measured on the GPU,
    since splitting device code changes what the compiler is given."""
    return any("triton.jit" in ast.unparse(d) for d in node.decorator_list)


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_and_functions_are_small(name):
    path = modules()[name]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path}: split it"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and not _device_code(node)]
    assert long == [], f"{path}: {long}"


def readme_layout() -> set[str]:
    """The files and folders that the README's "Code layout" tree names, as paths."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Code layout", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = re.match(r"((?:[\w.*/-]+(?:  |$))+)", line.strip()).group(1).split()
        del stack[depth:]
        for name in names:
            paths.add("/".join([*stack, name.rstrip("/")]))
        if names[0].endswith("/") and len(names) == 1:
            stack.append(names[0].rstrip("/"))
    return paths


def test_readme_layout_matches_the_tree():
    named = readme_layout()
    files = {path.relative_to(ROOT).as_posix() for path in modules().values()
             if path.name != "__init__.py"}
    assert files - named == set(), "modules the README's Code layout leaves out"
    missing = {p for p in named if "*" not in p and not (ROOT / p).exists()}
    assert missing == set(), "paths the README's Code layout names that do not exist"
