-- entropy_bounds: rows whose entropy lies outside [0, ln(d_vocab)] nats (residual points), or
-- whose diff, marginal or in-context part of the marginal (entropy_marginal_context,
-- entropy_marginal_suppression) lies outside [−ln(d_vocab), ln(d_vocab)] (a difference of
-- two such entropies); 1e-4 nats of float32 rounding allowed. Also the other effects'
-- bounds: a KL divergence (kl_marginal, kl_context_kept, kl_suppression_kept, kl_cspa,
-- kl_mean_ablated) below −1e-4 (stored unclamped: float32 rounding of an exact KL of 0
-- gives either sign); a top-3 probability (ablated_top*_prob in
-- component_effects, top*_prob in tokens) outside [0, 1] or out of order (top1 ≥ top2 ≥
-- top3), 1e-6 allowed; a head's attention to BOS (bos_attention) outside [0, 1], 1e-6
-- allowed; a final scale (final_scale) not above 0 or a final residual norm (resid_norm)
-- below 0; a rank (ablated_target_rank, target_rank) outside 1..3; a
-- suppressed_token_id that is not in context (no token of the sequence at positions 1..t,
-- padding excluded). Empty = pass.
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
    select 'component_effects' as view_name, u.run_id, u.seq, u.position, u.layer, u.head,
           u.what, u.value
    from (
        unpivot (select run_id, seq, position, layer, head, entropy_diff, entropy_marginal,
                        entropy_marginal_context, entropy_marginal_suppression
                 from component_effects)
        on entropy_diff, entropy_marginal, entropy_marginal_context,
           entropy_marginal_suppression
        into name what value value
    ) as u
    join limits as l using (run_id)
    where abs(u.value) > l.upper
),

bad_effects as (
    select 'component_effects' as view_name, run_id, seq, position, layer, head, what, value
    from (
        unpivot (select run_id, seq, position, layer, head, kl_marginal, kl_context_kept,
                        kl_suppression_kept, kl_cspa, kl_mean_ablated
                 from component_effects)
        on kl_marginal, kl_context_kept, kl_suppression_kept, kl_cspa, kl_mean_ablated
        into name what value value
    )
    where value < -1e-4
    union all
    select 'component_effects', run_id, seq, position, layer, head,
           'ablated_top' || k.k || '_prob',
           [ablated_top1_prob, ablated_top2_prob, ablated_top3_prob][k.k]
    from component_effects, range(1, 4) as k(k)
    where not [ablated_top1_prob, ablated_top2_prob, ablated_top3_prob][k.k]
              between -1e-6 and 1 + 1e-6
    union all
    select 'component_effects', run_id, seq, position, layer, head,
           'ablated_top' || k.k || '_prob below the next',
           [ablated_top1_prob, ablated_top2_prob][k.k]
    from component_effects, range(1, 3) as k(k)
    where [ablated_top1_prob, ablated_top2_prob][k.k]
          < [ablated_top2_prob, ablated_top3_prob][k.k] - 1e-6
    union all
    select 'component_effects', run_id, seq, position, layer, head,
           'ablated_target_rank', ablated_target_rank
    from component_effects
    where not ablated_target_rank between 1 and 3
    union all
    select 'component_effects', run_id, seq, position, layer, head,
           'bos_attention', bos_attention
    from component_effects
    where not bos_attention between -1e-6 and 1 + 1e-6
),

bad_tokens as (
    select 'tokens' as view_name, run_id, seq, position, null::smallint as layer,
           null::smallint as head, 'top' || k.k || '_prob' as what,
           [top1_prob, top2_prob, top3_prob][k.k] as value
    from tokens, range(1, 4) as k(k)
    where not [top1_prob, top2_prob, top3_prob][k.k] between -1e-6 and 1 + 1e-6
    union all
    select 'tokens', run_id, seq, position, null, null,
           'top' || k.k || '_prob below the next', [top1_prob, top2_prob][k.k]
    from tokens, range(1, 3) as k(k)
    where [top1_prob, top2_prob][k.k] < [top2_prob, top3_prob][k.k] - 1e-6
    union all
    select 'tokens', run_id, seq, position, null, null, 'target_rank', target_rank
    from tokens
    where not target_rank between 1 and 3
    union all
    select 'tokens', run_id, seq, position, null, null, 'final_scale', final_scale
    from tokens
    where final_scale <= 0
    union all
    select 'tokens', run_id, seq, position, null, null, 'resid_norm', resid_norm
    from tokens
    where resid_norm < 0
),

-- the first position ≥ 1 (padding excluded) at which each token id occurs in a sequence
first_seen as (
    select run_id, seq, token_id, min(position) as first_position
    from tokens
    where position >= 1 and not is_pad
    group by run_id, seq, token_id
),

bad_suppressed as (
    select 'component_effects' as view_name, c.run_id, c.seq, c.position, c.layer, c.head,
           'suppressed_token_id not in context' as what, c.suppressed_token_id as value
    from component_effects as c
    left join first_seen as f
        on f.run_id = c.run_id and f.seq = c.seq and f.token_id = c.suppressed_token_id
    where c.suppressed_token_id is not null
      and (f.first_position is null or f.first_position > c.position)
),

final as (
    select * from bad_resid
    union all
    select * from bad_component
    union all
    select * from bad_effects
    union all
    select * from bad_tokens
    union all
    select * from bad_suppressed
)

select * from final
