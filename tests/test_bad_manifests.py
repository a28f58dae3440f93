"""One bad run never blocks the rest: a manifest that is not what ``Manifest`` declares (too
large, a field of another type, a time that is not one, a table missing, a shard listed
twice, another run's id) or that reaches its files through a symbolic link leaves its own run
out, with one warning naming it, in ``sql``, ``check``, ``analysis`` and the Python API."""

import json
import shutil

import pytest

from analysis.__main__ import main as analysis_main
from analysis.api import Warehouse
from queries.cli import main as query_main
from tests.test_query_safety import write_run


def _edit(root, run_id, change):
    path = root / "runs" / f"run_id={run_id}" / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _symlink_partition(root, table, run_id, target):
    partition = root / table / f"run_id={run_id}"
    shutil.rmtree(partition)
    partition.symlink_to(target, target_is_directory=True)


BAD = {
    "huge-field": (lambda d: d.update(notes="x" * (9 << 20)), "larger than 8 MiB"),
    "n_layers-a-string": (lambda d: d.update(n_layers="two"),
                          "its field 'n_layers' is \"two\", not of type int"),
    "created_at-not-a-time": (lambda d: d.update(created_at="yesterday-ish"),
                              "its field 'created_at' is \"yesterday-ish\", not an ISO 8601"),
    "shard-twice": (lambda d: d["shards"]["tokens"].append(d["shards"]["tokens"][0]),
                    "it lists the tokens shard 'part-g1-00000.parquet' twice"),
    "no-tokens": (lambda d: d["shards"].pop("tokens"), "it lists no tokens shards"),
    "another-run-id": (lambda d: d.update(run_id="good"), "it is the manifest of run \"good\""),
    "generation-a-path": (lambda d: d.update(generation="x/../../run_id=good/sums-g1"),
                          "its field 'generation' is \"x/../../run_id=good/sums-g1\", not a "
                          "plain name"),
    "batch-size-negative": (lambda d: d["config"].update(batch_size=-1),
                            "its config field 'batch_size' is -1, not a whole number of at "
                            "least 1"),
    "n_seqs-negative": (lambda d: d.update(n_seqs=-4),
                        "its field 'n_seqs' is -4, not a count (0 or more)"),
}


@pytest.fixture(params=[*BAD, "partition-outside", "partition-of-another-run"])
def bad(request, tmp_path):
    """A warehouse with run ``good`` and run ``bad`` broken as the parameter says; yields
    (root, what the warning must say)."""
    root = tmp_path / "wh"
    write_run(root, "good", seed=0)
    write_run(root, "bad", seed=1)
    if request.param in BAD:
        change, says = BAD[request.param]
        _edit(root, "bad", change)
    elif request.param == "partition-outside":
        outside = tmp_path / "outside"
        shutil.copytree(root / "tokens" / "run_id=bad", outside)
        _symlink_partition(root, "tokens", "bad", outside)
        says = "its tokens file 'part-g1-00000.parquet' is reached through a symbolic link"
    else:
        _symlink_partition(root, "component_effects", "bad", root / "component_effects" /
                           "run_id=good")
        says = "its component_effects file 'part-g1-00000.parquet' is reached through a sym"
    return root, says


def _warning(err: str, says: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: left out run bad"), err
    assert says in lines[0], err


def test_a_bad_manifest_leaves_only_its_own_run_out(bad, tmp_path, capsys):
    root, says = bad
    capsys.readouterr()
    assert query_main(["sql", "select run_id, count(*) as n from tokens group by run_id",
                       "--warehouse", str(root), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["run_id,n", "good,8"]
    _warning(err, says)

    assert query_main(["sql", "select run_id, created_at, n_layers from runs", "--warehouse",
                       str(root), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == ["good,2024-01-01T00:00:00.000000+0000,2"]
    _warning(err, says)

    assert query_main(["check", "--warehouse", str(root)]) == 1  # it names the bad run
    out = capsys.readouterr().out
    assert "FAIL files: run bad: " in out and says in out
    assert "PASS entropy_bounds" in out  # the data tests ran on the good run

    wh = Warehouse(root)
    assert wh.runs()["run_id"].to_list() == ["good"]
    _warning(capsys.readouterr().err, says)
    assert analysis_main(["--warehouse", str(root), "--out", str(tmp_path / "charts"),
                          "--format", "svg", "--chart", "heatmap", "--no-progress"]) == 0
    assert [p.parent.name for p in (tmp_path / "charts").glob("*/heatmap.svg")] == ["good"]


def test_a_manifest_nested_too_deeply_leaves_its_run_out(tmp_path, capsys):
    root = tmp_path / "wh"
    write_run(root, "good", seed=0)
    write_run(root, "bad", seed=1)
    (root / "runs" / "run_id=bad" / "manifest.json").write_text(
        '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert query_main(["sql", "select distinct run_id from tokens", "--warehouse", str(root),
                       "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["run_id", "good"]
    _warning(err, "nests too deeply")
