-- component_spread: for every head and MLP of one run, the spread of its per-token entropy
-- diff and marginal in nats: 5 %, 25 %, 50 %, 75 % and 95 % quantiles, mean and n, one row
-- per component and measure, for box plots of any component.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

kept as (
    select * from component_rows($positions::varchar, coalesce($run_id::varchar, latest_run()))
),

values_by_measure as (
    select run_id, layer, head, kind, 'diff' as measure, entropy_diff as value from kept
    union all
    select run_id, layer, head, kind, 'marginal' as measure, entropy_marginal as value
    from kept
),

per_component as (
    select
        run_id,
        layer,
        head,
        kind,
        measure,
        count(value) as n,
        stable_mean(value) as mean,
        quantile_cont(value, [0.05, 0.25, 0.5, 0.75, 0.95]) as q
    from values_by_measure
    group by all
),

final as (
    select
        run_id,
        layer || '.' || coalesce(head::varchar, 'mlp') as component,
        layer,
        head,
        kind,
        measure,
        n,
        mean,
        q[1] as q05,
        q[2] as q25,
        q[3] as median,
        q[4] as q75,
        q[5] as q95
    from per_component
)

select * from final
order by layer, kind, head, measure
