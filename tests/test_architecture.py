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
MAX_MODULE_LINES = 300
"""A module is read in one sitting."""
MAX_FUNCTION_LINES = 50
"""A function is read in one screen (docstring included); Triton kernels are exempt (see
``_device_code``)."""
LAYERS = {"etl": 0, "queries": 1, "analysis": 2}
"""A package imports only from its own layer or lower ones."""
FLOORS = {"etl": 0, "etl.errors": 0, "etl.lens": 1, "etl.model": 2, "etl.warehouse": 2,
          "etl.sources": 3, "etl.config": 3, "etl.run": 4, "etl.extract": 5,
          "etl.checkpoint": 5, "etl.bench": 6}
"""The rooms of ``etl``, lowest first: a module imports (outside type annotations) only from
its own room or from rooms on lower floors; nothing but the benchmarks imports ``etl.run``'s
callers, and nothing imports the benchmarks."""
ETL_FACES = {"etl", "etl.warehouse", "etl.errors"}
"""What ``queries`` and ``analysis`` may import of ``etl``: the warehouse and the errors."""


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


def _type_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (annotations only)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            found.update(id(n) for n in ast.walk(node))
    return found


def imported(name: str, path: Path, known: dict[str, Path],
             runtime_only: bool = False) -> set[str]:
    """The project modules that module ``name`` imports, at any depth of its code
    (``runtime_only``: leaving out imports for type annotations only)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def import_graph(runtime_only: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known, runtime_only) for name, path in known.items()}


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
    """(Imports for type annotations only, under ``TYPE_CHECKING``, run no code.)"""
    assert cycles(import_graph(runtime_only=True)) == []


def test_data_flows_one_way():
    wrong = [(name, target) for name, targets in import_graph().items()
             for target in targets
             if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]]
    assert wrong == []


def _floor(name: str) -> tuple[str, int]:
    """The room of an ``etl`` module (the longest ``FLOORS`` prefix) and its floor."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        room = ".".join(parts[:n])
        if room in FLOORS:
            return room, FLOORS[room]
    raise AssertionError(f"{name} is in no room of FLOORS")


def test_etl_rooms_import_only_downwards():
    known = modules()
    wrong = []
    for name, path in known.items():
        if not name.startswith("etl"):
            continue
        room, floor = _floor(name)
        for target in imported(name, path, known, runtime_only=True):
            there, level = _floor(target)
            if there != room and level >= floor:
                wrong.append((name, target))
    assert wrong == []


def test_nothing_imports_the_benchmarks():
    users = [(name, target) for name, targets in import_graph().items() for target in targets
             if target.startswith("etl.bench") and not name.startswith("etl.bench")]
    assert users == []


def test_queries_and_analysis_reach_etl_through_the_warehouse_only():
    wrong = [(name, target) for name, targets in import_graph().items()
             if not name.startswith("etl") for target in targets
             if target.startswith("etl") and target not in ETL_FACES]
    assert wrong == []


def test_the_runner_never_looks_at_the_worker_count():
    """``--workers 1`` and ``--workers N`` run the same runner code: only the executor it is
    given differs (``etl.run.executors.executor_for``)."""
    tree = ast.parse((ROOT / "etl" / "run" / "runner.py").read_text(encoding="utf-8"))
    assert [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "workers"] == []


def test_etl_imports_without_warehouse_and_chart_libraries():
    """The extraction side needs neither DuckDB, polars nor Altair (GPU images lack them)."""
    code = ("import sys\n"
            "for name in ('duckdb', 'polars', 'altair'):\n"
            "    sys.modules[name] = None\n"
            "import etl.extract, etl.run.runner, etl.bench.entropy, etl.bench.e2e\n"
            "import etl.lens.baseline, etl.bench.gpu_check\n")
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
