-- row_counts: runs whose row counts disagree with their manifest: component_effects must
-- have n_layers·(n_heads+1)·n_seqs·seq_len rows, resid_entropy (2·n_layers+1)·n_seqs·seq_len
-- ((n_layers+1)·n_seqs·seq_len for parallel blocks, which have no resid_mid) and tokens
-- n_seqs·seq_len. Empty = pass.
with

component_counts as (
    select run_id, count(*) as n from component_effects group by run_id
),

resid_counts as (
    select run_id, count(*) as n from resid_entropy group by run_id
),

token_counts as (
    select run_id, count(*) as n from tokens group by run_id
),

expected as (
    select
        run_id,
        n_layers * (n_heads + 1) * n_seqs * seq_len as component_expected,
        ((case when parallel_blocks then 1 else 2 end) * n_layers + 1) * n_seqs * seq_len
            as resid_expected,
        n_seqs * seq_len as tokens_expected
    from runs
),

final as (
    select
        e.run_id,
        e.component_expected,
        coalesce(c.n, 0) as component_rows,
        e.resid_expected,
        coalesce(r.n, 0) as resid_rows,
        e.tokens_expected,
        coalesce(t.n, 0) as token_rows
    from expected as e
    left join component_counts as c using (run_id)
    left join resid_counts as r using (run_id)
    left join token_counts as t using (run_id)
    where coalesce(c.n, 0) <> e.component_expected
       or coalesce(r.n, 0) <> e.resid_expected
       or coalesce(t.n, 0) <> e.tokens_expected
)

select * from final
