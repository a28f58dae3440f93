-- finite_values: values that are NaN, infinite or NULL where a value belongs, and values
-- where NULL belongs. Entropies (diff, marginal, residual points) are never NULL. The
-- other effects follow the run's measures (runs.measures): a measured group's columns are
-- never NULL, except loss_marginal, which is NULL exactly where tokens.next_token_id is
-- (no next token), suppressed_token_id and suppressed_logit, NULL together exactly where
-- the context C(t) is empty (no token at positions 1..t, padding excluded), kl_cspa and
-- kl_mean_ablated, NULL for the MLPs (CSPA ablates heads), bos_attention, NULL for the
-- MLPs (a head's attention), and the ranks,
-- NULL where the next token is not among the top 3 (always where there is none); the
-- columns of a group the run did not measure are NULL. next_token_id is the token at the
-- next position (NULL at the last position, on padding and before padding), unless the run's
-- shards predate the column (a migrated run: NULL at every position); final_scale and
-- resid_norm are never NULL, unless the run's shards predate them (NULL at every
-- position). Empty = pass.
with

next_ids as (
    select run_id, count(next_token_id) > 0 as has_next_ids,
           count(final_scale) > 0 or count(resid_norm) > 0 as has_scales
    from tokens group by run_id
),

flags as (
    select
        run_id,
        coalesce((select has_next_ids from next_ids as x where x.run_id = runs.run_id), false)
            as has_next_ids,
        coalesce((select has_scales from next_ids as x where x.run_id = runs.run_id), false)
            as has_scales,
        coalesce(list_contains(measures, 'loss'), false) as has_loss,
        coalesce(list_contains(measures, 'kl'), false) as has_kl,
        coalesce(list_contains(measures, 'context'), false) as has_context,
        coalesce(list_contains(measures, 'suppression'), false) as has_suppression,
        coalesce(list_contains(measures, 'cspa'), false) as has_cspa,
        coalesce(list_contains(measures, 'bos'), false) as has_bos,
        coalesce(list_contains(measures, 'calibration'), false) as has_calibration
    from runs
),

bad_component as (
    select 'component_effects' as view_name, run_id, seq, position, layer, head,
           'entropy_diff' as what, entropy_diff as value
    from component_effects
    where entropy_diff is null or not isfinite(entropy_diff)
    union all
    select 'component_effects', run_id, seq, position, layer, head,
           'entropy_marginal', entropy_marginal
    from component_effects
    where entropy_marginal is null or not isfinite(entropy_marginal)
),

bad_resid as (
    select 'resid_entropy', run_id, seq, position, layer, null::smallint, point, entropy
    from resid_entropy
    where entropy is null or not isfinite(entropy)
),

-- each token with what its component rows need: a next token, a non-empty context
token_facts as (
    select
        t.run_id, t.seq, t.position, t.next_token_id,
        lead(t.token_id) over w as following_id,
        lead(t.is_pad) over w as following_pad,
        t.is_pad,
        t.top1_prob, t.top2_prob, t.top3_prob, t.target_rank, t.final_scale, t.resid_norm,
        coalesce(bool_or(t.position >= 1 and not t.is_pad) over (
            w rows between unbounded preceding and current row), false) as has_context
    from tokens as t
    window w as (partition by t.run_id, t.seq order by t.position)
),

-- the effect columns in one list (float values; the token id and rank as numbers)
effects as (
    select
        c.run_id, c.seq, c.position, c.layer, c.head,
        unnest([
            {what: 'loss_marginal', value: c.loss_marginal::double,
             wanted: f.has_loss and t.next_token_id is not null},
            {what: 'kl_marginal', value: c.kl_marginal, wanted: f.has_kl},
            {what: 'entropy_marginal_context', value: c.entropy_marginal_context,
             wanted: f.has_context},
            {what: 'kl_context_kept', value: c.kl_context_kept, wanted: f.has_context},
            {what: 'entropy_marginal_suppression', value: c.entropy_marginal_suppression,
             wanted: f.has_suppression},
            {what: 'kl_suppression_kept', value: c.kl_suppression_kept,
             wanted: f.has_suppression},
            {what: 'kl_cspa', value: c.kl_cspa, wanted: f.has_cspa and c.kind = 'head'},
            {what: 'kl_mean_ablated', value: c.kl_mean_ablated,
             wanted: f.has_cspa and c.kind = 'head'},
            {what: 'bos_attention', value: c.bos_attention,
             wanted: f.has_bos and c.kind = 'head'},
            {what: 'suppressed_token_id', value: c.suppressed_token_id,
             wanted: f.has_context and t.has_context},
            {what: 'suppressed_logit', value: c.suppressed_logit,
             wanted: f.has_context and t.has_context},
            {what: 'ablated_top1_prob', value: c.ablated_top1_prob, wanted: f.has_calibration},
            {what: 'ablated_top2_prob', value: c.ablated_top2_prob, wanted: f.has_calibration},
            {what: 'ablated_top3_prob', value: c.ablated_top3_prob, wanted: f.has_calibration},
            {what: 'ablated_target_rank', value: c.ablated_target_rank,
             wanted: case when f.has_calibration and t.next_token_id is not null then null
                          else false end}
        ]) as e
    from component_effects as c
    join flags as f using (run_id)
    join token_facts as t using (run_id, seq, position)
),

bad_effects as (
    select 'component_effects', run_id, seq, position, layer, head,
           e.what || case when e.value is null then ' NULL'
                          when not isfinite(e.value) then ' not finite'
                          else ' not NULL' end,
           e.value
    from effects
    where (e.wanted and e.value is null)
       or (e.value is not null and not isfinite(e.value))
       or (not e.wanted and e.value is not null)
),

-- the tokens' own columns: next_token_id, the final scale and residual norm and, for
-- calibration runs, the model's top 3
token_values as (
    select
        t.run_id, t.seq, t.position,
        unnest([
            {what: 'top1_prob', value: t.top1_prob::double, wanted: f.has_calibration},
            {what: 'top2_prob', value: t.top2_prob, wanted: f.has_calibration},
            {what: 'top3_prob', value: t.top3_prob, wanted: f.has_calibration},
            {what: 'target_rank', value: t.target_rank,
             wanted: case when f.has_calibration and t.next_token_id is not null then null
                          else false end},
            {what: 'final_scale', value: t.final_scale, wanted: f.has_scales},
            {what: 'resid_norm', value: t.resid_norm, wanted: f.has_scales}
        ]) as e
    from token_facts as t
    join flags as f using (run_id)
),

bad_tokens as (
    select 'tokens', run_id, seq, position, null::smallint, null::smallint,
           e.what || case when e.value is null then ' NULL'
                          when not isfinite(e.value) then ' not finite'
                          else ' not NULL' end,
           e.value
    from token_values
    where (e.wanted and e.value is null)
       or (e.value is not null and not isfinite(e.value))
       or (not e.wanted and e.value is not null)
    union all
    select 'tokens', t.run_id, t.seq, t.position, null, null, 'next_token_id', t.next_token_id
    from token_facts as t
    join flags as f using (run_id)
    where f.has_next_ids
      and t.next_token_id is distinct from
          case when not t.is_pad and not t.following_pad then t.following_id end
),

final as (
    select * from bad_component
    union all
    select * from bad_resid
    union all
    select * from bad_effects
    union all
    select * from bad_tokens
)

select * from final
