"""A run's partial sums: per layer, component (or residual point) and kind of position, the
row count and exact fixed-point sums of every measure, written once when the run is
published (``component_sums``, ``resid_sums``: one small Parquet file each) so that the
saved summaries add a few thousand partial sums instead of scanning every row; and the
same for the entropy diffs and marginals per batch too (``component_batch_sums``), for the
batch-weighted means, and the copy-suppression pairs' sums per sequence
(``component_seq_sums``), for the shares' intervals, whose variances are those of the
sequences' totals.

Kinds of position: ``class`` is 'bos', 'pad' or 'real' (the text's own tokens), with the
token's IOI ``role`` and ``variant`` (NULL outside IOI runs); ``batch`` is ``seq //
batch_size`` (the run's ``--batch-size``; NULL when the run records none).

The sums are those of the views' ``stable_mean``/``stable_sd``/``stable_cov`` macros
(``queries/sql/views.sql``), whose integer sums are exact, so partials add up to the very
integers a scan of the rows adds and a summary read from them has the same bytes:

- ``<m>_n`` = count(m), ``<m>_pos`` = count(m > 0) (the increase fractions);
- ``<m>_sum`` = Σ round(m·2^40), ``<m>_sq`` = Σ round(m²·2^40) (``fixed_point``);
- ``component_seq_sums``, per sequence and pair of measures x, y (``PAIRS``), the sums over
  the rows where both are present: ``<pair>_x`` = Σ round(x·2^80) and ``<pair>_y`` = Σ
  round(y·2^80) (``fine_point``).

Sums are stored as ``decimal(38, 0)`` (128-bit integers): exact while a group's Σ|m|·2^80
stays below 10^38 (Σ|m| below 8·10^13 nats).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from etl.warehouse.storage import make_dirs, write_parquet
from etl.warehouse.tables import SCHEMAS

if TYPE_CHECKING:
    from etl.warehouse.catalog import Shard

MEASURES = ("entropy_diff", "entropy_marginal", "loss_marginal", "kl_marginal",
            "entropy_marginal_context", "kl_context_kept", "entropy_marginal_suppression",
            "kl_suppression_kept", "kl_cspa", "kl_mean_ablated", "bos_attention")
"""The component measures summed (float32 nats; ``bos_attention`` a probability)."""

PAIRS = {"entropy_pair": ("entropy_marginal_context", "entropy_marginal"),
         "kl_pair": ("kl_context_kept", "kl_marginal"),
         "entropy_suppression_pair": ("entropy_marginal_suppression", "entropy_marginal"),
         "kl_suppression_pair": ("kl_suppression_kept", "kl_marginal"),
         "cspa_pair": ("kl_cspa", "kl_mean_ablated")}
"""Pair name → (x, y): the numerator and denominator measures of a copy_suppression share,
whose per-sequence totals its interval takes."""

FIXED_POINT = ("create or replace macro fixed_point(x) as "
               "(x::double * 1099511627776)::bigint;\n"
               "create or replace macro fine_point(x) as (x::double * 2.0 ** 80)::hugeint;\n")
"""The views' ``fixed_point`` and ``fine_point``, word for word (a test holds them equal)."""

MAX_SUMMED_NATS = 2896.0
"""The largest magnitude of a component measure the warehouse sums: ``fixed_point(m²)`` =
``m²·2^40`` as a BIGINT (``FIXED_POINT`` here, and ``queries/sql/views.sql``) holds
``|m| < 2^11.5`` = 2896.3 nats. Entropies are at most log V and a loss or KL at most
twice the largest change the component makes to a logit, so only a component that moves a
logit by over 1,448 nats comes near it, or logits so large (around 10^10) that float32
rounding of them does."""

INT128 = "::decimal(38, 0)"


def _measure_sums(m: str) -> list[str]:
    sums = [f"count({m}) as {m}_n", f"count_if({m} > 0)::bigint as {m}_pos",
            f"sum(fixed_point({m}))::hugeint{INT128} as {m}_sum",
            f"sum(fixed_point({m}::double * {m}::double))::hugeint{INT128} as {m}_sq"]
    return sums


def _pair_sums(name: str, x: str, y: str) -> list[str]:
    return [f"sum(fine_point(case when {y} is not null then {x} end)){INT128} as {name}_x",
            f"sum(fine_point(case when {x} is not null then {y} end)){INT128} as {name}_y"]


MARKED = """
    with marks as (
        select seq, position,
               case when is_bos then 'bos' when is_pad then 'pad' end as class, role, variant
        from run_tokens
        where is_bos or is_pad or role is not null or variant is not null
    )
    select r.*, coalesce(m.class, 'real') as class, m.role, m.variant,
           r.seq // $batch_size::integer as batch
    from run_rows as r
    left join marks as m using (seq, position)
"""
"""The rows of the view ``run_rows`` with their kind of position (from the view
``run_tokens``) and batch (``$batch_size``)."""


def _define(con, name: str, files: list[str], table: str) -> None:
    """The view ``name``: the rows of Parquet ``files`` of ``table``, with every column of
    its schema (files written before a column existed read it as NULL; no file: no row)."""
    con.register(f"{name}_schema", SCHEMAS[table].empty_table())
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    source = (f"from read_parquet([{listed}], union_by_name = true) union all by name "
              if files else "")
    con.execute(f"create or replace temp view {name} as {source}from {name}_schema")


KEYS = {"component_sums": ("layer", "head", "kind", "class", "role", "variant"),
        "component_batch_sums": ("batch", "layer", "head", "kind", "class"),
        "component_seq_sums": ("seq", "layer", "head", "kind", "class"),
        "resid_sums": ("layer", "point", "class", "role", "variant")}
"""Each sums table's grain: one row per distinct key. The batch grain serves the
batch-weighted means alone (``head_summary``'s ``weighting='batch'``) and the sequence grain
the copy-suppression shares' intervals alone (``copy_suppression``), so the other sums stay
as small however many batches and sequences a run has."""

BATCH_MEASURES = ("entropy_diff", "entropy_marginal")
"""The measures ``component_batch_sums`` holds (those the batch-weighted means take)."""


def _measures(table: str) -> list[str]:
    """The sums columns of ``table`` (see the module's docstring)."""
    if table == "component_sums":
        return [s for m in MEASURES for s in _measure_sums(m)]
    if table == "component_batch_sums":
        return [s for m in BATCH_MEASURES for s in _measure_sums(m)]
    if table == "component_seq_sums":
        return [s for name, (x, y) in PAIRS.items() for s in _pair_sums(name, x, y)]
    return ["count(entropy) as entropy_n",
            f"sum(fixed_point(entropy))::hugeint{INT128} as entropy_sum",
            f"sum(fixed_point(entropy::double * entropy::double))::hugeint{INT128} "
            "as entropy_sq"]


def sums_sql(table: str) -> str:
    """The query that sums the rows of the view ``run_rows`` into ``table`` (``KEYS``),
    ordered by its keys."""
    keys = KEYS[table]
    columns = ",\n       ".join([*keys, "count(*) as n", *_measures(table)])
    order = ", ".join(f"{k} nulls first" for k in keys)
    return (f"select {columns}\nfrom ({MARKED})\ngroup by {', '.join(keys)}\n"
            f"order by {order}")


SOURCES = {"component_sums": "component_effects", "component_batch_sums": "component_effects",
           "component_seq_sums": "component_effects", "resid_sums": "resid_entropy"}
"""Each sums table → the table whose rows it sums."""


def run_sums(files: dict[str, list[str]], batch_size: int | None,
             filesystem: object | None = None) -> dict[str, pa.Table]:
    """The sums tables of a run whose shards are ``files`` (table → paths or URLs of
    ``component_effects``, ``resid_entropy`` and ``tokens``), as Arrow tables.

    Args:
        batch_size: the run's sequences per batch (``batch`` = seq // batch_size), or None.
        filesystem: the fsspec filesystem of URLs (object storage), or None.
    """
    import duckdb

    con = duckdb.connect()
    try:
        if filesystem is not None:
            con.register_filesystem(filesystem)
        con.execute(FIXED_POINT)
        _define(con, "run_tokens", files.get("tokens", []), "tokens")
        sums = {}
        for table, source in SOURCES.items():
            _define(con, "run_rows", files.get(source, []), source)
            sums[table] = con.sql(sums_sql(table), params={"batch_size": batch_size}
                                  ).to_arrow_table()
        return sums
    finally:
        con.close()


def write_sums(files: dict[str, list[str]], batch_size: int | None,
               folder: Callable[[str], Path], generation: str,
               filesystem: object | None = None) -> dict[str, list[dict]]:
    """Write the sums tables of a run (``run_sums`` of ``files``) as
    ``folder(table)/sums-<generation>.parquet``, zstd.

    Returns:
        Table → its one-entry list of files, as a manifest lists shards.
    """
    written = {}
    for table, data in run_sums(files, batch_size, filesystem).items():
        path = folder(table) / f"sums-{generation}.parquet"
        make_dirs(path.parent)
        digest = write_parquet(path, data, compression="zstd")
        written[table] = [{"file": path.name, "rows": data.num_rows, "sha256": digest}]
    return written


def shard_files(shards: list[Shard]) -> dict[str, list[str]]:
    """Table → the paths of ``shards`` (what ``run_sums`` reads)."""
    files: dict[str, list[str]] = {}
    for shard in shards:
        files.setdefault(shard.table, []).append(str(shard.path))
    return files
