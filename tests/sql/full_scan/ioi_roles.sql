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

role_tokens as (
    select t.run_id, t.seq, t.position, t.role
    from tokens as t
    join ioi_runs using (run_id)
    cross join settings as s
    where t.role in ('IO', 'S1', 'S2', 'end')
      and (s.variant is null or t.variant = s.variant)
),

final as (
    select
        c.run_id,
        c.layer,
        c.head,
        c.kind,
        t.role,
        count(*) as n,
        stable_mean(c.entropy_diff) as mean_diff,
        stable_mean(c.entropy_marginal) as mean_marginal
    from component_effects as c
    join role_tokens as t using (run_id, seq, position)
    group by c.run_id, c.layer, c.head, c.kind, t.role
)

select * from final
order by run_id, layer, kind, head, role
