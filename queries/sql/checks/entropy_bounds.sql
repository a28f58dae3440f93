-- entropy_bounds: rows whose entropy lies outside [0, ln(d_vocab)] nats (residual points), or
-- whose diff or marginal lies outside [−ln(d_vocab), ln(d_vocab)] (a difference of two such
-- entropies); 1e-4 nats of float32 rounding allowed. Empty = pass.
with

limits as (
    select run_id, ln(d_vocab) + 1e-4 as upper from runs
),

bad_resid as (
    select 'resid_entropy' as view_name, r.run_id, r.seq, r.position, r.layer,
           null::smallint as head, r.point as what, r.entropy as value
    from resid_entropy as r
    join limits as l using (run_id)
    where r.entropy < -1e-4 or r.entropy > l.upper
),

bad_component as (
    select 'component_entropy' as view_name, c.run_id, c.seq, c.position, c.layer, c.head,
           'entropy_diff' as what, c.entropy_diff as value
    from component_entropy as c
    join limits as l using (run_id)
    where abs(c.entropy_diff) > l.upper
    union all
    select 'component_entropy', c.run_id, c.seq, c.position, c.layer, c.head,
           'entropy_marginal', c.entropy_marginal
    from component_entropy as c
    join limits as l using (run_id)
    where abs(c.entropy_marginal) > l.upper
),

final as (
    select * from bad_resid
    union all
    select * from bad_component
)

select * from final
