"""``python -m analysis`` on inputs that gave wrong or misleading results: an output folder
inside the warehouse is refused in one line with nothing written."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from analysis.__main__ import main as analysis_main
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
