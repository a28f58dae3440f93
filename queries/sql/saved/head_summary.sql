-- head_summary: per run, layer and component (each head and the MLP), the mean entropy diff
-- and marginal in nats, their standard deviations, n, 95 % confidence intervals of the means
-- (normal approximation: mean ± 1.96·sd/√n) and the fraction of positions where the
-- component increases entropy (> 0).
-- @param positions 'all' which positions count: 'all' (the study's convention: BOS and padding included) or 'real' (BOS and padding excluded)
-- @param run_id NULL one run id, or NULL for every run
with

kept as (
    select * from component_rows($positions::varchar, $run_id::varchar)
),

stats as (
    select
        run_id,
        layer,
        head,
        kind,
        count(*) as n,
        stable_mean(entropy_diff) as mean_diff,
        stable_sd(entropy_diff) as sd_diff,
        stable_mean(entropy_marginal) as mean_marginal,
        stable_sd(entropy_marginal) as sd_marginal,
        avg((entropy_diff > 0)::double) as frac_increase_diff,
        avg((entropy_marginal > 0)::double) as frac_increase_marginal
    from kept
    group by run_id, layer, head, kind
),

final as (
    select
        run_id,
        layer,
        head,
        kind,
        n,
        mean_diff,
        sd_diff,
        ci95_low(mean_diff, sd_diff, n) as ci95_low_diff,
        ci95_high(mean_diff, sd_diff, n) as ci95_high_diff,
        mean_marginal,
        sd_marginal,
        ci95_low(mean_marginal, sd_marginal, n) as ci95_low_marginal,
        ci95_high(mean_marginal, sd_marginal, n) as ci95_high_marginal,
        frac_increase_diff,
        frac_increase_marginal
    from stats
)

select * from final
order by run_id, layer, kind, head
