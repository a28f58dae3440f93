"""Lens modes have names that explain themselves; the earlier names still work everywhere."""

import re

import pytest

from etl.config import ExtractConfig
from etl.errors import UserError
from etl.extract import build_parser
from etl.lens.types import LENS_MODES, MeasureOptions, canonical_lens
from etl.warehouse import Warehouse, migrate, validate_run_id
from queries.db import connect
from tests.test_query_safety import write_run

OLD_TO_NEW = [("seed", "final-scale"), ("recomputed", "recomputed-ln")]


def test_modes_are_the_self_explaining_names():
    assert LENS_MODES == ("final-scale", "recomputed-ln")
    assert ExtractConfig().lens == MeasureOptions().lens == "final-scale"


@pytest.mark.parametrize("old,new", OLD_TO_NEW)
def test_earlier_names_are_read_as_the_new_ones(old, new):
    assert canonical_lens(old) == canonical_lens(new) == new
    assert MeasureOptions(lens=old).lens == new
    old_config, new_config = ExtractConfig(lens=old), ExtractConfig(lens=new)
    assert old_config == new_config and old_config.lens == new
    assert old_config.fingerprint() == new_config.fingerprint()
    assert build_parser().parse_args(["--lens", old]).lens == new


def test_unknown_lens_is_refused_with_the_real_choices():
    with pytest.raises(UserError) as exc:
        build_parser().parse_args(["--lens", "fancy"])
    message = str(exc.value)
    assert "invalid choice: 'fancy'" in message
    assert "final-scale" in message and "recomputed-ln" in message
    with pytest.raises(ValueError, match="lens must be one of"):
        MeasureOptions(lens="fancy")


def test_help_names_the_modes_and_the_aliases(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{final-scale,recomputed-ln}" in text
    assert "seed and recomputed still work" in text


def test_help_names_the_study_it_follows(capsys):
    """--help says whose lens final-scale is, not "the study's"."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "McDougall et al. 2023, Copy Suppression, arXiv:2310.04625" in text
    assert "study" not in text


def test_default_run_ids_read_naturally():
    plain = ExtractConfig(model="data/models/gpt2-small-random/", dataset="ioi")
    assert re.fullmatch(r"ioi-gpt2-small-random-[0-9a-f]{8}", plain.default_run_id())
    other = ExtractConfig(model="gpt2", dataset="openwebtext", lens="recomputed",
                          ablation="mean")
    run_id = other.default_run_id()
    assert re.fullmatch(r"openwebtext-gpt2-recomputed-ln-lens-mean-ablation-[0-9a-f]{8}", run_id)
    lens_only = ExtractConfig(model="gpt2", lens="recomputed-ln").default_run_id()
    ablation_only = ExtractConfig(model="gpt2", ablation="mean").default_run_id()
    assert "-recomputed-ln-lens-" in lens_only and "ablation" not in lens_only
    assert "-mean-ablation-" in ablation_only and "lens" not in ablation_only
    longest = ExtractConfig(model="m" * 200, dataset="openwebtext", lens="recomputed-ln",
                            ablation="mean").default_run_id()
    for each in (plain.default_run_id(), run_id, lens_only, ablation_only, longest):
        assert validate_run_id(each) == each and "seed" not in each


def test_default_run_ids_name_the_ioi_variant():
    """Runs of the clean and of the corrupted IOI prompts can be told apart by their ids."""
    ids = {variant: ExtractConfig(model="data/models/gpt2-small-random/", dataset="ioi",
                                  ioi_variant=variant).default_run_id()
           for variant in ("clean", "abc", "both")}
    assert re.fullmatch(r"ioi-gpt2-small-random-[0-9a-f]{8}", ids["clean"])
    assert re.fullmatch(r"ioi-gpt2-small-random-abc-variant-[0-9a-f]{8}", ids["abc"])
    assert re.fullmatch(r"ioi-gpt2-small-random-both-variant-[0-9a-f]{8}", ids["both"])
    longest = ExtractConfig(model="m" * 200, dataset="ioi", ioi_variant="both",
                            lens="recomputed-ln", ablation="mean").default_run_id()
    assert re.fullmatch(r"ioi-m{40}-both-variant-recomputed-ln-lens-mean-ablation-[0-9a-f]{8}",
                        longest)
    assert validate_run_id(longest) == longest


def test_views_show_runs_written_under_the_earlier_names_by_the_new_ones(tmp_path):
    for run_id, lens in (("a", "seed"), ("b", "recomputed"), ("c", "final-scale"),
                         ("d", "recomputed-ln")):
        write_run(tmp_path, run_id, lens=lens)
    migrate(Warehouse(tmp_path))
    con = connect(Warehouse(tmp_path))
    rows = con.sql("select run_id, lens from runs order by run_id").fetchall()
    assert rows == [("a", "final-scale"), ("b", "recomputed-ln"), ("c", "final-scale"),
                    ("d", "recomputed-ln")]
