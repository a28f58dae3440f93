-- resid_summary: mean logit-lens entropy (nats) at each residual point per run and layer, and
-- the per-layer steps: attention (resid_mid − resid_pre) and MLP (next resid_pre − resid_mid;
-- for the last layer, final − resid_mid), as in the study's line plot. Positive steps
-- increase entropy. Runs of parallel attention+MLP blocks (runs.parallel_blocks) have no
-- resid_mid: mean_resid_mid, attn_step and mlp_step are NULL there, and the block's step is
-- mean_next − mean_resid_pre.
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
-- @param run_id NULL one run id, or NULL for every run
with

kept as (
    select * from resid_partials($positions::varchar, $run_id::varchar)
),

point_means as (
    select
        run_id,
        layer,
        point,
        sum(n)::bigint as n,
        summed_mean(entropy_sum, entropy_n) as mean_entropy
    from kept
    group by run_id, layer, point
),

per_layer as (
    select
        run_id,
        layer,
        max(n) as n,
        max(mean_entropy) filter (where point = 'resid_pre') as mean_resid_pre,
        max(mean_entropy) filter (where point = 'resid_mid') as mean_resid_mid
    from point_means
    where point <> 'final'
    group by run_id, layer
),

finals as (
    select run_id, mean_entropy as mean_final
    from point_means
    where point = 'final'
),

final as (
    select
        l.run_id,
        l.layer,
        l.n,
        l.mean_resid_pre,
        l.mean_resid_mid,
        coalesce(
            lead(l.mean_resid_pre) over (partition by l.run_id order by l.layer), f.mean_final
        ) as mean_next,
        l.mean_resid_mid - l.mean_resid_pre as attn_step,
        coalesce(
            lead(l.mean_resid_pre) over (partition by l.run_id order by l.layer), f.mean_final
        ) - l.mean_resid_mid as mlp_step,
        f.mean_final
    from per_layer as l
    join finals as f using (run_id)
)

select * from final
order by run_id, layer
