"""Every command-line subcommand and option has help text and is in the README."""

from pathlib import Path

import pytest

from etl.checkpoint import main as checkpoint_main
from etl.extract import build_parser as extract_parser
from queries.cli import build_parser as query_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action
    raise AssertionError("no subcommands")


def test_every_query_subcommand_has_help_and_is_in_readme():
    sub = _subparsers(query_parser())
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(sub.choices) == {"list", "show", "run", "sql", "check", "shell", "migrate"}
    for name, parser in sub.choices.items():
        assert helps[name], name
        assert parser.description, name
        assert f"`{name}" in README, name
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)


def test_every_extract_option_has_help_and_is_in_readme():
    for action in extract_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
            assert f"`{action.option_strings[0]}" in README, action.option_strings[0]


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        checkpoint_main(["--help"])
    assert exc.value.code == 0
    assert "--arch" in capsys.readouterr().out


def test_every_analysis_option_has_help_and_is_in_readme():
    from analysis.__main__ import build_parser as analysis_parser

    for action in analysis_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
            assert f"`{action.option_strings[0]}" in README, action.option_strings[0]


def test_extract_flags_are_the_config_fields_and_the_readme_shows_their_defaults():
    """One source of truth: each flag is a field of ExtractConfig or RunOptions, and the
    README's flag table states that field's default."""
    import re
    from dataclasses import fields

    from etl.config import ExtractConfig, RunOptions

    section = README.split("### `python -m etl.extract`", 1)[1].split("\n### ", 1)[0]
    table = {m.group(1): m.group(2).strip() for m in
             re.finditer(r"^\| `(--[a-z-]+)[^|]*\|([^|]*)\|", section, re.M)}
    flags = {a.option_strings[0]: a.dest for a in extract_parser()._actions
             if a.option_strings and a.dest not in ("help", "version")}
    defaults = {f.name: f.default for cls in (ExtractConfig, RunOptions) for f in fields(cls)}
    assert sorted(flags.values()) == sorted(defaults)
    for flag, name in flags.items():
        default, shown = defaults[name], table[flag]
        if isinstance(default, bool):
            assert shown == "off", flag  # every switch is off unless given
        elif default is not None:
            assert shown.strip("`").split(" ")[0] == str(default), (flag, shown, default)
