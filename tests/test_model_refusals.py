"""Checkpoints the measures cannot take end in one true line and exit code 2, with nothing
published: a final normalisation scaled so far that the effects exceed what the warehouse
sums, a config whose query heads do not split evenly among its key/value heads, weights
of other shapes than the config's, and logit soft-capping (with no library warning
before the refusal)."""

import os
import subprocess
import sys

import pytest

from etl.extract import main as extract_main
from etl.model.random_init import write_checkpoint
from tests.test_damaged_checkpoints import checkpoint_variant


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A random-init llama-tiny checkpoint (4 query heads, 2 key/value heads)."""
    return write_checkpoint("llama-tiny", tmp_path_factory.mktemp("llama") / "llama-tiny")


def _argv(model, warehouse):
    return ["--model", str(model), "--warehouse", str(warehouse), "--no-progress",
            "--device", "cpu", "--dataset", "ioi", "--n-prompts", "2"]


def _one_line(code, out, err, warehouse):
    assert code == 2 and out == "", (code, out)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert not (warehouse / "runs").exists()
    return lines[0]


def test_a_huge_final_norm_weight_is_refused_for_its_effects_not_as_nan(tiny_checkpoint,
                                                                        tmp_path, capsys):
    # finite logits of about 1e31: every measure is finite now, but a loss of 1e29 nats is
    # beyond what the warehouse's fixed-point sums hold
    model = checkpoint_variant(tiny_checkpoint, tmp_path / "huge",
                               tensors={"transformer.ln_f.weight": lambda w: w * 1e30})
    capsys.readouterr()
    code = extract_main(_argv(model, tmp_path / "wh"))
    line = _one_line(code, *capsys.readouterr(), tmp_path / "wh")
    assert line == (
        "error: loss_marginal of head 0.0 at token 0 in sequences 0–1 is 1.97e+29 nats "
        "(tokens counted from sequence 0, position 0), beyond the ±2,896 nats the "
        "warehouse's sums hold: the model's logits, or that component's change to them, are "
        "far larger than a trained model's (check its weights, such as the scale of its "
        "final normalisation); nothing was published")


def test_the_bound_is_what_the_sums_hold():
    """``MAX_SUMMED_NATS`` squared still fits ``fixed_point``'s BIGINT; 2^11.5 does not."""
    import duckdb

    from etl.warehouse.sums import FIXED_POINT, MAX_SUMMED_NATS

    con = duckdb.connect()
    con.execute(FIXED_POINT)
    square = "select fixed_point(x::double * x::double) from (select ?::float as x)"
    assert con.execute(square, [-MAX_SUMMED_NATS]).fetchone()[0] > 0
    with pytest.raises(duckdb.ConversionException):
        con.execute(square, [2.0 ** 11.5 + 0.001]).fetchone()


@pytest.mark.parametrize(("n_kv_heads", "says"), [
    # query heads that do not split evenly among the key/value heads
    (3, "error: '{model}/config.json' has num_attention_heads 4, not a multiple of "
        "num_key_value_heads 3 (each key/value head serves an equal group of query heads); "
        "restore the checkpoint's config.json"),
    # one key/value head in the config, two in the files: transformers refuses, pointing at a
    # report its quiet logging does not show
    (1, "error: the weights of '{model}' do not match its config.json: "
        "model.layers.0.self_attn.k_proj.weight is [32, 64], the config says [16, 64] (and 3 "
        "more); transformers refused to load it: copy the checkpoint again or fix its "
        "config.json"),
], ids=["not-a-multiple", "weights-of-other-shapes"])
def test_key_value_heads_the_checkpoint_cannot_have_are_one_true_line(
        llama_checkpoint, tmp_path, capsys, n_kv_heads, says):
    model = checkpoint_variant(llama_checkpoint, tmp_path / "kv",
                               config={"num_key_value_heads": n_kv_heads})
    code = extract_main(_argv(model, tmp_path / "wh"))
    assert _one_line(code, *capsys.readouterr(), tmp_path / "wh") == says.format(model=model)


def test_a_soft_capping_checkpoint_is_refused_in_exactly_one_line(llama_checkpoint,
                                                                  tmp_path):
    # a subprocess: the library's warning went to the root logger, which pytest captures
    model = checkpoint_variant(llama_checkpoint, tmp_path / "softcap",
                               config={"final_logit_softcapping": 30.0})
    done = subprocess.run([sys.executable, "-m", "etl.extract", *_argv(model, tmp_path / "wh")],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    line = _one_line(done.returncode, done.stdout, done.stderr, tmp_path / "wh")
    assert line == (f"error: cannot measure model '{model}': it soft-caps its logits, which "
                    "the lens does not model yet")
