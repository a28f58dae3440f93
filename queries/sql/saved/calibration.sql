-- calibration: per head and MLP of one run, the study's overconfidence of the model's
-- next-token predictions with that component's direct effect removed, beside the model's
-- own, and the relative change. Over the n_predictions positions that have a next token, each
-- of the top_k largest probabilities goes into one of n_bins equal bins of [0, 1) (bin i
-- holds i/n_bins ≤ p < (i+1)/n_bins; p = 1 falls in none); a bin's accuracy is the share
-- of its entries whose token is the next token; overconfidence = Σ f_i·x_i / Σ x_i² with
-- f_i = accuracy_i − (i+0.5)/n_bins and x_i = 0.5 − (i+0.5)/n_bins (the slope of the
-- accuracy gap against 0.5 − p); relative_change = overconfidence /
-- baseline_overconfidence − 1. Empty bins are left out of both sums and counted in
-- empty_bins (the study's result is NaN when any bin is empty, the same otherwise). NULL for
-- a run without the calibration measures.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param n_bins 50 how many equal probability bins on [0, 1)
-- @param top_k 3 how many of the largest probabilities of each prediction to bin (1 to 3)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        case when $n_bins::integer >= 1 then $n_bins::integer
             else error('n_bins must be at least 1') end as n_bins,
        case when $top_k::integer between 1 and 3 then $top_k::integer
             else error('top_k must be 1, 2 or 3') end as top_k
),

ranks as (
    select k.k from settings as s, range(1, 4) as k(k) where k.k <= s.top_k
),

-- the positions with a next token (the study's [:, :-1], less positions before padding)
predicted as (
    select t.run_id, t.seq, t.position, t.top1_prob, t.top2_prob, t.top3_prob, t.target_rank
    from tokens as t, settings as s
    where t.run_id = s.run_id and t.next_token_id is not null
),

components as (
    select c.layer, c.head, c.kind,
           count(c.ablated_top1_prob) as n_predictions
    from component_entropy as c
    semi join predicted as p using (run_id, seq, position)
    group by c.layer, c.head, c.kind
),

model_entries as (
    select
        case r.k when 1 then p.top1_prob when 2 then p.top2_prob else p.top3_prob end::double
            as prob,
        p.target_rank is not distinct from r.k as hit
    from predicted as p, ranks as r
    where p.top1_prob is not null
),

ablated_entries as (
    select
        c.layer, c.head, c.kind,
        case r.k when 1 then c.ablated_top1_prob when 2 then c.ablated_top2_prob
                 else c.ablated_top3_prob end::double as prob,
        c.ablated_target_rank is not distinct from r.k as hit
    from component_entropy as c
    semi join predicted as p using (run_id, seq, position)
    cross join ranks as r
    where c.ablated_top1_prob is not null
),

-- bin i holds i/n ≤ p < (i+1)/n, compared in double (floor(p·n) corrected where the
-- product rounds across a bin edge)
model_binned as (
    select e.hit,
           case when e.prob < floor(e.prob * s.n_bins) / s.n_bins
                    then floor(e.prob * s.n_bins) - 1
                when e.prob >= (floor(e.prob * s.n_bins) + 1) / s.n_bins
                    then floor(e.prob * s.n_bins) + 1
                else floor(e.prob * s.n_bins) end::bigint as bin
    from model_entries as e, settings as s
),

ablated_binned as (
    select e.layer, e.head, e.kind, e.hit,
           case when e.prob < floor(e.prob * s.n_bins) / s.n_bins
                    then floor(e.prob * s.n_bins) - 1
                when e.prob >= (floor(e.prob * s.n_bins) + 1) / s.n_bins
                    then floor(e.prob * s.n_bins) + 1
                else floor(e.prob * s.n_bins) end::bigint as bin
    from ablated_entries as e, settings as s
),

model_bins as (
    select b.bin, count(*) as n, count(*) filter (where b.hit) as hits
    from model_binned as b, settings as s
    where b.bin >= 0 and b.bin < s.n_bins
    group by b.bin
),

ablated_bins as (
    select b.layer, b.head, b.kind, b.bin, count(*) as n,
           count(*) filter (where b.hit) as hits
    from ablated_binned as b, settings as s
    where b.bin >= 0 and b.bin < s.n_bins
    group by b.layer, b.head, b.kind, b.bin
),

-- f_i·x_i and x_i² of each non-empty bin, summed in bin order (the same bits every time)
model_terms as (
    select
        m.bin,
        (m.hits / m.n - (m.bin + 0.5) / s.n_bins) * (0.5 - (m.bin + 0.5) / s.n_bins) as fx,
        (0.5 - (m.bin + 0.5) / s.n_bins) ** 2 as xx
    from model_bins as m, settings as s
),

baseline as (
    select
        list_sum(list(fx order by bin)) / list_sum(list(xx order by bin))
            as baseline_overconfidence
    from model_terms
),

ablated_terms as (
    select
        a.layer, a.head, a.kind, a.bin,
        (a.hits / a.n - (a.bin + 0.5) / s.n_bins) * (0.5 - (a.bin + 0.5) / s.n_bins) as fx,
        (0.5 - (a.bin + 0.5) / s.n_bins) ** 2 as xx
    from ablated_bins as a, settings as s
),

per_component as (
    select
        layer, head, kind,
        count(*) as filled_bins,
        list_sum(list(fx order by bin)) / list_sum(list(xx order by bin)) as overconfidence
    from ablated_terms
    group by layer, head, kind
),

final as (
    select
        s.run_id,
        c.layer,
        c.head,
        c.kind,
        case when c.kind = 'mlp' then 'MLP ' || c.layer else c.layer || '.' || c.head end
            as component,
        c.n_predictions,
        s.n_bins - coalesce(p.filled_bins, 0) as empty_bins,
        p.overconfidence,
        b.baseline_overconfidence,
        p.overconfidence / b.baseline_overconfidence - 1 as relative_change
    from components as c
    cross join settings as s
    cross join baseline as b
    left join per_component as p
        on p.layer = c.layer and p.kind = c.kind and p.head is not distinct from c.head
)

select * from final
order by run_id, layer, kind, head
