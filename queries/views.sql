-- Views over the entropy warehouse's Parquet files and run manifests.
--
-- The warehouse root is the DuckDB variable `warehouse`; it defaults to 'data/warehouse'
-- (relative paths resolve against the working directory when a query runs). From the
-- DuckDB shell, in the project root:
--     duckdb -init queries/views.sql
-- or, for another warehouse:
--     duckdb -cmd "SET VARIABLE warehouse = '/path/to/warehouse'" -init queries/views.sql
-- (`python -m queries --warehouse DIR ...` sets the variable for you.)
--
-- Views:
--   runs(run_id, created_at, model, dataset, lens, ablation, n_layers, n_heads, n_seqs,
--        seq_len, n_tokens, ...)            one row per complete run (its manifest)
--   tokens(run_id, seq, position, token_id, token, is_bos, is_pad, role, variant, example)
--   component_entropy(run_id, seq, position, layer, head, kind, entropy_diff,
--        entropy_marginal)                  kind 'head' or 'mlp'; head is NULL for the MLP
--   resid_entropy(run_id, seq, position, layer, point, entropy)
--                                           point 'resid_pre', 'resid_mid' or 'final';
--                                           layer is NULL for 'final'
-- Entropies are in nats; positive diffs and marginals increase entropy.

set variable warehouse = coalesce(getvariable('warehouse'), 'data/warehouse');

create or replace view runs as
select
    run_id,
    created_at::timestamptz as created_at,
    model,
    dataset,
    lens,
    ablation,
    n_layers,
    n_heads,
    n_seqs,
    seq_len,
    n_tokens,
    d_vocab,
    n_component_rows,
    n_resid_rows,
    n_token_rows,
    device,
    dtype,
    seconds,
    tokens_per_s,
    completed_at::timestamptz as completed_at,
    dataset_fingerprint,
    git_commit,
    config,
    model_identity,
    dataset_source,
    packages,
    timing
from read_json(
    getvariable('warehouse') || '/runs/*/manifest.json',
    union_by_name = true
);

create or replace view tokens as
select run_id, seq, position, token_id, token, is_bos, is_pad, role, variant, example
from read_parquet(
    getvariable('warehouse') || '/tokens/*/*.parquet',
    hive_partitioning = true, hive_types_autocast = false, union_by_name = true
);

create or replace view component_entropy as
select run_id, seq, position, layer, head, kind, entropy_diff, entropy_marginal
from read_parquet(
    getvariable('warehouse') || '/component_entropy/*/*.parquet',
    hive_partitioning = true, hive_types_autocast = false, union_by_name = true
);

create or replace view resid_entropy as
select run_id, seq, position, layer, point, entropy
from read_parquet(
    getvariable('warehouse') || '/resid_entropy/*/*.parquet',
    hive_partitioning = true, hive_types_autocast = false, union_by_name = true
);
