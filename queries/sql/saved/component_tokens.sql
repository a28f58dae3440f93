-- component_tokens: for every head and MLP of one run, the k positions where it raises the
-- entropy most and the k where it lowers it most, ranked by its entropy diff and again by its
-- marginal (ranked_by 'diff' or 'marginal'), with the
-- token, the tokens before it (context) and after it (next_token: what the distribution at
-- the token predicts), and its direct effects there (nats): what the head explorer lists
-- for a clicked component.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param k 8 [1..1000] how many positions in each direction
-- @param context 8 [0..1000] how many preceding tokens to show
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        $k::integer as k,
        $context::integer as context
),

kept as (
    select
        c.run_id, c.seq, c.position, c.layer, c.head, c.kind, c.entropy_diff,
        c.entropy_marginal, c.loss_marginal, c.kl_marginal, c.entropy_marginal_context,
        m.ranked_by,
        case when m.ranked_by = 'diff' then c.entropy_diff else c.entropy_marginal end as value
    from component_rows($positions::varchar, coalesce($run_id::varchar, latest_run())) as c
    cross join (values ('diff'), ('marginal')) as m(ranked_by)
),

ranked as (
    select
        *,
        row_number() over (partition by ranked_by, layer, kind, head
                           order by value desc nulls last, seq, position) as raise_rank,
        row_number() over (partition by ranked_by, layer, kind, head
                           order by value asc nulls last, seq, position) as lower_rank
    from kept
),

top_rows as (
    select r.*, 'raise' as direction, r.raise_rank as rank
    from ranked as r, settings as s
    where r.raise_rank <= s.k
    union all
    select r.*, 'lower' as direction, r.lower_rank as rank
    from ranked as r, settings as s
    where r.lower_rank <= s.k
),

spots as (
    select distinct run_id, seq, position from top_rows
),

contexts as (
    select
        p.seq,
        p.position,
        string_agg(tok.token, '' order by tok.position)
            filter (where tok.position < p.position) as context,
        any_value(tok.token) filter (where tok.position = p.position) as token,
        any_value(tok.token) filter (where tok.position = p.position + 1) as next_token
    from spots as p
    cross join settings as s
    join tokens as tok
        on tok.run_id = p.run_id and tok.seq = p.seq
        and tok.position between p.position - s.context and p.position + 1
    group by p.seq, p.position
),

final as (
    select
        r.run_id,
        r.layer || '.' || coalesce(r.head::varchar, 'mlp') as component,
        r.layer,
        r.head,
        r.kind,
        r.ranked_by,
        r.direction,
        r.rank,
        r.seq,
        r.position,
        coalesce(c.context, '') as context,
        c.token,
        c.next_token,
        r.entropy_diff,
        r.entropy_marginal,
        r.loss_marginal,
        r.kl_marginal,
        r.entropy_marginal_context
    from top_rows as r
    left join contexts as c using (seq, position)
)

select * from final
order by layer, kind, head, ranked_by, direction desc, rank
