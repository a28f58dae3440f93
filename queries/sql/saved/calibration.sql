-- calibration: per head and MLP of one run, the study's overconfidence of the model's
-- next-token predictions with that component's direct effect removed, beside the model's
-- own, and the relative change. Over the n_predictions positions that have a next token, each
-- of the top_k largest probabilities goes into one of n_bins equal bins of [0, 1) (bin i
-- holds i/n_bins ≤ p < (i+1)/n_bins; p = 1 falls in none); a bin's accuracy is the share
-- of its entries whose token is the next token; overconfidence = Σ f_i·x_i / Σ x_i² with
-- f_i = accuracy_i − (i+0.5)/n_bins and x_i = 0.5 − (i+0.5)/n_bins (the slope of the
-- accuracy gap against 0.5 − p); relative_change = overconfidence /
-- baseline_overconfidence − 1. A bin empty for the model or for the ablated model is left
-- out of every sum of that component's row and counted in empty_bins, so that the two
-- overconfidences compare the same bins (the study's result is NaN when any bin is empty,
-- the same otherwise). NULL for a run without the calibration measures.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param n_bins 50 [1..10000] how many equal probability bins on [0, 1)
-- @param top_k 3 [1..3] how many of the largest probabilities of each prediction to bin
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        n_bins_param($n_bins::integer) as n_bins,
        top_k_param($top_k::integer) as top_k
),

ranks as (
    select k.k from settings as s, range(1, 4) as k(k) where k.k <= s.top_k
),

predicted as (
    select * from predicted_positions(coalesce($run_id::varchar, latest_run()),
                                        $positions::varchar)
),

components as (
    select c.layer, c.head, c.kind,
           count(c.ablated_top1_prob) as n_predictions
    from component_effects as c
    semi join predicted as p using (run_id, seq, position)
    group by c.layer, c.head, c.kind
),

model_entries as (
    select
        kth_prob(r.k, p.top1_prob, p.top2_prob, p.top3_prob) as prob,
        p.target_rank is not distinct from r.k as hit
    from predicted as p, ranks as r
    where p.top1_prob is not null
),

ablated_entries as (
    select
        c.layer, c.head, c.kind,
        kth_prob(r.k, c.ablated_top1_prob, c.ablated_top2_prob, c.ablated_top3_prob) as prob,
        c.ablated_target_rank is not distinct from r.k as hit
    from component_effects as c
    semi join predicted as p using (run_id, seq, position)
    cross join ranks as r
    where c.ablated_top1_prob is not null
),

model_binned as (
    select e.hit, probability_bin(e.prob, s.n_bins) as bin
    from model_entries as e, settings as s
),

ablated_binned as (
    select e.layer, e.head, e.kind, e.hit, probability_bin(e.prob, s.n_bins) as bin
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

-- f_i·x_i of the ablated model and of the model, and x_i², of each bin that both fill
common_terms as (
    select
        a.layer, a.head, a.kind, a.bin,
        overconfidence_fx(a.hits, a.n, a.bin, s.n_bins) as fx,
        overconfidence_fx(m.hits, m.n, m.bin, s.n_bins) as baseline_fx,
        overconfidence_xx(a.bin, s.n_bins) as xx
    from ablated_bins as a
    join model_bins as m using (bin)
    cross join settings as s
),

-- each sum in bin order (the same bits every time)
per_component as (
    select
        layer, head, kind,
        count(*) as common_bins,
        list_sum(list(fx order by bin)) / list_sum(list(xx order by bin)) as overconfidence,
        list_sum(list(baseline_fx order by bin)) / list_sum(list(xx order by bin))
            as baseline_overconfidence
    from common_terms
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
        s.n_bins - coalesce(p.common_bins, 0) as empty_bins,
        p.overconfidence,
        p.baseline_overconfidence,
        p.overconfidence / p.baseline_overconfidence - 1 as relative_change
    from components as c
    cross join settings as s
    left join per_component as p
        on p.layer = c.layer and p.kind = c.kind and p.head is not distinct from c.head
)

select * from final
order by run_id, layer, kind, head
