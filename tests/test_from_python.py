"""The README's "From Python" example runs as written, on a warehouse the test builds."""

import re
from pathlib import Path

import altair as alt
import polars as pl
import pytest

from etl.extract import main as extract_main

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def warehouse(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("from-python")
    assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(root),
                         "--no-progress", "--device", "cpu", "--dataset", "ioi",
                         "--n-prompts", "4", "--run-id", "notebook"]) == 0
    return root


def test_readme_example_runs_and_returns_frames_and_a_chart(warehouse):
    code = _example()
    assert 'Warehouse("data/warehouse")' in code
    scope: dict = {}
    exec(compile(code.replace("data/warehouse", str(warehouse)), "README", "exec"), scope)
    assert scope["run"] == "notebook"
    assert isinstance(scope["top"], pl.DataFrame) and scope["top"].height == 5
    heads = scope["heads"]
    assert heads.height == 2 * 4  # gpt2-tiny: 2 layers × 4 heads
    assert heads["mean_diff"].to_list() == sorted(heads["mean_diff"].to_list(), reverse=True)
    assert isinstance(scope["chart"], alt.TopLevelMixin) and scope["chart"].to_dict()


def test_errors_are_one_line_user_errors(warehouse):
    from analysis.api import Warehouse
    from etl.errors import UserError

    wh = Warehouse(warehouse)
    assert "top_heads" in wh.queries()
    with pytest.raises(UserError, match="unknown query"):
        wh.query("no_such_query")
    with pytest.raises(UserError, match="no parameter"):
        wh.query("top_heads", nope=1)
    with pytest.raises(UserError, match="compares two runs"):
        wh.chart("run_comparison", "notebook")
    with pytest.raises(UserError, match="unknown chart"):
        wh.chart("pie", "notebook")
