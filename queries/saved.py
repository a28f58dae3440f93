"""Saved queries: one ``.sql`` file per query in ``queries/sql/saved/``, described by its
header comment.

A saved query's file starts with comment lines::

    -- name: what it returns ... (one or more lines)
    -- @param <name> <default> <description>

``<default>`` is an SQL literal: ``'text'``, a number or ``NULL``. The query body uses the
parameters as DuckDB ``$name`` placeholders. Data tests in ``queries/sql/checks/`` follow
the same header convention and return the offending rows (empty = pass). The views and
the macros the queries share are in ``queries/sql/views.sql`` (see ``queries.db``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources

from etl.errors import UserError

SAVED_FOLDER = "sql/saved"
CHECKS_FOLDER = "sql/checks"
PARAM_LINE = re.compile(
    r"^--\s*@param\s+(?P<name>\w+)\s+(?P<default>'(?:[^']|'')*'|NULL|-?\d+(?:\.\d+)?)"
    r"\s*(?P<doc>.*)$")


@dataclass(frozen=True)
class Param:
    """One ``$name`` parameter of a saved query."""

    name: str
    default: object
    """Python value of the default: str, int, float or None (SQL NULL)."""
    doc: str

    def parse(self, text: str):
        """Convert a ``--param name=text`` value to the default's type (``null`` = NULL)."""
        if text.strip().lower() == "null":
            return None
        if isinstance(self.default, int) and not isinstance(self.default, bool):
            try:
                return int(text)
            except ValueError:
                raise UserError(f"parameter {self.name} takes an integer, not {text!r}") from None
        if isinstance(self.default, float):
            try:
                return float(text)
            except ValueError:
                raise UserError(f"parameter {self.name} takes a number, not {text!r}") from None
        return text


@dataclass(frozen=True)
class SavedQuery:
    """A named ``.sql`` file with its description and parameters."""

    name: str
    sql: str
    description: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    @property
    def summary(self) -> str:
        """The description's first sentence, on one line."""
        first = re.split(r"(?<=[^.])\.(\s|$)", self.description, maxsplit=1)[0]
        return first.strip().rstrip(".") + "."

    def bind(self, given: dict[str, str] | None = None) -> dict[str, object]:
        """Parameter values: defaults overridden by ``given`` (text values from the CLI).

        Raises:
            UserError: a name the query does not take.
        """
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = ", ".join(known) or "no parameters"
            raise UserError(f"query {self.name} has no parameter {unknown[0]!r} "
                            f"(it takes: {takes})")
        return {name: (p.parse(given[name]) if name in given else p.default)
                for name, p in known.items()}


def _literal(text: str):
    if text == "NULL":
        return None
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    return float(text) if "." in text else int(text)


def parse_sql_file(name: str, sql: str) -> SavedQuery:
    """Read the header comment of ``sql`` into a ``SavedQuery``.

    Raises:
        ValueError: the file does not start with a comment naming the query.
    """
    header = []
    for line in sql.splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    if not header or not header[0].lstrip("- ").startswith(f"{name}:"):
        raise ValueError(f"{name}.sql must start with a comment '-- {name}: what it returns'")
    text_lines, params = [], []
    for line in header:
        match = PARAM_LINE.match(line)
        if match:
            params.append(Param(match["name"], _literal(match["default"]), match["doc"].strip()))
        elif "@param" in line:
            raise ValueError(f"{name}.sql: cannot read parameter line {line!r}")
        else:
            text_lines.append(line.lstrip("-").strip())
    description = " ".join(text_lines).split(":", 1)[1].strip()
    return SavedQuery(name=name, sql=sql, description=description, params=tuple(params))


def _load(folder: str) -> dict[str, SavedQuery]:
    root = resources.files("queries").joinpath(folder)
    found = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            name = entry.name[:-4]
            found[name] = parse_sql_file(name, entry.read_text(encoding="utf-8"))
    return found


def saved_queries() -> dict[str, SavedQuery]:
    """Every saved query in ``queries/sql/saved/``, by name."""
    return _load(SAVED_FOLDER)


def data_checks() -> dict[str, SavedQuery]:
    """Every data test in ``queries/sql/checks/``, by name."""
    return _load(CHECKS_FOLDER)


def get_query(name: str) -> SavedQuery:
    """The saved query ``name``.

    Raises:
        UserError: no such query (the message lists the known ones).
    """
    queries = saved_queries()
    if name not in queries:
        raise UserError(f"unknown query {name!r}; known: {', '.join(queries)} "
                        "(python -m queries list)")
    return queries[name]
