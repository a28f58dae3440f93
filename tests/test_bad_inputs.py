"""Bad input to ``python -m etl.extract`` ends as one ``error:`` line and exit code 2,
before the model load wherever it can; plus signals, write errors, damaged checkpoints,
non-finite measures and the piecewise tokenisation of long documents."""

import errno
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import etl.extract
import etl.run.runner
import etl.warehouse.storage
from etl.errors import Terminated, UserError
from etl.extract import main
from etl.lens.measures import first_non_finite
from etl.lens.types import BatchMeasures
from etl.model.loading import check_weights_finite
from etl.sources import packing
from etl.sources.local_files import load_local_texts
from etl.sources.packing import pack_documents, tokenize_pieces

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ---------------------------------------------------------------------------- fixtures


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Good and bad data files, one per case."""
    d = tmp_path_factory.mktemp("data")
    _write(d / "good.txt", "A short story about numbers in a warehouse. " * 20)
    _write(d / "tiny.txt", "only a few words")
    _write(d / "empty.txt", "")
    _write(d / "blank.txt", "  \n\t\n   ")
    _write(d / "latin1.txt", "caf\xe9 au lait ".encode("latin-1") * 10)
    _write(d / "notes.csv", "text\nhello\n")
    _write(d / "paper.pdf", b"%PDF-1.4")
    (d / "folder.txt").mkdir()
    (d / "sub").mkdir()
    _write(d / "sub" / "inner.txt", "nested text " * 10)
    files = {
        "int.jsonl": _jsonl({"text": 3}),
        "nulls.jsonl": _jsonl({"text": None}, {"text": None}),
        "list.jsonl": _jsonl({"text": ["a", "b"]}),
        "object.jsonl": _jsonl({"text": {"a": 1}}),
        "bool.jsonl": _jsonl({"text": True}),
        "mixed.jsonl": _jsonl({"text": "fine words here"}, {"text": 7.5}),
        "broken.jsonl": '{"text": "a"}\n{"text": "b"\n',
        "body.jsonl": _jsonl({"body": "no text column"}),
        "empty.jsonl": "",
        "numbers.json": "[1, 2, 3]",
        "scalar.json": "3",
        "latin1.jsonl": b'{"text": "caf\xe9"}\n',
    }
    for name, content in files.items():
        _write(d / name, content)
    pq.write_table(pa.table({"text": [1, 2]}), d / "int.parquet")
    pq.write_table(pa.table({"text": [["a"], ["b"]]}), d / "list.parquet")
    pq.write_table(pa.table({"body": ["x"]}), d / "body.parquet")
    pq.write_table(pa.table({"text": pa.array([None, None], type=pa.string())}),
                   d / "nulls.parquet")
    _write(d / "garbage.parquet", b"this is not parquet")
    _write(d / "zero.parquet", b"")
    _write(d / "locked.txt", "secret words " * 10)
    os.chmod(d / "locked.txt", 0)
    return d


def _variant(src: Path, dst: Path, drop=(), replace=None) -> Path:
    """A copy of checkpoint ``src`` (hard links) without ``drop`` and with ``replace``d
    files (written as new files, so the source stays intact)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in drop and f.name not in (replace or {}):
            os.link(f, dst / f.name)
    for name, data in (replace or {}).items():
        _write(dst / name, data)
    return dst


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    """Damaged copies of the tiny checkpoint."""
    m = tmp_path_factory.mktemp("models")
    src = Path(tiny_checkpoint)
    weights = (src / "model.safetensors").read_bytes()
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                       "special_tokens_map.json"}
    _variant(src, m / "no-tokenizer", drop=tokenizer_files)
    _variant(src, m / "vocab-only", drop=tokenizer_files, replace={"vocab.json": "{}"})
    _variant(src, m / "truncated", replace={"model.safetensors": weights[: len(weights) // 2]})
    _variant(src, m / "garbage-config", replace={"config.json": "{not json"})
    _variant(src, m / "list-config", replace={"config.json": "[]"})
    _variant(src, m / "typeless-config", replace={"config.json": "{}"})
    _variant(src, m / "no-weights", drop={"model.safetensors"})
    _variant(src, m / "tiny-weights", replace={"model.safetensors": b"abc"})
    _variant(src, m / "zero-weights", replace={"model.safetensors": b""})
    _variant(src, m / "bad-header", replace={"model.safetensors": b"\x05" + b"\0" * 7 + b"{{{{{"})
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    _variant(src, m / "missing-shard", drop={"model.safetensors"},
             replace={"model.safetensors.index.json": json.dumps(index)})
    _variant(src, m / "no-config", drop={"config.json"})
    (m / "empty-dir").mkdir()
    return m


@pytest.fixture(scope="module")
def done_warehouse(tmp_path_factory):
    """A warehouse holding a complete run ``done``."""
    root = tmp_path_factory.mktemp("done-warehouse")
    _write(root / "runs" / "run_id=done" / "manifest.json", "{}")
    return root


# ------------------------------------------------------------------------- bad inputs

TEXT = ["--dataset", "text", "--seq-len", "16", "--data-files"]
IOI = ["--dataset", "ioi", "--n-prompts", "2"]
OWT = ["--dataset", "openwebtext", "--seq-len", "16"]
BEFORE, AFTER = "before", "after"

CASES = [
    # argument syntax
    ("int-n-batches", ["--n-batches", "abc"], "invalid int value", BEFORE),
    ("float-n-batches", ["--n-batches", "1.5"], "invalid int value", BEFORE),
    ("empty-batch-size", ["--batch-size", ""], "invalid int value", BEFORE),
    ("float-seq-len", ["--seq-len", "1e3"], "invalid int value", BEFORE),
    ("word-n-prompts", IOI + ["--n-prompts", "ten"], "invalid int value", BEFORE),
    ("float-seed", ["--seed", "4.2"], "invalid int value", BEFORE),
    ("word-chunk-tokens", ["--chunk-tokens", "x"], "invalid int value", BEFORE),
    ("hex-forward-tokens", ["--forward-tokens", "0x10"], "invalid int value", BEFORE),
    ("unknown-lens", ["--lens", "fancy"], "invalid choice", BEFORE),
    ("unknown-ablation", ["--ablation", "resample"], "invalid choice", BEFORE),
    ("unknown-dataset", ["--dataset", "wikipedia"], "invalid choice", BEFORE),
    ("unknown-variant", IOI + ["--ioi-variant", "abba"], "invalid choice", BEFORE),
    ("unknown-device", ["--device", "tpu"], "invalid choice", BEFORE),
    ("float16", ["--dtype", "float16"], "invalid choice", BEFORE),
    ("bfloat16", ["--dtype", "bfloat16"], "invalid choice", BEFORE),
    ("unknown-pipeline", ["--pipeline", "maybe"], "invalid choice", BEFORE),
    ("unknown-flag", ["--fast"], "unrecognized arguments", BEFORE),
    ("positional", ["extra"], "unrecognized arguments", BEFORE),
    ("missing-value", ["--n-batches"], "expected one argument", BEFORE),
    ("flag-with-value", ["--overwrite=yes"], "ignored explicit argument", BEFORE),
    ("run-id-without-value", ["--run-id"], "expected one argument", BEFORE),
    # counts and ranges
    ("zero-n-batches", ["--n-batches", "0"], "--n-batches must be at least 1", BEFORE),
    ("negative-n-batches", ["--n-batches", "-3"], "--n-batches must be at least 1", BEFORE),
    ("zero-batch-size", ["--batch-size", "0"], "--batch-size must be at least 1", BEFORE),
    ("negative-batch-size", IOI + ["--batch-size", "-1"], "--batch-size must be at least 1",
     BEFORE),
    ("zero-seq-len", ["--seq-len", "0"], "--seq-len must be at least 2", BEFORE),
    ("seq-len-1", TEXT + ["{data}/good.txt", "--seq-len", "1"], "--seq-len must be at least 2",
     BEFORE),
    ("negative-seq-len", ["--seq-len", "-5"], "--seq-len must be at least 2", BEFORE),
    ("zero-prompts", IOI + ["--n-prompts", "0"], "--n-prompts must be at least 1", BEFORE),
    ("negative-prompts", IOI + ["--n-prompts", "-1"], "--n-prompts must be at least 1", BEFORE),
    ("negative-chunk", ["--chunk-tokens", "-1"], "--chunk-tokens must be 0", BEFORE),
    ("negative-forward", ["--forward-tokens", "-1"], "--forward-tokens must be 0", BEFORE),
    ("negative-seed", ["--seed", "-1"], "--seed must be between 0 and 4,294,967,295", BEFORE),
    ("seed-2-32", ["--seed", str(2**32)], "--seed must be between", BEFORE),
    ("seed-20-digits", ["--seed", "12345678901234567890"], "--seed must be between", BEFORE),
    ("seq-len-above-context", TEXT + ["{data}/good.txt", "--seq-len", "5000"],
     "above the model's context of 256", BEFORE),
    ("seq-len-257", TEXT + ["{data}/good.txt", "--seq-len", "257"],
     "--seq-len 257 is above the model's context of 256", BEFORE),
    # options for another dataset
    ("n-prompts-with-text", TEXT + ["{data}/good.txt", "--n-prompts", "5"],
     "--n-prompts does not apply to --dataset text", BEFORE),
    ("variant-with-openwebtext", ["--dataset", "openwebtext", "--ioi-variant", "abc"],
     "--ioi-variant does not apply to --dataset openwebtext", BEFORE),
    ("n-prompts-default-dataset", ["--n-prompts", "10"],
     "--n-prompts does not apply to --dataset openwebtext", BEFORE),
    ("data-files-with-ioi", IOI + ["--data-files", "{data}/good.txt"],
     "--data-files does not apply to --dataset ioi", BEFORE),
    ("data-files-with-openwebtext", ["--data-files", "{data}/good.txt"],
     "--data-files does not apply", BEFORE),
    ("n-batches-with-ioi", IOI + ["--n-batches", "2"],
     "--n-batches does not apply to --dataset ioi", BEFORE),
    ("seq-len-with-ioi", IOI + ["--seq-len", "64"], "--seq-len does not apply to --dataset ioi",
     BEFORE),
    ("text-without-files", ["--dataset", "text"], "needs --data-files", BEFORE),
    ("text-empty-files", TEXT + [""], "needs --data-files", BEFORE),
    # size
    ("huge-n-prompts", IOI + ["--n-prompts", "100000000"], "--allow-large", BEFORE),
    ("both-variants-over-limit", IOI + ["--n-prompts", "500000", "--ioi-variant", "both"],
     "about 25,000,000 tokens", BEFORE),
    ("huge-text-run", TEXT + ["{data}/good.txt", "--n-batches", "100000", "--batch-size",
                             "100", "--seq-len", "256"], "above the limit of 20,000,000",
     BEFORE),
    ("huge-n-batches", ["--n-batches", "100000000000000000000"], "--allow-large", BEFORE),
    # run ids
    ("run-id-newline", ["--run-id", "abc\n"], "bad --run-id 'abc\\n'", BEFORE),
    ("run-id-empty", ["--run-id", ""], "--run-id is empty", BEFORE),
    ("run-id-slash", IOI + ["--run-id", "bad/id"], "bad --run-id", BEFORE),
    ("run-id-dash", IOI + ["--run-id=-x"], "bad --run-id", BEFORE),
    ("run-id-dot", ["--run-id", ".hidden"], "bad --run-id", BEFORE),
    ("run-id-space", ["--run-id", "a b"], "bad --run-id", BEFORE),
    ("run-id-long", ["--run-id", "x" * 101], "bad --run-id", BEFORE),
    ("run-id-unicode", ["--run-id", "ünï"], "bad --run-id", BEFORE),
    ("run-id-parent", ["--run-id", "../escape"], "bad --run-id", BEFORE),
    ("run-id-exists", IOI + ["--warehouse", "{done}", "--run-id", "done"],
     "already exists", BEFORE),
    # warehouse
    ("warehouse-empty", IOI + ["--warehouse", ""], "--warehouse is empty", BEFORE),
    ("warehouse-is-file", IOI + ["--warehouse", "{data}/good.txt"], "is a file, not a folder",
     BEFORE),
    ("warehouse-under-file", IOI + ["--warehouse", "{data}/good.txt/wh"],
     "cannot create --warehouse", BEFORE),
    ("warehouse-deep-under-file", IOI + ["--warehouse", "{data}/good.txt/a/b"],
     "cannot create --warehouse", BEFORE),
    ("warehouse-nul", IOI + ["--warehouse", "{tmp}/a\0b"], "cannot create --warehouse", BEFORE),
    # models
    ("model-missing", ["--model", "/no/such/model"], "does not exist", BEFORE),
    ("model-not-cached", IOI + ["--model", "openai-community/gpt2"], "not available offline",
     BEFORE),
    ("model-bad-hub-id", ["--model", "a b c"], "neither a directory nor a valid hub id", BEFORE),
    ("model-empty", ["--model", ""], "--model is empty", BEFORE),
    ("model-is-file", ["--model", "{data}/good.txt"], "is a file", BEFORE),
    ("model-empty-dir", ["--model", "{models}/empty-dir"], "no config.json", BEFORE),
    ("model-no-config", ["--model", "{models}/no-config"], "no config.json", BEFORE),
    ("config-garbage", ["--model", "{models}/garbage-config"],
     "garbage-config/config.json' is not a readable JSON file", BEFORE),
    ("config-list", ["--model", "{models}/list-config"], "no \"model_type\"", BEFORE),
    ("config-typeless", ["--model", "{models}/typeless-config"], "no \"model_type\"", BEFORE),
    ("no-tokenizer", ["--model", "{models}/no-tokenizer"], "no-tokenizer': it has no tokenizer "
     "files (tokenizer.json, or vocab.json + merges.txt", BEFORE),
    ("vocab-without-merges", ["--model", "{models}/vocab-only"], "missing merges.txt", BEFORE),
    ("truncated-weights", ["--model", "{models}/truncated"],
     "truncated/model.safetensors' is truncated or damaged", BEFORE),
    ("no-weights", ["--model", "{models}/no-weights"], "has no weights", BEFORE),
    ("3-byte-weights", ["--model", "{models}/tiny-weights"], "is truncated", BEFORE),
    ("0-byte-weights", ["--model", "{models}/zero-weights"], "is truncated", BEFORE),
    ("weights-bad-header", ["--model", "{models}/bad-header"], "not a safetensors file", BEFORE),
    ("missing-shard", ["--model", "{models}/missing-shard"],
     "model-00001-of-00002.safetensors' is missing", BEFORE),
    # data files
    ("glob-no-match", TEXT + ["{data}/*.nothing"], "matched no file", BEFORE),
    ("glob-missing-dir", TEXT + ["/no/such/dir/*.txt"], "matched no file", BEFORE),
    ("glob-only-folders", TEXT + ["{data}/sub"], "matched only folders", BEFORE),
    ("folder-named-txt", TEXT + ["{data}/folder.txt"], "matched only folders", BEFORE),
    ("csv", TEXT + ["{data}/notes.csv"], "unsupported data file", BEFORE),
    ("pdf", TEXT + ["{data}/paper.pdf"], "unsupported data file", BEFORE),
    ("all-files-one-unsupported", TEXT + ["{data}/*"], "unsupported data file", BEFORE),
    ("empty-txt", TEXT + ["{data}/empty.txt"], "holds no text", BEFORE),
    ("blank-txt", TEXT + ["{data}/blank.txt"], "holds no text", BEFORE),
    ("latin1-txt", TEXT + ["{data}/latin1.txt"], "is not UTF-8 text", BEFORE),
    ("jsonl-int", TEXT + ["{data}/int.jsonl"], "'text' of row 1 of", BEFORE),
    ("jsonl-nulls", TEXT + ["{data}/nulls.jsonl"], "holds no text", BEFORE),
    ("jsonl-list", TEXT + ["{data}/list.jsonl"], "is a list, not a string", BEFORE),
    ("jsonl-object", TEXT + ["{data}/object.jsonl"], "is an object, not a string", BEFORE),
    ("jsonl-bool", TEXT + ["{data}/bool.jsonl"], "is a boolean, not a string", BEFORE),
    ("jsonl-mixed", TEXT + ["{data}/mixed.jsonl"], "'text' of row 2 of", BEFORE),
    ("jsonl-broken", TEXT + ["{data}/broken.jsonl"], "line 2 of", BEFORE),
    ("jsonl-no-text-column", TEXT + ["{data}/body.jsonl"], "has no 'text' column (columns: body)",
     BEFORE),
    ("jsonl-empty", TEXT + ["{data}/empty.jsonl"], "holds no text", BEFORE),
    ("jsonl-latin1", TEXT + ["{data}/latin1.jsonl"], "is not UTF-8 text", BEFORE),
    ("json-numbers", TEXT + ["{data}/numbers.json"], "row 1 of", BEFORE),
    ("json-scalar", TEXT + ["{data}/scalar.json"], "is a number, not an object", BEFORE),
    ("parquet-int", TEXT + ["{data}/int.parquet"], "holds int64, not strings", BEFORE),
    ("parquet-list", TEXT + ["{data}/list.parquet"], "holds list<element: string>", BEFORE),
    ("parquet-no-text-column", TEXT + ["{data}/body.parquet"], "has no 'text' column", BEFORE),
    ("parquet-nulls", TEXT + ["{data}/nulls.parquet"], "holds no text", BEFORE),
    ("parquet-garbage", TEXT + ["{data}/garbage.parquet"], "could not read", BEFORE),
    ("parquet-empty", TEXT + ["{data}/zero.parquet"], "could not read", BEFORE),
    # found only once the model and the text meet
    ("text-too-short", TEXT + ["{data}/tiny.txt", "--seq-len", "64"], "fewer than --seq-len",
     AFTER),
    ("openwebtext-offline", OWT, "not available offline", AFTER),
]
if not IS_ROOT:  # root reads and writes everything
    CASES += [
        ("warehouse-read-only", IOI + ["--warehouse", "{readonly}/wh"], "cannot", BEFORE),
        ("warehouse-read-only-root", IOI + ["--warehouse", "{readonly}"], "cannot write", BEFORE),
        ("unreadable-file", TEXT + ["{data}/locked.txt"], "Permission denied", BEFORE),
    ]
if not torch.cuda.is_available():
    CASES.append(("cuda-missing", IOI + ["--device", "cuda"], "no CUDA device", BEFORE))


def test_there_are_many_bad_inputs():
    assert len({c[0] for c in CASES}) == len(CASES) >= 80


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][7:].strip(), err
    return lines[0]


@pytest.mark.parametrize("name,args,expected,stage", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, args, expected, stage, tmp_path, monkeypatch,
                                          capsys, request, tiny_checkpoint, data_dir, models,
                                          done_warehouse):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(readonly, 0o500)
    places = {"data": data_dir, "models": models, "done": done_warehouse, "tmp": tmp_path,
              "readonly": readonly}
    args = [a.format(**places) for a in args]
    if stage == BEFORE:
        def load_model(*a, **k):
            raise AssertionError("the model was loaded before the bad input was found")
    else:
        model = request.getfixturevalue("tiny_model")

        def load_model(*a, **k):
            return model
        capsys.readouterr()  # what loading the shared model printed
    monkeypatch.setattr(etl.run.runner, "load_model", load_model)
    argv = ["--model", str(tiny_checkpoint), "--warehouse", str(tmp_path / "wh"),
            "--no-progress", "--device", "cpu", *args]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert expected in line
    assert not (tmp_path / "wh" / "runs").exists()


# ----------------------------------------------------------- checks that need a model


def test_nan_weights_are_refused_at_load_naming_the_parameter(tiny_checkpoint, tmp_path,
                                                              capsys):
    from safetensors.torch import load_file, save_file

    path = _variant(Path(tiny_checkpoint), tmp_path / "nan", drop={"model.safetensors"})
    weights = load_file(Path(tiny_checkpoint) / "model.safetensors")
    weights["transformer.h.1.attn.c_proj.weight"][3, 5] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    argv = ["--model", str(path), "--warehouse", str(tmp_path / "wh"), "--no-progress",
            "--device", "cpu", "--dataset", "ioi", "--n-prompts", "2"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "hold NaN in transformer.h.1.attn.c_proj.weight" in line
    assert not (tmp_path / "wh" / "runs").exists()


def test_inf_weights_are_named():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    check_weights_finite(layer, "ok")
    with torch.no_grad():
        layer[1].bias[1] = float("-inf")
    with pytest.raises(UserError, match=r"hold inf in 1\.bias"):
        check_weights_finite(layer, "m")


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(tiny_checkpoint, tmp_path,
                                                                capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = _variant(Path(tiny_checkpoint), tmp_path / "small-vocab",
                    drop={"tokenizer.json", "tokenizer_config.json"})
    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<unk>",
                            eos_token="<unk>").save_pretrained(path)
    argv = ["--model", str(path), "--warehouse", str(tmp_path / "wh"), "--no-progress",
            "--device", "cpu", "--dataset", "ioi", "--n-prompts", "2"]
    assert main(argv) == 2
    assert "has 3 entries but the model has a vocabulary of 50,257" in _one_error_line(capsys)


def test_a_damaged_pytorch_bin_is_one_line(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    path = _variant(Path(tiny_checkpoint), tmp_path / "bin", drop={"model.safetensors"})
    torch.save(load_file(Path(tiny_checkpoint) / "model.safetensors"), path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    argv = ["--model", str(path), "--warehouse", str(tmp_path / "wh"), "--no-progress",
            "--device", "cpu", "--dataset", "ioi", "--n-prompts", "2"]
    assert main(argv) == 2
    assert f"could not load the checkpoint in '{path}'" in _one_error_line(capsys)


def test_omitted_options_keep_their_defaults_and_the_warehouse_stays_clean(tmp_path,
                                                                         tiny_checkpoint):
    from etl.config import ExtractConfig, RunOptions, config_from_args, run_options_from_args
    from etl.extract import build_parser
    from etl.run.preflight import preflight
    from etl.run.resolved import resolve

    model = str(tiny_checkpoint)
    text = str(_write(tmp_path / "story.txt", "Once upon a time. " * 50))
    for dataset, extra in (("ioi", []), ("text", ["--data-files", text, "--seq-len", "64"]),
                           ("openwebtext", ["--seq-len", "64"])):
        args = build_parser().parse_args(["--model", model, "--dataset", dataset,
                                          "--warehouse", str(tmp_path / dataset), *extra])
        config, options = config_from_args(args), run_options_from_args(args)
        preflight(config, resolve(config, options))
        root = Path(options.warehouse)
        want = ExtractConfig(model=model, dataset=dataset,
                             data_files=text if dataset == "text" else None,
                             seq_len=500 if dataset == "ioi" else 64)
        assert config == want and config.fingerprint() == want.fingerprint()
        assert (config.n_batches, config.n_prompts, config.ioi_variant) == (4, 100, "clean")
        assert root.is_dir() and not any(root.iterdir())
        assert options == RunOptions(warehouse=str(root))


# ---------------------------------------------------------------- signals and writes


def _ioi_argv(checkpoint, warehouse):
    return ["--model", str(checkpoint), "--warehouse", str(warehouse), "--no-progress",
            "--device", "cpu", "--dataset", "ioi", "--n-prompts", "2", "--run-id", "r"]


@pytest.mark.parametrize("exc,expected", [
    (OSError(errno.ENOSPC, "No space left on device"),
     "No space left on device; nothing was published; run the same command again to resume"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "run the same command again to resume"),
    (PermissionError(errno.EACCES, "Permission denied"),
     "Permission denied; nothing was published"),
    (OSError("Error writing bytes to file"), "Error writing bytes to file; nothing"),
])
def test_os_errors_are_one_line(exc, expected, tmp_path, monkeypatch, capsys,
                                tiny_checkpoint):
    def run_extract(*a, **k):
        raise exc

    monkeypatch.setattr(etl.extract, "run_extract", run_extract)
    assert main(_ioi_argv(tiny_checkpoint, tmp_path / "wh")) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: could not write the run to {tmp_path / 'wh'}: ")
    assert expected in line
    if exc.errno == errno.EACCES:
        assert "resume" not in line


def test_disk_full_while_writing_keeps_nothing_published(tmp_path, monkeypatch, capsys,
                                                         tiny_checkpoint, tiny_model):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No "
                                    "space left on device")

    monkeypatch.setattr(etl.run.runner, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(etl.warehouse.storage, "encode_parquet", full)
    assert main(_ioi_argv(tiny_checkpoint, tmp_path / "wh")) == 2
    line = _one_error_line(capsys)
    assert "No space left on device; nothing was published; run the same command" in line
    assert not (tmp_path / "wh" / "runs").exists()


@pytest.mark.parametrize("exc,code,word", [(KeyboardInterrupt(), 130, "interrupted"),
                                           (Terminated(), 143, "terminated")])
def test_interrupts_are_one_line(exc, code, word, tmp_path, monkeypatch, capsys,
                                 tiny_checkpoint):
    def run_extract(*a, **k):
        assert signal.getsignal(signal.SIGTERM) is not before
        raise exc

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(etl.extract, "run_extract", run_extract)
    assert main(_ioi_argv(tiny_checkpoint, tmp_path / "wh")) == code
    assert _one_error_line(capsys) == (f"error: {word}; nothing was published; run the same "
                                       "command again to resume")
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------- non-finite measures


def _measures(n_tokens=5, n_layers=3, n_heads=4):
    comp = (n_tokens, n_layers, n_heads + 1)
    return BatchMeasures(diff=torch.zeros(comp), marginal=torch.zeros(comp),
                         resid=torch.zeros(n_tokens, 2 * n_layers + 1), loss=torch.zeros(comp),
                         kl=torch.zeros(comp), entropy_context=torch.zeros(comp),
                         kl_context_kept=torch.zeros(comp),
                         suppressed_logit=torch.zeros(comp), top_probs=torch.zeros(*comp, 3))


@pytest.mark.parametrize("field,index,value,expected", [
    ("diff", (17, 3, 2), float("nan"), "entropy_diff of head 3.2 at token 17"),
    ("diff", (2, 0, 4), float("inf"), "entropy_diff of MLP 0 at token 2"),
    ("marginal", (0, 1, 1), float("-inf"), "entropy_marginal of head 1.1 at token 0"),
    ("marginal", (9, 3, 4), float("nan"), "entropy_marginal of MLP 3 at token 9"),
    ("resid", (4, 3), float("nan"), "resid entropy at resid_mid 1, token 4"),
    ("resid", (6, 0), float("inf"), "resid entropy at resid_pre 0, token 6"),
    ("resid", (1, 8), float("nan"), "resid entropy at final, token 1"),
    ("loss", (3, 2, 1), float("nan"), "loss_marginal of head 2.1 at token 3"),
    ("kl", (0, 0, 4), float("inf"), "kl_marginal of MLP 0 at token 0"),
    ("entropy_context", (5, 1, 0), float("nan"),
     "entropy_marginal_context of head 1.0 at token 5"),
    ("kl_context_kept", (2, 3, 3), float("nan"), "kl_context_kept of head 3.3 at token 2"),
    ("suppressed_logit", (1, 1, 4), float("-inf"), "suppressed_logit of MLP 1 at token 1"),
    ("top_probs", (7, 2, 2, 1), float("nan"), "the top-3 probabilities of head 2.2 at token 7"),
])
def test_first_non_finite_names_the_value(field, index, value, expected):
    m = _measures(n_tokens=20, n_layers=4)
    assert first_non_finite(m) is None
    getattr(m, field)[index] = value
    assert first_non_finite(m) == expected


def test_first_non_finite_takes_the_first_and_layer_names():
    m = _measures()
    m.resid[0, 0] = float("nan")
    m.marginal[3, 1, 0] = float("nan")
    m.diff[4, 2, 1] = float("inf")
    m.diff[1, 2, 3] = float("nan")
    assert first_non_finite(m) == "entropy_diff of head 2.3 at token 1"
    assert first_non_finite(m, ["a", "b", "c"]) == "entropy_diff of head c.3 at token 1"
    m.diff.zero_()
    m.marginal.zero_()
    assert first_non_finite(m, ["a", "b", "c"]) == "resid entropy at resid_pre a, token 0"
    assert first_non_finite(BatchMeasures(m.diff.numpy(), m.marginal.numpy(),
                                          m.resid.numpy())) is not None


# ------------------------------------------------------------- long documents in pieces

PIECES = [" ", " ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "a", "Word", "ing", "'s", "'t",
          " it's", "don't", ".", ",", "!?", "...", "—", "123", "4", "é", "Ünï", "🙂", "\u00a0",
          "\u3000", "\u2003", "<|endoftext|>", "(", ")", '"', "-", "x"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=60), limit=st.integers(1, 40))
def test_piecewise_tokens_equal_whole_text_tokens(tokenizer, parts, limit):
    text = "".join(parts)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_pieces(tokenizer, text, limit) == whole


@pytest.mark.parametrize("seed", range(20))
def test_piecewise_tokens_on_random_texts(tokenizer, seed):
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(PIECES, size=400))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for limit in (1, 7, 50, 1000):
        assert tokenize_pieces(tokenizer, text, limit) == whole


def test_piecewise_stops_when_enough(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900 k characters
    started = time.perf_counter()
    ids = tokenize_pieces(tokenizer, text, 1000, enough=50)
    assert time.perf_counter() - started < 1.0
    assert 50 <= len(ids) < 1000
    assert ids == tokenizer(text[:5000], add_special_tokens=False)["input_ids"][:len(ids)]


def _old_pack(texts, tokenizer, n_seqs, seq_len, seed):
    """The packing before documents were tokenised in pieces."""
    import random

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    body, stream = seq_len - 1, []
    for idx in order:
        if len(stream) >= n_seqs * body:
            break
        ids = tokenizer(texts[idx], add_special_tokens=False)["input_ids"]
        if ids:
            stream.extend(ids + [tokenizer.eos_token_id])
    n_out = min(n_seqs, len(stream) // body)
    chunks = np.asarray(stream[: n_out * body], dtype=np.int64).reshape(n_out, body)
    return np.concatenate([np.full((n_out, 1), tokenizer.bos_token_id), chunks], axis=1)


CORPORA = {
    "short": [f"Document {i} says hello, world!" for i in range(30)],
    "long": ["  Leading spaces.  Double  spaces and\n\nparagraphs, don't split 'em. " * 40,
             "Numbers 12 345 6789 and émojis 🙂 🙂 mixed in " * 60, "tail"],
    "mixed": ["x" * 300, "one two  three\tfour\nfive " * 30, "", "   ", "a b"],
}


@pytest.mark.parametrize("name", sorted(CORPORA))
@pytest.mark.parametrize("n_seqs,seq_len,seed", [(3, 16, 0), (50, 33, 420), (2, 200, 7)])
def test_packing_is_unchanged_by_pieces(tokenizer, monkeypatch, name, n_seqs, seq_len, seed):
    monkeypatch.setattr(packing, "PIECE_CHARS", 40)  # every long document goes in pieces
    texts = CORPORA[name]
    packed = pack_documents(texts, tokenizer, n_seqs, seq_len, seed, source={})
    assert np.array_equal(packed.token_ids, _old_pack(texts, tokenizer, n_seqs, seq_len, seed))


def test_a_10_mb_line_is_tokenised_only_as_far_as_needed(tokenizer):
    line = "lorem ipsum dolor sit amet " * 400_000  # 10.8 MB, one document
    started = time.perf_counter()
    packed = pack_documents([line], tokenizer, n_seqs=2, seq_len=16, seed=0, source={})
    assert time.perf_counter() - started < 5.0
    want = tokenizer(line[:2000], add_special_tokens=False)["input_ids"][:30]
    assert packed.token_ids[:, 1:].reshape(-1).tolist() == want


def test_local_files_read_as_the_datasets_library_reads_them(tmp_path):
    import datasets

    _write(tmp_path / "a.txt", "Line one.\r\nLine two.\rLine three.\n")
    _write(tmp_path / "b.md", "\ufeff# Title\n\nBody text.\n")
    _write(tmp_path / "c.jsonl", _jsonl({"text": "Row one.", "id": 1}, {"text": None},
                                        {"text": "Row \"two\".\n", "id": 3}))
    _write(tmp_path / "d.json", json.dumps([{"text": "Array row."}, {"text": ""}]))
    pq.write_table(pa.table({"text": ["Parquet row.", None], "n": [1, 2]}),
                   tmp_path / "e.parquet")
    want = []
    for builder, names in (("json", ["c.jsonl", "d.json"]), ("parquet", ["e.parquet"]),
                           ("text", ["a.txt", "b.md"])):
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        data = datasets.load_dataset(builder, data_files=[str(tmp_path / n) for n in names],
                                     split="train", cache_dir=str(tmp_path / "cache"), **kwargs)
        want.extend(t for t in data["text"] if t)
    assert load_local_texts(str(tmp_path / "*.*")) == want
