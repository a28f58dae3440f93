"""Saved queries: one ``.sql`` file per query in ``queries/sql/saved/``, described by its
header comment.

A saved query's file starts with comment lines::

    -- name: what it returns ... (one or more lines)
    -- @param <name> <default> [<low>..<high>] <description>

``<default>`` is an SQL literal: ``'text'``, a number or ``NULL``. A numeric parameter
declares the range ``[<low>..<high>]`` of the values it takes (both included), which a
given value is checked against before the query runs; a text parameter has none. The query
body uses the parameters as DuckDB ``$name`` placeholders. Data tests in
``queries/sql/checks/`` follow the same header convention and return the offending rows
(empty = pass). The views and the macros the queries share are in ``queries/sql/views.sql``
(see ``queries.db``).

Parameters named ``run_id``, ``run_a`` or ``run_b`` name a complete run, and ``component`` a
component of one (``'L.H'`` or ``'L.mlp'``): ``bind`` returns ``Bound`` values, which
``queries.db.Views.sql`` checks against the warehouse (``check_bound``) before it runs them,
so that a typo is an error rather than an empty result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources

from etl.errors import UserError

SAVED_FOLDER = "sql/saved"
CHECKS_FOLDER = "sql/checks"
RUN_PARAMS = ("run_id", "run_a", "run_b")
"""Parameters that name a complete run; NULL (the query's default: the latest run, the
earliest, every run) is not checked."""
COMPONENT = re.compile(r"(?P<layer>\d+)\.(?P<head>\d+|mlp)")
"""A ``component`` parameter: head H of layer L (``'L.H'``) or its MLP (``'L.mlp'``)."""
_NUMBER = r"-?\d+(?:\.\d+)?"
PARAM_LINE = re.compile(
    rf"^--\s*@param\s+(?P<name>\w+)\s+(?P<default>'(?:[^']|'')*'|NULL|{_NUMBER})"
    rf"(?:\s+\[(?P<low>{_NUMBER})\.\.(?P<high>{_NUMBER})\])?\s*(?P<doc>.*)$")


@dataclass(frozen=True)
class Param:
    """One ``$name`` parameter of a saved query."""

    name: str
    default: object
    """Python value of the default: str, int, float or None (SQL NULL)."""
    doc: str
    low: int | float | None = None
    """The smallest value a numeric parameter takes (its header's ``[low..high]``)."""
    high: int | float | None = None
    """The largest value a numeric parameter takes."""

    @property
    def numeric(self) -> bool:
        """Whether the parameter takes a number (its default is one)."""
        return isinstance(self.default, int | float) and not isinstance(self.default, bool)

    def parse(self, text: str):
        """Convert a ``--param name=text`` value to the default's type (``null`` = NULL).

        Raises:
            UserError: a numeric parameter given anything but a number in its range
                (NULL included).
        """
        if not self.numeric:
            return None if text.strip().lower() == "null" else text
        kind = "a whole number" if isinstance(self.default, int) else "a number"
        try:
            value = type(self.default)(text)
        except ValueError:
            value = None
        if value is None or not self.low <= value <= self.high:
            raise UserError(f"parameter {self.name} takes {kind} from {self.low} to "
                            f"{self.high}, not {text.strip()!r}")
        return value


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

    def bind(self, given: dict[str, str] | None = None) -> Bound:
        """Parameter values: defaults overridden by ``given`` (text values from the CLI);
        ``Views.sql`` checks the runs and components among them (``check_bound``).

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
        return Bound({name: (p.parse(given[name]) if name in given else p.default)
                      for name, p in known.items()})


class Bound(dict):
    """A saved query's parameter values, ``$name`` → value (``SavedQuery.bind``): a dict
    whose type tells ``queries.db.Views.sql`` to check them (``check_bound``) first."""


def check_bound(values: dict, runs: list[tuple[str, int, int]], warehouse: str) -> None:
    """Raise ``UserError`` when a run parameter (``RUN_PARAMS``) names no run of ``runs``
    or ``component`` names no component of its run: the run ``run_id`` names, else the
    latest (which the queries that take a component read when ``run_id`` is NULL).

    Args:
        runs: ``(run_id, n_layers, n_heads)`` of each complete run, oldest first (the
            ``runs`` view ordered as ``latest_run()`` orders it).
        warehouse: the warehouse, as the errors name it.
    """
    shapes = {run_id: (n_layers, n_heads) for run_id, n_layers, n_heads in runs}
    for name in RUN_PARAMS:
        value = values.get(name)
        if value is not None and value not in shapes:
            raise UserError(f"{name} {value!r} is not a complete run in {warehouse!r} "
                            f"(runs: {', '.join(shapes)})")
    component = values.get("component")
    run_id = values.get("run_id") or (runs[-1][0] if runs else None)
    if component is not None and run_id in shapes:
        check_component(str(component), run_id, *shapes[run_id])


def check_component(text: str, run_id: str, n_layers: int, n_heads: int) -> None:
    """Raise ``UserError`` unless ``text`` is ``'L.H'`` or ``'L.mlp'`` with layer L and
    head H in a run of ``n_layers`` × ``n_heads`` (every manifest records both)."""
    match = COMPONENT.fullmatch(text.strip())
    if match and int(match["layer"]) < n_layers and (
            match["head"] == "mlp" or int(match["head"]) < n_heads):
        return
    raise UserError(f"component {text!r} is not in run {run_id!r} ({n_layers} layers × "
                    f"{n_heads} heads: 'L.H' with L in 0–{n_layers - 1}, H in "
                    f"0–{n_heads - 1}, or 'L.mlp')")


def _literal(text: str):
    if text == "NULL":
        return None
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    return float(text) if "." in text else int(text)


def _param(query: str, match: re.Match) -> Param:
    """The ``Param`` of a ``PARAM_LINE`` match of query ``query``.

    Raises:
        ValueError: a numeric parameter without a range, or whose default lies outside it;
            a range given to a text parameter.
    """
    default = _literal(match["default"])
    low, high = (None, None) if match["low"] is None else (_literal(match["low"]),
                                                             _literal(match["high"]))
    param = Param(match["name"], default, match["doc"].strip(), low, high)
    if param.numeric and (low is None or not low <= default <= high):
        raise ValueError(f"{query}.sql: numeric parameter {param.name} needs a range "
                         f"[low..high] after its default that holds it")
    if not param.numeric and low is not None:
        raise ValueError(f"{query}.sql: parameter {param.name} takes text; only numbers "
                         "have a range")
    return param


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
            params.append(_param(name, match))
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
