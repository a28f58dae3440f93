-- head_summary: per run, layer and component (each head and the MLP), the mean entropy diff
-- and marginal in nats, their standard deviations, n, 95 % confidence intervals of the means
-- (normal approximation: mean ± 1.96·sd/√n) and the fraction of positions where the
-- component increases entropy (> 0). With weighting 'batch' every mean (and fraction) is the
-- mean of the per-batch means, batches being the run's consecutive groups of --batch-size
-- sequences, as the study's notebook averaged; its sd and CI columns are then NULL (n and
-- n_batches still count positions and batches).
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
-- @param run_id NULL one run id, or NULL for every run
-- @param weighting 'token' 'token' (every position counts once) or 'batch' (every batch counts once: the study's mean of batch means; equal to 'token' when every batch holds as many positions)
with

settings as (
    select weighting_param($weighting::varchar) as weighting
),

-- the sums over the run under weighting 'token', per batch under 'batch'
kept as (
    select c.* exclude (role, variant), null::integer as batch
    from component_partials($positions::varchar, $run_id::varchar) as c
    semi join runs as r using (run_id)
    where weighting_param($weighting::varchar) = 'token'
    union all by name
    select c.*
    from component_batch_partials($positions::varchar, $run_id::varchar) as c
    semi join runs as r using (run_id)
    where weighting_param($weighting::varchar) = 'batch'
),

-- per batch under weighting 'batch'; one group of every position under 'token'
groups as (
    select
        k.run_id,
        k.layer,
        k.head,
        k.kind,
        case when s.weighting = 'batch' then k.batch end as batch,
        sum(k.n)::bigint as n,
        summed_mean(k.entropy_diff_sum, k.entropy_diff_n) as mean_diff,
        summed_sd(k.entropy_diff_sum, k.entropy_diff_sq, k.entropy_diff_n) as sd_diff,
        summed_mean(k.entropy_marginal_sum, k.entropy_marginal_n) as mean_marginal,
        summed_sd(k.entropy_marginal_sum, k.entropy_marginal_sq, k.entropy_marginal_n)
            as sd_marginal,
        summed_fraction(k.entropy_diff_pos, k.entropy_diff_n) as frac_increase_diff,
        summed_fraction(k.entropy_marginal_pos, k.entropy_marginal_n)
            as frac_increase_marginal
    from kept as k, settings as s
    group by all
),

-- how many batches hold the positions counted (their keys alone are read)
batches as (
    select c.run_id, c.layer, c.head, c.kind, count(distinct c.batch) as n_batches
    from component_batch_partials($positions::varchar, $run_id::varchar) as c
    semi join runs as r using (run_id)
    group by c.run_id, c.layer, c.head, c.kind
),

stats as (
    select
        run_id,
        layer,
        head,
        kind,
        sum(n)::bigint as n,
        stable_mean(mean_diff) as mean_diff,
        case when count(*) = 1 then any_value(sd_diff) end as sd_diff,
        stable_mean(mean_marginal) as mean_marginal,
        case when count(*) = 1 then any_value(sd_marginal) end as sd_marginal,
        -- the mean of the batches' fractions, in fixed point (the same bytes in any order)
        case when count(*) = 1 then any_value(frac_increase_diff)
             else stable_mean(frac_increase_diff) end as frac_increase_diff,
        case when count(*) = 1 then any_value(frac_increase_marginal)
             else stable_mean(frac_increase_marginal) end as frac_increase_marginal
    from groups
    group by run_id, layer, head, kind
),

counted as (
    select s.*, b.n_batches::bigint as n_batches
    from stats as s
    join batches as b
        on b.run_id = s.run_id and b.layer = s.layer and b.kind = s.kind
        and b.head is not distinct from s.head
),

final as (
    select
        run_id,
        layer,
        head,
        kind,
        n,
        n_batches,
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
    from counted
)

select * from final
order by run_id, layer, kind, head
