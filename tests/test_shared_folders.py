"""Runs of one warehouse share its folders (``_staging``, the tables' folders): one run
removing a shared folder it left empty must never break another creating its own folder
inside it. Real processes racing on one folder, many times over."""

import multiprocessing as mp
from pathlib import Path

from etl.warehouse.storage import make_dirs, remove_empty_dir, remove_tree


def _stage_and_clean(root: str, name: str, rounds: int, errors) -> None:
    """What a run does to the shared staging root: create its folder in it, write into it,
    remove it, and remove the root if it was left empty."""
    try:
        for i in range(rounds):
            own = Path(root) / f"{name}-{i}" / "component_effects"
            make_dirs(own)
            (own / "shard.parquet").write_bytes(b"x")
            remove_tree(own.parent)
            remove_empty_dir(Path(root))
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"{name}: {type(exc).__name__}: {exc}")


def test_runs_creating_and_removing_folders_in_one_root_never_fail(tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    root = tmp_path / "_staging"
    procs = [ctx.Process(target=_stage_and_clean, args=(str(root), f"run{k}", 400, errors))
             for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    assert not root.exists() or not any(root.iterdir())


def test_removing_a_folder_another_run_already_removed_or_filled_is_quiet(tmp_path):
    remove_empty_dir(tmp_path / "gone")  # absent: nothing to do
    full = tmp_path / "full"
    (full / "run").mkdir(parents=True)
    remove_empty_dir(full)  # not empty: kept
    assert (full / "run").is_dir()
