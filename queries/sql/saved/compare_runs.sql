-- compare_runs: two runs side by side per component (each head and the MLP): mean diff and
-- mean marginal (nats) in run A and run B, and B − A. Use it for webtext vs IOI, or the
-- final-scale lens vs the recomputed-ln lens on the same tokens. Both runs must be of one
-- model (the same weights) or, with models 'any', of one shape (layers and heads):
-- anything else is an error, not a table of nulls.
-- @param run_a NULL run A, or NULL for the earliest run
-- @param run_b NULL run B, or NULL for the latest other run of A's model
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
-- @param models 'same' 'same' (one model) or 'any' (two models of one shape)
with

settings as (
    select
        positions_param($positions::varchar) as positions,
        case when $models::varchar in ('same', 'any') then $models::varchar
             else error('models must be ''same'' or ''any''') end as models,
        coalesce($run_a::varchar, earliest_run()) as run_a,
        $run_b::varchar as run_b_given
),

run_models as (
    select run_id, created_at, model, n_layers, n_heads,
           coalesce(model_identity ->> 'weights_sha256', model) as weights
    from runs
),

resolved as (
    select
        s.positions,
        s.models,
        s.run_a,
        coalesce(
            s.run_b_given,
            (select r.run_id from run_models as r, run_models as a
             where a.run_id = s.run_a and r.run_id <> s.run_a and r.weights = a.weights
             order by r.created_at desc, r.run_id desc limit 1)
        ) as run_b
    from settings as s
),

checked as (
    select
        positions,
        models,
        case when run_a in (select run_id from runs) then run_a
             else error('run_a ' || coalesce(run_a, 'NULL') || ' is not in the warehouse')
        end as run_a,
        case when run_b in (select run_id from runs) then run_b
             else error('run_b ' || coalesce(run_b, 'NULL')
                        || ' is not in the warehouse (compare_runs needs two runs of one '
                        || 'model)')
        end as run_b
    from resolved
),

same_model as (
    select
        c.positions,
        case
            when a.n_layers <> b.n_layers or a.n_heads <> b.n_heads then error(
                'run_a ' || a.run_id || ' (' || a.n_layers || ' layers × ' || a.n_heads
                || ' heads) and run_b ' || b.run_id || ' (' || b.n_layers || ' × '
                || b.n_heads || ') have different shapes; compare runs of one model')
            when a.weights <> b.weights and c.models = 'same' then error(
                'run_a ' || a.run_id || ' (model ' || a.model || ') and run_b ' || b.run_id
                || ' (model ' || b.model || ') are different models; compare runs of one '
                || 'model, or pass models=any for two models of one shape')
            else c.run_a
        end as run_a,
        c.run_b
    from checked as c
    join run_models as a on a.run_id = c.run_a
    join run_models as b on b.run_id = c.run_b
),

kept as (
    select p.*
    from component_partials($positions::varchar, null) as p, same_model as s
    where p.run_id in (s.run_a, s.run_b)
),

means as (
    select
        run_id,
        layer,
        head,
        kind,
        sum(n)::bigint as n,
        summed_mean(entropy_diff_sum, entropy_diff_n) as mean_diff,
        summed_mean(entropy_marginal_sum, entropy_marginal_n) as mean_marginal
    from kept
    group by run_id, layer, head, kind
),

side_a as (
    select m.* from means as m, same_model as s where m.run_id = s.run_a
),

side_b as (
    select m.* from means as m, same_model as s where m.run_id = s.run_b
),

final as (
    select
        s.run_a,
        s.run_b,
        coalesce(a.layer, b.layer) as layer,
        coalesce(a.head, b.head) as head,
        coalesce(a.kind, b.kind) as kind,
        a.n as n_a,
        b.n as n_b,
        a.mean_diff as mean_diff_a,
        b.mean_diff as mean_diff_b,
        b.mean_diff - a.mean_diff as delta_diff,
        a.mean_marginal as mean_marginal_a,
        b.mean_marginal as mean_marginal_b,
        b.mean_marginal - a.mean_marginal as delta_marginal
    from side_a as a
    full join side_b as b
        on a.layer = b.layer and a.kind = b.kind and a.head is not distinct from b.head
    cross join same_model as s
)

select * from final
order by layer, kind, head
