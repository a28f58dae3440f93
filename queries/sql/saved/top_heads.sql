-- top_heads: attention heads ranked by their mean entropy diff or marginal (nats, largest
-- first), top k, with n and the 95 % confidence interval of the mean.
-- @param measure 'diff' rank by 'diff' or 'marginal'
-- @param k 10 [1..10000] how many heads to return per run
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
-- @param run_id NULL one run id, or NULL for every run
-- @param dataset NULL one dataset ('openwebtext', 'ioi', 'text'), or NULL for every dataset
with

settings as (
    select
        measure_param($measure::varchar) as measure,
        positions_param($positions::varchar) as positions,
        $k::integer as k,
        $run_id::varchar as run_id,
        $dataset::varchar as dataset
),

chosen_runs as (
    select r.run_id, r.dataset
    from runs as r, settings as s
    where (s.run_id is null or r.run_id = s.run_id)
      and (s.dataset is null or r.dataset = s.dataset)
),

per_head as (
    select h.*
    from head_stats($positions::varchar, $measure::varchar, $run_id::varchar) as h
    semi join chosen_runs using (run_id)
),

ranked as (
    select
        p.*,
        row_number() over (partition by p.run_id order by p.mean desc, p.layer, p.head)
            as rank
    from per_head as p
),

final as (
    select
        r.run_id,
        c.dataset,
        r.rank,
        r.layer,
        r.head,
        r.layer || '.' || r.head as component,
        s.measure,
        r.n,
        r.mean,
        r.sd,
        ci95_low(r.mean, r.sd, r.n) as ci95_low,
        ci95_high(r.mean, r.sd, r.n) as ci95_high
    from ranked as r
    join chosen_runs as c using (run_id)
    cross join settings as s
    where r.rank <= s.k
)

select * from final
order by run_id, rank
