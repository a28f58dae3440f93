-- copy_suppression: per head and MLP of one run, how much of its entropy marginal and of
-- its KL divergence comes from the tokens already in the context (copy suppression), with
-- 95 % confidence intervals. Columns: n, the mean entropy_marginal and
-- entropy_marginal_context (nats), entropy_share = mean in-context part / mean marginal,
-- the mean kl_marginal and kl_context_kept, kl_share = 1 − mean kl_context_kept / mean
-- kl_marginal (the part of the KL that the in-context tokens alone account for), each share
-- with its 95 % interval (delta method for a ratio of means); rank orders heads among heads
-- and MLPs among MLPs by mean entropy_marginal, largest first. The in-context columns are
-- NULL for a run without the context measures.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        positions_param($positions::varchar) as positions
),

kept as (
    select c.*
    from component_rows($positions::varchar,
                        coalesce($run_id::varchar, latest_run())) as c
),

per_component as (
    select
        run_id, layer, head, kind,
        count(*) as n,
        count(entropy_marginal_context) as n_context,
        stable_mean(entropy_marginal) as entropy_marginal,
        stable_cov(entropy_marginal, entropy_marginal) as var_marginal,
        stable_mean(entropy_marginal_context) as entropy_marginal_context,
        stable_cov(entropy_marginal_context, entropy_marginal_context)
            as var_context,
        stable_cov(entropy_marginal_context, entropy_marginal) as cov_entropy,
        stable_mean(kl_marginal) as kl_marginal,
        stable_cov(kl_marginal, kl_marginal) as var_kl,
        stable_mean(kl_context_kept) as kl_context_kept,
        stable_cov(kl_context_kept, kl_context_kept) as var_kept,
        stable_cov(kl_context_kept, kl_marginal) as cov_kl,
        count(kl_context_kept::double * kl_marginal::double) as n_kl
    from kept
    group by run_id, layer, head, kind
),

shares as (
    select
        p.*,
        p.entropy_marginal_context / p.entropy_marginal as entropy_share,
        ratio_se(p.entropy_marginal_context, p.entropy_marginal, p.var_context, p.var_marginal,
                 p.cov_entropy, p.n_context) as entropy_share_se,
        1 - p.kl_context_kept / p.kl_marginal as kl_share,
        ratio_se(p.kl_context_kept, p.kl_marginal, p.var_kept, p.var_kl, p.cov_kl, p.n_kl)
            as kl_share_se
    from per_component as p
),

ranked as (
    select
        s.*,
        row_number() over (partition by s.run_id, s.kind
                           order by s.entropy_marginal desc, s.layer, s.head) as rank
    from shares as s
),

final as (
    select
        r.run_id,
        r.rank,
        r.layer,
        r.head,
        r.kind,
        case when r.kind = 'mlp' then 'MLP ' || r.layer else r.layer || '.' || r.head end
            as component,
        r.n,
        r.entropy_marginal,
        r.entropy_marginal_context,
        r.entropy_share,
        r.entropy_share - 1.96 * r.entropy_share_se as entropy_share_ci95_low,
        r.entropy_share + 1.96 * r.entropy_share_se as entropy_share_ci95_high,
        r.kl_marginal,
        r.kl_context_kept,
        r.kl_share,
        r.kl_share - 1.96 * r.kl_share_se as kl_share_ci95_low,
        r.kl_share + 1.96 * r.kl_share_se as kl_share_ci95_high
    from ranked as r
    cross join settings as s
    where r.run_id = s.run_id
)

select * from final
order by run_id, kind, rank
