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
    select p.*
    from component_partials($positions::varchar,
                            coalesce($run_id::varchar, latest_run())) as p
),

-- variances: summed_cov(Σx², Σx, Σx, n) of the fine sums
per_component as (
    select
        run_id, layer, head, kind,
        sum(n)::bigint as n,
        sum(entropy_marginal_context_n)::bigint as n_context,
        sum(entropy_marginal_suppression_n)::bigint as n_suppression,
        summed_mean(entropy_marginal_sum, entropy_marginal_n) as entropy_marginal,
        summed_cov(entropy_marginal_fine_sq, entropy_marginal_fine, entropy_marginal_fine,
                   entropy_marginal_n) as var_marginal,
        summed_mean(entropy_marginal_context_sum, entropy_marginal_context_n)
            as entropy_marginal_context,
        summed_cov(entropy_marginal_context_fine_sq, entropy_marginal_context_fine,
                   entropy_marginal_context_fine, entropy_marginal_context_n) as var_context,
        summed_cov(entropy_pair_xy, entropy_pair_x, entropy_pair_y, entropy_pair_n)
            as cov_entropy,
        summed_mean(entropy_marginal_suppression_sum, entropy_marginal_suppression_n)
            as entropy_marginal_suppression,
        summed_cov(entropy_marginal_suppression_fine_sq, entropy_marginal_suppression_fine,
                   entropy_marginal_suppression_fine, entropy_marginal_suppression_n)
            as var_suppression,
        summed_cov(entropy_suppression_pair_xy, entropy_suppression_pair_x,
                   entropy_suppression_pair_y, entropy_suppression_pair_n)
            as cov_entropy_suppression,
        summed_mean(kl_marginal_sum, kl_marginal_n) as kl_marginal,
        summed_cov(kl_marginal_fine_sq, kl_marginal_fine, kl_marginal_fine, kl_marginal_n)
            as var_kl,
        summed_mean(kl_context_kept_sum, kl_context_kept_n) as kl_context_kept,
        summed_cov(kl_context_kept_fine_sq, kl_context_kept_fine, kl_context_kept_fine,
                   kl_context_kept_n) as var_kept,
        summed_cov(kl_pair_xy, kl_pair_x, kl_pair_y, kl_pair_n) as cov_kl,
        sum(kl_pair_n)::bigint as n_kl,
        summed_mean(kl_suppression_kept_sum, kl_suppression_kept_n) as kl_suppression_kept,
        summed_cov(kl_suppression_kept_fine_sq, kl_suppression_kept_fine,
                   kl_suppression_kept_fine, kl_suppression_kept_n) as var_suppression_kept,
        summed_cov(kl_suppression_pair_xy, kl_suppression_pair_x, kl_suppression_pair_y,
                   kl_suppression_pair_n) as cov_kl_suppression,
        sum(kl_suppression_pair_n)::bigint as n_kl_suppression,
        summed_mean(kl_mean_ablated_sum, kl_mean_ablated_n) as kl_mean_ablated,
        summed_cov(kl_mean_ablated_fine_sq, kl_mean_ablated_fine, kl_mean_ablated_fine,
                   kl_mean_ablated_n) as var_mean_ablated,
        summed_mean(kl_cspa_sum, kl_cspa_n) as kl_cspa,
        summed_cov(kl_cspa_fine_sq, kl_cspa_fine, kl_cspa_fine, kl_cspa_n) as var_cspa,
        summed_cov(cspa_pair_xy, cspa_pair_x, cspa_pair_y, cspa_pair_n) as cov_cspa,
        sum(cspa_pair_n)::bigint as n_cspa
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
