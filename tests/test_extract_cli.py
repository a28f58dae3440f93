"""``python -m etl.extract`` end to end on a random-init tiny model, read back through SQL."""

import json

import numpy as np
import pytest
import torch

from etl.extract import main as extract_main
from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import connect
from tests.reference import reference_measures

N_LAYERS, N_HEADS = 2, 4  # gpt2-tiny


def _extract(checkpoint, warehouse, *args):
    return extract_main(["--model", str(checkpoint), "--warehouse", str(warehouse),
                         "--no-progress", "--device", "cpu", *args])


@pytest.fixture(scope="module")
def warehouse(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("warehouse")
    text_dir = tmp_path_factory.mktemp("text")
    (text_dir / "story.txt").write_text(
        "Once upon a time there was a small warehouse full of numbers. " * 30)
    assert _extract(tiny_checkpoint, root, "--dataset", "ioi", "--n-prompts", "6",
                    "--batch-size", "4", "--run-id", "ioi-default") == 0
    assert _extract(tiny_checkpoint, root, "--dataset", "text", "--data-files",
                    str(text_dir / "*.txt"), "--n-batches", "2", "--batch-size", "2",
                    "--seq-len", "24", "--lens", "recomputed-ln", "--ablation", "mean",
                    "--run-id", "text-recomputed-mean") == 0
    return root


def _frame(root, sql):
    return connect(Warehouse(root)).sql(sql).pl()


def test_row_counts_are_exact(warehouse):
    runs = _frame(warehouse, "select * from runs order by run_id")
    assert runs["run_id"].to_list() == ["ioi-default", "text-recomputed-mean"]
    for run in runs.iter_rows(named=True):
        n_tok = run["n_seqs"] * run["seq_len"]
        assert run["n_tokens"] == n_tok
        counts = _frame(warehouse, f"""
            select (select count(*) from component_effects where run_id = '{run["run_id"]}'),
                   (select count(*) from resid_entropy where run_id = '{run["run_id"]}'),
                   (select count(*) from tokens where run_id = '{run["run_id"]}')""").row(0)
        assert counts == (N_LAYERS * (N_HEADS + 1) * n_tok, (2 * N_LAYERS + 1) * n_tok, n_tok)
        assert (run["n_layers"], run["n_heads"]) == (N_LAYERS, N_HEADS)
    text = runs.filter(runs["run_id"] == "text-recomputed-mean").row(0, named=True)
    assert (text["n_seqs"], text["seq_len"], text["lens"], text["ablation"]) == \
        (4, 24, "recomputed-ln", "mean")


def test_manifest_records_the_run(warehouse):
    path = warehouse / "runs" / "run_id=ioi-default" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("config", "model_identity", "dataset_fingerprint", "packages", "git_commit",
                "device", "dtype", "timing", "tokens_per_s", "n_component_rows"):
        assert key in manifest
    assert manifest["model_identity"]["tokenizer"]["vocab_size"] == 50257
    assert manifest["packages"]["torch"]
    assert manifest["dtype"] == "float32" and manifest["device"] == "cpu"


def _stored(root, run_id, n_seqs, seq_len):
    comp = _frame(root, f"""
        select seq, position, layer, coalesce(head, {N_HEADS}) as c, entropy_diff,
               entropy_marginal
        from component_effects where run_id = '{run_id}'""")
    diff = np.full((n_seqs, seq_len, N_LAYERS, N_HEADS + 1), np.nan)
    marg = diff.copy()
    idx = tuple(comp[c].to_numpy() for c in ("seq", "position", "layer", "c"))
    diff[idx], marg[idx] = comp["entropy_diff"].to_numpy(), comp["entropy_marginal"].to_numpy()
    resid_rows = _frame(root, f"""
        select seq, position,
               case when point = 'final' then {2 * N_LAYERS}
                    else 2 * layer + (point = 'resid_mid')::int end as p, entropy
        from resid_entropy where run_id = '{run_id}'""")
    resid = np.full((n_seqs, seq_len, 2 * N_LAYERS + 1), np.nan)
    resid[tuple(resid_rows[c].to_numpy() for c in ("seq", "position", "p"))] = \
        resid_rows["entropy"].to_numpy()
    return diff, marg, resid


@pytest.mark.parametrize("run_id,lens,ablation", [("ioi-default", "final-scale", "zero"),
                                                  ("text-recomputed-mean", "recomputed-ln",
                                                   "mean")])
def test_stored_rows_equal_float64_reference(warehouse, tiny_model, run_id, lens, ablation):
    toks = _frame(warehouse, f"""select seq, position, token_id, is_pad from tokens
                                where run_id = '{run_id}' order by seq, position""")
    n_seqs, seq_len = toks["seq"].max() + 1, toks["position"].max() + 1
    ids = torch.tensor(toks["token_id"].to_numpy().reshape(n_seqs, seq_len), dtype=torch.long)
    mask = torch.tensor(~toks["is_pad"].to_numpy().reshape(n_seqs, seq_len))
    ref = reference_measures(tiny_model.bridge, ids, lens, ablation, mask)
    stored = _stored(warehouse, run_id, n_seqs, seq_len)
    for got, want in zip(stored, ref, strict=True):
        assert not np.isnan(got).any()
        assert np.abs(got - want.numpy()).max() < 1e-4


def test_ioi_tokens_carry_roles(warehouse):
    roles = _frame(warehouse, """select role, count(*) n from tokens
                                 where run_id = 'ioi-default' and role is not null group by role""")
    assert dict(roles.iter_rows()) == {"IO": 6, "S1": 6, "S2": 6, "end": 6, "answer": 6}
    bos = _frame(warehouse, "select bool_and(is_bos = (position = 0)) from tokens").item()
    assert bos


def test_query_cli_reads_back_csv_and_json(warehouse, capsys):
    sql = "select run_id, count(*) as n from component_effects group by run_id order by run_id"
    assert query_main(["--warehouse", str(warehouse), "sql", sql, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "run_id,n" and lines[1].startswith("ioi-default,")
    assert query_main(["--warehouse", str(warehouse), "sql", sql, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == ["ioi-default", "text-recomputed-mean"]
    assert query_main(["--warehouse", str(warehouse), "sql", sql]) == 0
    assert "ioi-default" in capsys.readouterr().out


def test_existing_run_is_not_overwritten_silently(warehouse, tiny_checkpoint, capsys):
    before = (warehouse / "runs" / "run_id=ioi-default" / "manifest.json").read_text()
    args = ("--dataset", "ioi", "--n-prompts", "6", "--run-id", "ioi-default")
    assert _extract(tiny_checkpoint, warehouse, *args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (warehouse / "runs" / "run_id=ioi-default" / "manifest.json").read_text() == before
    assert _extract(tiny_checkpoint, warehouse, *args, "--batch-size", "2", "--overwrite") == 0
    after = json.loads((warehouse / "runs" / "run_id=ioi-default" / "manifest.json").read_text())
    assert after["config"]["batch_size"] == 2
    assert not (warehouse / "_staging").exists()


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.mark.parametrize("args,expected", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--model", "openai-community/gpt2"], "not available offline"),
    (["--dataset", "text", "--data-files", "/no/such/dir/*.txt"], "matched no file"),
    (["--dataset", "text"], "needs --data-files"),
    (["--run-id", "bad/id"], "bad --run-id"),
    (["--run-id=-x"], "bad --run-id"),
    (["--lens", "fancy"], "invalid choice"),
    (["--dtype", "float16"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, expected):
    argv = ["--warehouse", str(tmp_path / "wh"), "--no-progress", "--dataset", "ioi", *args]
    assert extract_main(argv) == 2
    assert expected in _one_line_error(capsys)


def test_seq_len_above_context_and_empty_files(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert _extract(tiny_checkpoint, tmp_path / "wh", "--dataset", "text", "--data-files",
                    str(tmp_path / "empty.txt"), "--seq-len", "16") == 2
    assert "no text" in _one_line_error(capsys)
    (tmp_path / "some.txt").write_text("words " * 50)
    assert _extract(tiny_checkpoint, tmp_path / "wh", "--dataset", "text", "--data-files",
                    str(tmp_path / "some.txt"), "--seq-len", "5000") == 2
    assert "above the model's context of 256" in _one_line_error(capsys)
    assert not (tmp_path / "wh" / "runs").exists()


def test_query_cli_errors(tmp_path, warehouse, capsys):
    assert query_main(["--warehouse", str(tmp_path / "none"), "sql", "select 1"]) == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert query_main(["--warehouse", str(tmp_path / "empty"), "sql", "select 1"]) == 2
    assert "no complete run" in _one_line_error(capsys)
    assert query_main(["--warehouse", str(warehouse), "sql", "select * from nope"]) == 2
    assert "SQL error" in _one_line_error(capsys)


def test_a_file_url_warehouse_is_that_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "wh"
    assert extract_main(["--model", str(tiny_checkpoint), "--dataset", "ioi", "--n-prompts",
                         "2", "--device", "cpu", "--no-progress", "--run-id", "r",
                         "--warehouse", f"file://{target}"]) == 0
    assert Warehouse(target).has_run("r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wh"]  # no ./file:/... folder


def test_progress_bars_end_full_in_a_log(tiny_checkpoint, tmp_path, capsys):
    assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(tmp_path / "wh"),
                         "--dataset", "ioi", "--n-prompts", "5", "--batch-size", "2"]) == 0
    log = capsys.readouterr().err.replace("\r", "\n").splitlines()
    for bar in ("rows written", "extract"):
        last = [line for line in log if line.lstrip().startswith(bar)][-1]
        assert "100%" in last, last
