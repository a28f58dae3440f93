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

-- Macros shared by the saved queries.

-- positions_param(p): p when it is 'all' (every position: the study's convention, BOS and
-- padding included) or 'real' (BOS and padding excluded); an error otherwise.
create or replace macro positions_param(p) as
    case when p in ('all', 'real') then p
         else error('positions must be ''all'' or ''real''') end;

-- measure_param(m): m when it is 'diff' or 'marginal'; an error otherwise.
create or replace macro measure_param(m) as
    case when m in ('diff', 'marginal') then m
         else error('measure must be ''diff'' or ''marginal''') end;

-- excluded_positions(p): the (run_id, seq, position) keys that the positions convention p
-- leaves out: none for 'all'; BOS and padding tokens for 'real'.
create or replace macro excluded_positions(p) as table
    select run_id, seq, position
    from tokens
    where positions_param(p) = 'real' and (is_bos or is_pad);
