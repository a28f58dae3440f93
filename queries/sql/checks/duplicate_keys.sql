-- duplicate_keys: keys that occur more than once: (run_id, seq, position, layer, head, kind)
-- in component_effects, (run_id, seq, position, layer, point) in resid_entropy and
-- (run_id, seq, position) in tokens. Empty = pass.
with

component_dupes as (
    select 'component_effects' as view_name, run_id, seq, position,
           layer || '.' || coalesce(head::varchar, kind) as key_rest, count(*) as copies
    from component_effects
    group by run_id, seq, position, layer, head, kind
    having count(*) > 1
),

resid_dupes as (
    select 'resid_entropy', run_id, seq, position,
           coalesce(layer::varchar || '.', '') || point, count(*)
    from resid_entropy
    group by run_id, seq, position, layer, point
    having count(*) > 1
),

token_dupes as (
    select 'tokens', run_id, seq, position, '', count(*)
    from tokens
    group by run_id, seq, position
    having count(*) > 1
),

final as (
    select * from component_dupes
    union all select * from resid_dupes
    union all select * from token_dupes
)

select * from final
