"""``python -m analysis`` on inputs that gave wrong or misleading results: an output folder
inside the warehouse is refused in one line with nothing written, and a run emptied
consistently (its manifest lists shards of zero rows; ``check`` passes it) is left out with
one line while the other runs are drawn."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from analysis.__main__ import main as analysis_main
from analysis.api import Warehouse as NotebookWarehouse
from analysis.catalog import ALL_CHARTS, CHARTS
from etl.errors import UserError
from queries.cli import main as query_main
from tests.test_query_safety import one_line_error, write_run


def empty_run(root, run_id):
    """Rewrite every shard of ``run_id`` as a Parquet file of its schema with no rows, and
    its manifest to match (rows, sha256, row and token counts): consistent, and empty."""
    path = root / "runs" / f"run_id={run_id}" / "manifest.json"
    manifest = json.loads(path.read_text())
    for table, shards in manifest["shards"].items():
        for shard in shards:
            file = root / table / f"run_id={run_id}" / shard["file"]
            pq.write_table(pq.read_schema(file).empty_table(), file)
            shard.update(rows=0, sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    manifest.update(n_component_rows=0, n_resid_rows=0, n_token_rows=0, n_seqs=0, n_tokens=0)
    path.write_text(json.dumps(manifest))


@pytest.fixture()
def root(tmp_path):
    """Run ``good`` and run ``hollow``, emptied consistently."""
    root = tmp_path / "wh"
    write_run(root, "good", seed=0)
    write_run(root, "hollow", seed=1)
    empty_run(root, "hollow")
    return root


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("inside", [".", "runs", "charts", "component_effects/run_id=good"])
def test_out_inside_the_warehouse_is_refused_and_nothing_is_written(root, capsys, inside):
    before = _files(root)
    code = analysis_main(["--warehouse", str(root), "--out", str(root / inside),
                          "--no-progress", "--format", "html", "--chart", "heatmap"])
    err = one_line_error(capsys)
    assert code == 2 and f"--out {str(root / inside)!r} is inside the warehouse" in err
    assert _files(root) == before and not (root / "charts").exists()


def test_out_inside_the_warehouse_through_a_link_is_refused(root, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(root / "runs", target_is_directory=True)
    before = _files(root)
    assert analysis_main(["--warehouse", str(root), "--out", str(link / "charts"),
                          "--no-progress", "--format", "html"]) == 2
    assert "is inside the warehouse" in one_line_error(capsys)
    assert _files(root) == before


def test_an_emptied_run_passes_check(root, capsys):
    assert query_main(["check", "--warehouse", str(root)]) == 0


def test_an_emptied_run_is_left_out_in_one_line_and_the_rest_is_drawn(root, tmp_path, capsys):
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(root), "--out", str(out), "--no-progress",
                          "--format", "html"]) == 0
    err = capsys.readouterr().err
    hollow = [line for line in err.splitlines() if "hollow" in line]
    assert len(hollow) == 1 and "holds no rows" in hollow[0], err
    assert {p.stem for p in (out / "good").glob("*.html")} == {*CHARTS, "explorer"} - \
        {"run_comparison"}
    assert not (out / "hollow").exists() and not list(out.glob("*__vs__*"))
    index = (out / "index.html").read_text()
    assert index.count("Not drawn: run hollow holds no rows") == len(ALL_CHARTS)


def test_an_emptied_run_alone_gives_the_index_and_its_notes(root, tmp_path, capsys):
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(root), "--out", str(out), "--no-progress",
                          "--format", "html", "--run", "hollow", "--chart", "explorer"]) == 0
    assert "holds no rows" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["index.html"]


def test_the_python_api_refuses_an_emptied_runs_chart_in_one_line(root):
    with pytest.raises(UserError, match="run hollow holds no rows"):
        NotebookWarehouse(root).chart("explorer", "hollow")
