-- copy_suppression: per head and MLP of one run, how much of its entropy marginal and of
-- its KL divergence flows through the tokens already in the context, and how much through
-- those whose logit the component lowers (copy suppression proper), with 95 % confidence
-- intervals. Columns: n; the mean entropy_marginal, entropy_marginal_context and
-- entropy_marginal_suppression (nats); entropy_context_share = mean in-context part / mean
-- marginal and entropy_suppression_share = mean suppression part / mean marginal; the mean
-- kl_marginal, kl_context_kept and kl_suppression_kept; context_share = 1 − mean
-- kl_context_kept / mean kl_marginal (what the in-context tokens, either way, account for)
-- and suppression_share = 1 − mean kl_suppression_kept / mean kl_marginal (what lowering
-- in-context tokens alone accounts for: near 1 for a copy-suppression head, near 0 for a
-- copying head or one acting on absent tokens); for heads, the study's CSPA: the mean
-- kl_mean_ablated and kl_cspa and cspa_share = 1 − mean kl_cspa / mean kl_mean_ablated (the
-- Copy Suppression paper's "performance recovered", 76.9 % for GPT-2 small's 10.7; NULL for
-- MLPs and for runs without the cspa group); each share with its 95 % interval (delta
-- method for a ratio of means); rank orders heads among heads and MLPs among MLPs by mean
-- entropy_marginal, largest first. The context and suppression columns are NULL for a run
-- without those measure groups.
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
        count(entropy_marginal_suppression) as n_suppression,
        stable_mean(entropy_marginal) as entropy_marginal,
        stable_cov(entropy_marginal, entropy_marginal) as var_marginal,
        stable_mean(entropy_marginal_context) as entropy_marginal_context,
        stable_cov(entropy_marginal_context, entropy_marginal_context)
            as var_context,
        stable_cov(entropy_marginal_context, entropy_marginal) as cov_entropy,
        stable_mean(entropy_marginal_suppression) as entropy_marginal_suppression,
        stable_cov(entropy_marginal_suppression, entropy_marginal_suppression)
            as var_suppression,
        stable_cov(entropy_marginal_suppression, entropy_marginal)
            as cov_entropy_suppression,
        stable_mean(kl_marginal) as kl_marginal,
        stable_cov(kl_marginal, kl_marginal) as var_kl,
        stable_mean(kl_context_kept) as kl_context_kept,
        stable_cov(kl_context_kept, kl_context_kept) as var_kept,
        stable_cov(kl_context_kept, kl_marginal) as cov_kl,
        count(kl_context_kept::double * kl_marginal::double) as n_kl,
        stable_mean(kl_suppression_kept) as kl_suppression_kept,
        stable_cov(kl_suppression_kept, kl_suppression_kept) as var_suppression_kept,
        stable_cov(kl_suppression_kept, kl_marginal) as cov_kl_suppression,
        count(kl_suppression_kept::double * kl_marginal::double) as n_kl_suppression,
        stable_mean(kl_mean_ablated) as kl_mean_ablated,
        stable_cov(kl_mean_ablated, kl_mean_ablated) as var_mean_ablated,
        stable_mean(kl_cspa) as kl_cspa,
        stable_cov(kl_cspa, kl_cspa) as var_cspa,
        stable_cov(kl_cspa, kl_mean_ablated) as cov_cspa,
        count(kl_cspa::double * kl_mean_ablated::double) as n_cspa
    from kept
    group by run_id, layer, head, kind
),

shares as (
    select
        p.*,
        p.entropy_marginal_context / p.entropy_marginal as entropy_context_share,
        ratio_se(p.entropy_marginal_context, p.entropy_marginal, p.var_context, p.var_marginal,
                 p.cov_entropy, p.n_context) as entropy_context_share_se,
        p.entropy_marginal_suppression / p.entropy_marginal as entropy_suppression_share,
        ratio_se(p.entropy_marginal_suppression, p.entropy_marginal, p.var_suppression,
                 p.var_marginal, p.cov_entropy_suppression, p.n_suppression)
            as entropy_suppression_share_se,
        1 - p.kl_context_kept / p.kl_marginal as context_share,
        ratio_se(p.kl_context_kept, p.kl_marginal, p.var_kept, p.var_kl, p.cov_kl, p.n_kl)
            as context_share_se,
        1 - p.kl_suppression_kept / p.kl_marginal as suppression_share,
        ratio_se(p.kl_suppression_kept, p.kl_marginal, p.var_suppression_kept, p.var_kl,
                 p.cov_kl_suppression, p.n_kl_suppression) as suppression_share_se,
        1 - p.kl_cspa / p.kl_mean_ablated as cspa_share,
        ratio_se(p.kl_cspa, p.kl_mean_ablated, p.var_cspa, p.var_mean_ablated, p.cov_cspa,
                 p.n_cspa) as cspa_share_se
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
        r.entropy_context_share,
        r.entropy_context_share - 1.96 * r.entropy_context_share_se
            as entropy_context_share_ci95_low,
        r.entropy_context_share + 1.96 * r.entropy_context_share_se
            as entropy_context_share_ci95_high,
        r.entropy_marginal_suppression,
        r.entropy_suppression_share,
        r.entropy_suppression_share - 1.96 * r.entropy_suppression_share_se
            as entropy_suppression_share_ci95_low,
        r.entropy_suppression_share + 1.96 * r.entropy_suppression_share_se
            as entropy_suppression_share_ci95_high,
        r.kl_marginal,
        r.kl_context_kept,
        r.context_share,
        r.context_share - 1.96 * r.context_share_se as context_share_ci95_low,
        r.context_share + 1.96 * r.context_share_se as context_share_ci95_high,
        r.kl_suppression_kept,
        r.suppression_share,
        r.suppression_share - 1.96 * r.suppression_share_se as suppression_share_ci95_low,
        r.suppression_share + 1.96 * r.suppression_share_se as suppression_share_ci95_high,
        r.kl_mean_ablated,
        r.kl_cspa,
        r.cspa_share,
        r.cspa_share - 1.96 * r.cspa_share_se as cspa_share_ci95_low,
        r.cspa_share + 1.96 * r.cspa_share_se as cspa_share_ci95_high
    from ranked as r
    cross join settings as s
    where r.run_id = s.run_id
)

select * from final
order by run_id, kind, rank
