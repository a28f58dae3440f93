-- ioi_roles: for IOI runs, the mean entropy diff and marginal (nats) of every component
-- (each head and the MLP) at each position role: IO, S1, S2 and end (the token before the
-- answer, where the model predicts the indirect object), with n.
-- @param run_id NULL one IOI run id, or NULL for every IOI run
-- @param variant 'clean' IOI prompt set: 'clean', 'abc' (corrupted) or NULL for both
with

settings as (
    select
        $run_id::varchar as run_id,
        case when $variant::varchar is null or $variant::varchar in ('clean', 'abc')
             then $variant::varchar
             else error('variant must be ''clean'', ''abc'' or null') end as variant
),

ioi_runs as (
    select r.run_id
    from runs as r, settings as s
    where r.dataset = 'ioi' and (s.run_id is null or r.run_id = s.run_id)
),

role_sums as (
    select p.*
    from component_sums as p
    join ioi_runs using (run_id)
    cross join settings as s
    where p.role in ('IO', 'S1', 'S2', 'end')
      and (s.variant is null or p.variant = s.variant)
),

final as (
    select
        run_id,
        layer,
        head,
        kind,
        role,
        sum(n)::bigint as n,
        summed_mean(entropy_diff_sum, entropy_diff_n) as mean_diff,
        summed_mean(entropy_marginal_sum, entropy_marginal_n) as mean_marginal
    from role_sums
    group by run_id, layer, head, kind, role
)

select * from final
order by run_id, layer, kind, head, role
