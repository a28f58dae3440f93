-- head_distribution: for the top k heads of a run by mean diff (or marginal), the spread of
-- the per-token values in nats: 5 %, 25 %, 50 %, 75 % and 95 % quantiles, min, max, mean and
-- n, for box plots.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param measure 'diff' rank and describe 'diff' or 'marginal'
-- @param k 5 [1..10000] how many heads
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        measure_param($measure::varchar) as measure,
        $k::integer as k,
        positions_param($positions::varchar) as positions
),

-- the heads ranked by their mean (from the partial sums), then the rows of the top k alone
ranked as (
    select
        h.run_id,
        h.layer,
        h.head,
        h.n,
        h.mean,
        row_number() over (order by h.mean desc, h.layer, h.head) as rank
    from head_stats($positions::varchar, $measure::varchar,
                    coalesce($run_id::varchar, latest_run())) as h
),

chosen as (
    select r.* from ranked as r, settings as s where r.rank <= s.k
),

kept as (
    select h.*
    from head_values($positions::varchar, $measure::varchar,
                     coalesce($run_id::varchar, latest_run())) as h
    semi join chosen using (run_id, layer, head)
),

spread as (
    select
        run_id,
        layer,
        head,
        min(value) as min,
        quantile_cont(value, [0.05, 0.25, 0.5, 0.75, 0.95]) as q,
        max(value) as max
    from kept
    group by run_id, layer, head
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
        d.min,
        d.q[1] as q05,
        d.q[2] as q25,
        d.q[3] as median,
        d.q[4] as q75,
        d.q[5] as q95,
        d.max
    from chosen as r
    join spread as d using (run_id, layer, head)
    cross join settings as s
)

select * from final
order by rank
