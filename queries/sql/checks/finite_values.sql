-- finite_values: entropy values that are NaN, infinite or NULL. Empty = pass.
with

bad_component as (
    select 'component_entropy' as view_name, run_id, seq, position, layer, head,
           entropy_diff as diff_or_entropy, entropy_marginal as marginal
    from component_entropy
    where entropy_diff is null or entropy_marginal is null
       or not isfinite(entropy_diff) or not isfinite(entropy_marginal)
),

bad_resid as (
    select 'resid_entropy', run_id, seq, position, layer, null::smallint, entropy, null::float
    from resid_entropy
    where entropy is null or not isfinite(entropy)
),

final as (
    select * from bad_component
    union all
    select * from bad_resid
)

select * from final
