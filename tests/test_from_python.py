"""The README's "From Python" example runs as written, on a warehouse the test builds."""

import re
from pathlib import Path

import altair as alt
import polars as pl
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def warehouse(ioi_warehouse):
    return ioi_warehouse


def test_readme_example_runs_and_returns_frames_and_a_chart(warehouse):
    code = _example()
    assert 'Warehouse("data/warehouse")' in code
    scope: dict = {}
    exec(compile(code.replace("data/warehouse", str(warehouse)), "README", "exec"), scope)
    assert scope["run"] == "ioi"
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
        wh.chart("run_comparison", "ioi")
    with pytest.raises(UserError, match="unknown chart"):
        wh.chart("pie", "ioi")


def test_an_extraction_from_python(tiny_checkpoint, tmp_path):
    """The README's ``ExtractRunner(ExtractConfig(...), RunOptions(...)).run()``."""
    from etl.config import ExtractConfig, RunOptions
    from etl.run.runner import ExtractRunner

    config = ExtractConfig(model=str(tiny_checkpoint), dataset="ioi", n_prompts=2)
    options = RunOptions(warehouse=str(tmp_path), device="cpu", progress=False)
    result = ExtractRunner(config, options).run()
    assert result.run_id == config.default_run_id()
    assert result.manifest_path.is_file() and result.rows["tokens"] == result.n_tokens > 0
    assert "ExtractRunner(ExtractConfig(model=..., dataset=...), RunOptions(warehouse=...))" \
        in README.read_text(encoding="utf-8")
