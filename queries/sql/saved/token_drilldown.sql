-- token_drilldown: for one component, the k positions where it raises (or lowers) entropy
-- most (or another of its effects: measure), with the token, the preceding context as text,
-- the diff and marginal (nats). Also its other direct effects there (loss_marginal,
-- kl_marginal, entropy_marginal_context, kl_context_kept: NULL where not measured), the
-- in-context token whose logit it lowered most (id, text, and the change of its logit,
-- suppressed_logit) and the IOI role where there is one. The entropies at a position are those
-- of the distribution the model reads there, the one predicting the token after [token].
-- @param run_id NULL one run id, or NULL for the latest run
-- @param component NULL 'L.H' for head H of layer L, 'L.mlp' for the MLP of layer L, or NULL for the head with the largest mean diff in the run
-- @param measure 'diff' rank positions by 'diff' or 'marginal' (entropy), 'loss' (loss_marginal), 'kl' (kl_marginal), 'context' (entropy_marginal_context) or 'context_kept' (kl_context_kept); positions without a value come last
-- @param direction 'raise' 'raise' (largest values first) or 'lower' (smallest first)
-- @param k 20 [1..100000] how many positions
-- @param context 8 [0..1000] how many preceding tokens to show
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        $component::varchar as component,
        case when $measure::varchar in ('diff', 'marginal', 'loss', 'kl', 'context',
                                        'context_kept') then $measure::varchar
             else error('measure must be ''diff'', ''marginal'', ''loss'', ''kl'', '
                        || '''context'' or ''context_kept''') end as measure,
        case when $direction::varchar in ('raise', 'lower') then $direction::varchar
             else error('direction must be ''raise'' or ''lower''') end as direction,
        $k::integer as k,
        $context::integer as context,
        positions_param($positions::varchar) as positions
),

top_head as (
    select p.layer || '.' || p.head as component
    from component_sums as p, settings as s
    where p.run_id = s.run_id and p.kind = 'head'
    group by p.layer, p.head
    order by summed_mean(p.entropy_diff_sum, p.entropy_diff_n) desc, p.layer, p.head
    limit 1
),

target as (
    select
        s.*,
        chosen_component(s.component, (select component from top_head), s.run_id)
            as chosen
    from settings as s
),

checked as (
    select
        t.*,
        component_param(t.chosen) as component_checked,
        component_layer(t.chosen) as layer,
        component_kind(t.chosen) as kind,
        component_head(t.chosen) as head
    from target as t
),

-- the run's tokens, read once for the three uses below
run_tokens as materialized (
    select tok.seq, tok.position, tok.token_id, tok.token, tok.role, tok.is_bos, tok.is_pad
    from tokens as tok
    join checked as s on tok.run_id = s.run_id
),

rows_of_component as (
    select
        c.run_id, c.seq, c.position, c.layer, c.head, c.kind, c.entropy_diff,
        c.entropy_marginal, c.loss_marginal, c.kl_marginal, c.entropy_marginal_context,
        c.kl_context_kept, c.suppressed_token_id, c.suppressed_logit,
        case s.measure when 'diff' then c.entropy_diff
                       when 'marginal' then c.entropy_marginal
                       when 'loss' then c.loss_marginal
                       when 'kl' then c.kl_marginal
                       when 'context' then c.entropy_marginal_context
                       else c.kl_context_kept end as value,
        tok.token, tok.role, tok.is_bos, tok.is_pad
    from component_effects as c
    join checked as s
        on c.run_id = s.run_id and c.layer = s.layer and c.kind = s.kind
        and c.head is not distinct from s.head
    join run_tokens as tok on tok.seq = c.seq and tok.position = c.position
    where s.positions = 'all' or not (tok.is_bos or tok.is_pad)
),

ranked as (
    select
        r.*,
        row_number() over (
            order by case when s.direction = 'raise' then -r.value else r.value end
                         nulls last,
                     r.seq, r.position
        ) as rank
    from rows_of_component as r, checked as s
),

top_rows as (
    select r.* from ranked as r, checked as s where r.rank <= s.k
),

contexts as (
    select
        r.seq,
        r.position,
        string_agg(tok.token, '' order by tok.position) as context
    from top_rows as r
    cross join checked as s
    join run_tokens as tok
        on tok.seq = r.seq and tok.position >= r.position - s.context
        and tok.position < r.position
    group by r.seq, r.position
),

-- the suppressed token's text: it is in context, so some token of the same sequence is it
suppressed as (
    select r.seq, r.position, min(tok.token) as suppressed_token
    from top_rows as r
    join run_tokens as tok on tok.seq = r.seq and tok.token_id = r.suppressed_token_id
    group by r.seq, r.position
),

final as (
    select
        r.rank,
        r.run_id,
        s.component_checked as component,
        r.layer,
        r.head,
        r.kind,
        r.seq,
        r.position,
        coalesce(c.context, '') as context,
        r.token,
        r.entropy_diff,
        r.entropy_marginal,
        r.loss_marginal,
        r.kl_marginal,
        r.entropy_marginal_context,
        r.kl_context_kept,
        r.suppressed_token_id,
        x.suppressed_token,
        r.suppressed_logit,
        r.role
    from top_rows as r
    cross join checked as s
    left join contexts as c using (seq, position)
    left join suppressed as x using (seq, position)
)

select * from final
order by rank
