-- head_distribution: for the top k heads of a run by mean diff (or marginal), the spread of
-- the per-token values in nats: 5 %, 25 %, 50 %, 75 % and 95 % quantiles, min, max, mean and
-- n, for box plots.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param measure 'diff' rank and describe 'diff' or 'marginal'
-- @param k 5 how many heads
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        measure_param($measure::varchar) as measure,
        $k::integer as k,
        positions_param($positions::varchar) as positions
),

kept as (
    select *
    from head_values($positions::varchar, $measure::varchar,
                     coalesce($run_id::varchar, latest_run()))
),

per_head as (
    select
        run_id,
        layer,
        head,
        count(*) as n,
        stable_mean(value) as mean,
        min(value) as min,
        quantile_cont(value, [0.05, 0.25, 0.5, 0.75, 0.95]) as q,
        max(value) as max
    from kept
    group by run_id, layer, head
),

ranked as (
    select *, row_number() over (order by mean desc, layer, head) as rank
    from per_head
),

final as (
    select
        r.run_id,
        r.rank,
        r.layer,
        r.head,
        r.layer || '.' || r.head as component,
        s.measure,
        r.n,
        r.mean,
        r.min,
        r.q[1] as q05,
        r.q[2] as q25,
        r.q[3] as median,
        r.q[4] as q75,
        r.q[5] as q95,
        r.max
    from ranked as r, settings as s
    where r.rank <= s.k
)

select * from final
order by rank
