-- runs_have_manifest: run ids that have rows in a fact view but no manifest in runs. The
-- views read only files that manifests list, so this finds a manifest whose run_id differs
-- from its run_id=<id> folder. Empty = pass.
with

fact_runs as (
    select distinct 'component_effects' as view_name, run_id from component_effects
    union all
    select distinct 'resid_entropy', run_id from resid_entropy
    union all
    select distinct 'tokens', run_id from tokens
),

final as (
    select f.view_name, f.run_id
    from fact_runs as f
    anti join runs using (run_id)
)

select * from final
