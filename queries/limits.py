"""How long and how much a query over the views may take: a timeout, DuckDB's
``memory_limit`` and its ``max_temp_directory_size`` (what it may spill to disk).

The timeout interrupts DuckDB (``DuckDBPyConnection.interrupt``). The query runs in a worker
thread, so that a query that does not notice the interrupt still ends the wait: DuckDB
checks for it between vectors, not while it builds one huge value such as
``repeat('x', 2000000000)``. ``GRACE_S`` after the interrupt such a worker is left to finish
alone, and its connection is not used again.

Defaults, each overridden by an environment variable, then by a flag of ``python -m queries
run|sql`` or an argument of ``analysis.api.Warehouse``:

- timeout ``TIMEOUT_S`` (``TIMEOUT_ENV``, ``--timeout``, ``timeout=``);
- memory ``MEMORY_DEFAULT`` of the memory DuckDB detects (``MEMORY_ENV``,
  ``--memory-limit``, ``memory_limit=``);
- spill: the smaller of ``SPILL_CAP`` and ``SPILL_DISK_SHARE`` of the free space where DuckDB
  spills (``SPILL_ENV``, ``--spill-limit``, ``spill_limit=``).

DuckDB counts the memory of its operators (joins, sorts, aggregates, lists) against the
limit; a single value it builds in one step is not counted, and ends at the timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from etl.errors import UserError
from etl.warehouse import seconds_from_env

TIMEOUT_S = 600.0
"""Seconds a query may run by default."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""The longest timeout taken: a week."""
GRACE_S = 1.0
"""Seconds a query has to stop after it is interrupted before it is left to finish alone."""
TIMEOUT_ENV = "ENTROPY_WAREHOUSE_QUERY_TIMEOUT_S"

MEMORY_DEFAULT = "50%"
"""Half the memory DuckDB detects (a cgroup limit included); DuckDB's own default is 80 %."""
MEMORY_ENV = "ENTROPY_WAREHOUSE_MEMORY_LIMIT"
SPILL_CAP = 16 << 30
"""The most a query spills to disk by default: 16 GiB."""
SPILL_DISK_SHARE = 0.5
"""The share of the free disk space where DuckDB spills that a query may take by default;
DuckDB's own default is 90 %."""
SPILL_ENV = "ENTROPY_WAREHOUSE_SPILL_LIMIT"

_SIZE = re.compile(r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B|%)\s*", re.IGNORECASE)
"""A size as DuckDB reads it: a number and a unit (KB, MB, GB, TB: 1000^i bytes; KiB, MiB,
GiB, TiB: 1024^i; B), or for memory a percentage of the machine's."""

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The limits of one connection's queries; ``None`` fields take the defaults above
    (``resolved``)."""

    timeout_s: float | None = None
    """Seconds a query may run."""
    memory: str | None = None
    """DuckDB ``memory_limit``, e.g. ``'4GB'`` or ``'50%'``."""
    spill: str | None = None
    """DuckDB ``max_temp_directory_size``, e.g. ``'10GiB'``."""
    python: bool = False
    """Whether errors name the Python arguments (``timeout=``) rather than the flags."""

    def option(self, name: str) -> str:
        """How the user sets limit ``name`` (``timeout``, ``memory_limit``,
        ``spill_limit``): ``--memory-limit`` on the command line, ``memory_limit=`` from
        Python."""
        return f"{name}=" if self.python else "--" + name.replace("_", "-")

    def resolved(self) -> Limits:
        """These limits checked, with every unset one from its environment variable or
        default.

        Raises:
            UserError: a limit, or an environment variable, that is not valid.
        """
        if self.timeout_s is None:
            timeout = check_timeout(seconds_from_env(TIMEOUT_ENV, TIMEOUT_S), TIMEOUT_ENV)
        else:
            timeout = check_timeout(self.timeout_s, self.option("timeout"))
        memory, memory_from = self.memory, self.option("memory_limit")
        if memory is None:
            memory, memory_from = os.environ.get(MEMORY_ENV) or MEMORY_DEFAULT, MEMORY_ENV
        spill, spill_from = self.spill, self.option("spill_limit")
        if spill is None:
            spill, spill_from = os.environ.get(SPILL_ENV) or None, SPILL_ENV
        return Limits(timeout, size_limit(memory, memory_from, percent=True),
                      None if spill is None else size_limit(spill, spill_from), self.python)


def check_timeout(seconds: object, name: str) -> float:
    """``seconds`` as a float when it is a number of seconds above 0 and at most
    ``MAX_TIMEOUT_S``.

    Raises:
        UserError: it is not (``name``: the flag or argument it came from).
    """
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(seconds, bool) or not 0 < value <= MAX_TIMEOUT_S:
        raise UserError(f"{name} takes seconds above 0 and at most {MAX_TIMEOUT_S:.0f} "
                        f"(a week), not {seconds!r}")
    return value


def size_limit(text: object, name: str, percent: bool = False) -> str:
    """``text`` when it is a size DuckDB reads (``_SIZE``) above zero; a percentage (of the
    machine's memory, from 1 to 100) only when ``percent``.

    Raises:
        UserError: it is not (``name``: the flag or variable it came from).
    """
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = match["unit"] if match else ""
    ok = match is not None and float(match["number"]) > 0 and (
        unit != "%" or (percent and float(match["number"]) <= 100))
    if not ok:
        examples = "4GB, 512MiB or 50% (of the machine's memory)" if percent else "10GB or 512MiB"
        raise UserError(f"{name} takes a size such as {examples}, not {text!r}")
    return text.strip()


def spill_default(temp_directory: str) -> str:
    """The default spill limit where DuckDB spills to ``temp_directory``: the smaller of
    ``SPILL_CAP`` and ``SPILL_DISK_SHARE`` of the free space of its disk, in bytes."""
    folder = Path(temp_directory).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return f"{max(1 << 20, min(SPILL_CAP, int(free * SPILL_DISK_SHARE))) >> 20}MiB"


def apply_limits(con: duckdb.DuckDBPyConnection, limits: Limits | None) -> None:
    """Set DuckDB's ``memory_limit`` and ``max_temp_directory_size`` of ``con`` from
    ``limits`` (``Limits.resolved``; None: the defaults); call it after ``temp_directory``
    is set.

    Raises:
        UserError: DuckDB refuses a limit.
    """
    limits = (limits or Limits()).resolved()
    try:
        temp = con.sql("select current_setting('temp_directory')").fetchall()[0][0]
        con.execute("set memory_limit = $v", {"v": limits.memory})
        con.execute("set max_temp_directory_size = $v",
                    {"v": limits.spill or spill_default(temp)})
    except duckdb.Error as exc:
        raise UserError(f"cannot set the query limits: {str(exc).splitlines()[0]}") from exc


class QueryTimeout(UserError):
    """A query ran longer than its timeout and was interrupted."""


class Abandoned(QueryTimeout):
    """A query did not stop when interrupted; its worker finishes alone and its connection
    must not be used again."""


def run_interruptible(con: duckdb.DuckDBPyConnection, work: Callable[[], T], limits: Limits
                      ) -> T:
    """``work()`` (a query on ``con``) in a worker thread, waited for at most
    ``limits.timeout_s`` seconds; then ``con`` is interrupted.

    Raises:
        QueryTimeout: the query was interrupted; ``Abandoned`` when it did not stop within
            ``GRACE_S``.
        KeyboardInterrupt: Ctrl-C while waiting (the query is interrupted too).
        Exception: what ``work`` raised.
    """
    timeout = limits.resolved().timeout_s
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="duckdb-query", daemon=True)
    worker.start()
    try:
        worker.join(timeout)
    finally:
        if worker.is_alive():
            con.interrupt()
    if worker.is_alive():
        worker.join(GRACE_S)
        if "value" not in outcome:
            message = f"query interrupted after {timeout:g} s ({limits.option('timeout')})"
            raise (Abandoned if worker.is_alive() else QueryTimeout)(message)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def out_of_memory(exc: duckdb.OutOfMemoryException, con: duckdb.DuckDBPyConnection,
                  limits: Limits) -> UserError:
    """The one-line error of a query on ``con`` that needed more memory, or more spill
    space, than its limits allow: DuckDB's first line, the limit and how to raise it."""
    text = str(exc)
    first = text.splitlines()[0].removeprefix("Out of Memory Error: ").rstrip(".")
    spill = "max_temp_directory_size" in text
    setting = "max_temp_directory_size" if spill else "memory_limit"
    name, env = ("spill_limit", SPILL_ENV) if spill else ("memory_limit", MEMORY_ENV)
    value = con.sql(f"select current_setting('{setting}')").fetchall()[0][0]
    return UserError(f"the query needs more than the {name.replace('_', ' ')} ({value}): "
                     f"{first}; raise {limits.option(name)} (or {env})")
