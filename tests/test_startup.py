"""The commands that do not measure start without torch: every ``--help`` and
``--version``, ``python -m queries`` and ``python -m analysis`` import neither torch nor
TransformerLens nor transformers (an import of torch alone took 0.9 s on 2 idle cores and
more than 10 s on busy ones). Timings: ``python -m etl.bench.startup`` (BENCHMARKS.md)."""

import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"etl.extract": "etl.extract", "etl.checkpoint": "etl.checkpoint",
                "analysis": "analysis.__main__", "queries": "queries.cli"}
"""Each ``python -m`` entry point → the module whose ``main`` it runs."""
HEAVY = ("torch", "transformer_lens", "transformers")
RUNNER = ("import json, runpy, sys\n"
          "sys.argv = sys.argv[1:]\n"
          "try:\n"
          "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
          "except SystemExit:\n"
          "    pass\n"
          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
"""Runs ``python -m MODULE ARGS...`` in this process, then prints the top-level packages it
imported as the last line of stdout."""


def heavy_imports(module: str, *args: str, cwd: Path = ROOT) -> list[str]:
    """The packages of ``HEAVY`` that ``python -m module args`` imported."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, module, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip(), proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    return [name for name in HEAVY if name in loaded]


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_torch(module, flag):
    assert heavy_imports(module, flag) == []


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_command_prints_the_same_version(module, capsys):
    main = importlib.import_module(ENTRY_POINTS[module]).main
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    version = importlib.metadata.version("entropy-warehouse")
    assert capsys.readouterr().out == f"entropy-warehouse {version}\n"


@pytest.mark.parametrize("args", [("queries", "list"), ("queries", "show", "top_heads"),
                                  ("analysis", "--list")])
def test_listing_commands_import_no_torch(args):
    assert heavy_imports(*args) == []


def test_query_commands_on_a_warehouse_import_no_torch(tmp_path):
    warehouse = str(tmp_path / "warehouse")
    assert heavy_imports("queries", "--warehouse", warehouse, "check") == []
    assert heavy_imports("queries", "--warehouse", warehouse, "sql", "select 1") == []
    assert heavy_imports("analysis", "--warehouse", warehouse, "--out",
                         str(tmp_path / "charts")) == []


def test_bad_arguments_are_refused_before_torch():
    """An argument error is reported before anything heavy loads."""
    assert heavy_imports("etl.extract", "--seq-len", "x") == []
    assert heavy_imports("etl.checkpoint", "--arch", "nope", "--out", "/nonexistent") == []
