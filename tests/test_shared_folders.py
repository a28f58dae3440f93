"""Runs of one warehouse share its folders (``_staging``, the tables' folders): one run
removing a shared folder it left empty must never break another creating its own folder
inside it. Real processes racing on one folder, many times over."""

import multiprocessing as mp
from pathlib import Path

import pytest

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


def test_a_parent_removed_between_mkdir_and_its_check_is_made_again(tmp_path, monkeypatch):
    """The interleaving CI once met: another run's ``mkdir`` of the shared root wins, so ours
    fails with EEXIST, and the root is removed as empty before ``Path.mkdir`` checks that it
    is a folder. Played here in one process, deterministically."""
    import os

    root = tmp_path / "_staging"
    real_mkdir = os.mkdir
    raced = []

    def mkdir_losing_one_race(path, mode=0o777):
        if Path(path) == root and not raced:
            raced.append(path)  # another run made it, then removed it as empty
            raise FileExistsError(17, "File exists", str(path))
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", mkdir_losing_one_race)
    make_dirs(root / "run0" / "component_effects")
    assert raced and (root / "run0" / "component_effects").is_dir()


def test_a_file_where_a_folder_should_be_still_fails(tmp_path):
    """Retrying covers a folder that vanished, never a file in the way: it still raises."""
    (tmp_path / "taken").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "taken")
    with pytest.raises(NotADirectoryError):
        make_dirs(tmp_path / "taken" / "run0")
