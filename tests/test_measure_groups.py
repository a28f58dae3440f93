"""``--measures`` that names no group (an empty text, commas alone) is refused in one line,
from the command line and from the Python API, instead of measuring the entropies alone."""

import pytest

import etl.run.runner
from etl.config import ExtractConfig
from etl.errors import UserError
from etl.extract import main
from etl.lens.modes import parse_measures
from etl.lens.types import MeasureOptions

EMPTY = ["", ",", " , ,", ",,"]


@pytest.mark.parametrize("text", EMPTY)
def test_no_group_named_is_one_line_and_exit_2(text, tmp_path, monkeypatch, capsys,
                                               tiny_checkpoint):
    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(etl.run.runner, "load_model", load_model)
    argv = ["--model", str(tiny_checkpoint), "--warehouse", str(tmp_path / "wh"),
            "--no-progress", "--device", "cpu", "--measures", text]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: --measures: no measure group named in {text!r}: name one or more of "
        "entropy, loss, kl, context, suppression, calibration, bos, cspa, 'all' or 'default' "
        "(entropy for the entropies alone)"]
    assert not (tmp_path / "wh").exists()


@pytest.mark.parametrize("text", EMPTY)
def test_no_group_named_is_refused_from_python(text):
    with pytest.raises(ValueError, match="no measure group named"):
        parse_measures(text)
    with pytest.raises(UserError, match="^--measures: no measure group named"):
        ExtractConfig(model="gpt2", measures=text)
    with pytest.raises(ValueError, match="no measure group named"):
        MeasureOptions(measures=tuple(text.split(",")))
    with pytest.raises(ValueError, match="no measure group named"):
        MeasureOptions(measures=())


@pytest.mark.parametrize("text,groups", [
    ("entropy", ("entropy",)), ("kl", ("entropy", "kl")), ("kl,", ("entropy", "kl")),
    (" all ", ("entropy", "loss", "kl", "context", "suppression", "calibration", "bos",
               "cspa")),
    ("default", ("entropy", "loss", "kl", "context", "suppression", "calibration", "bos")),
    ("bos", ("entropy", "bos")), ("cspa,bos", ("entropy", "bos", "cspa"))])
def test_named_groups_still_parse(text, groups):
    assert parse_measures(text) == groups
    assert ExtractConfig(model="gpt2", measures=text).measures == ",".join(groups)
