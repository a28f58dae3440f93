-- calibration_curve: accuracy per probability bin (a reliability diagram) of one run, for
-- the model and with one component's direct effect removed. Curve 'model' or 'ablated L.H'
-- / 'ablated MLP L'; for every one of n_bins equal bins of [0, 1) (bin i holds
-- i/n_bins ≤ p < (i+1)/n_bins): its midpoint p_mid = (i+0.5)/n_bins, the number n of the
-- top_k probabilities of the predictions with a next token that fall in it, and its
-- accuracy (the share of them whose token is the next token; NULL for an empty bin), as the
-- calibration query bins them.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param component NULL 'L.H' for head H of layer L, 'L.mlp' for the MLP of layer L, or NULL for the head with the largest mean entropy marginal in the run
-- @param n_bins 50 [1..10000] how many equal probability bins on [0, 1)
-- @param top_k 3 [1..3] how many of the largest probabilities of each prediction to bin
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        $component::varchar as component,
        n_bins_param($n_bins::integer) as n_bins,
        top_k_param($top_k::integer) as top_k
),

top_head as (
    select p.layer || '.' || p.head as component
    from component_sums as p, settings as s
    where p.run_id = s.run_id and p.kind = 'head'
    group by p.layer, p.head
    order by summed_mean(p.entropy_marginal_sum, p.entropy_marginal_n) desc, p.layer, p.head
    limit 1
),

target as (
    select
        s.*,
        chosen_component(s.component, (select component from top_head), s.run_id)
            as chosen
    from settings as s
),

parsed as (
    select
        t.*,
        component_layer(component_param(t.chosen)) as layer,
        component_kind(t.chosen) as kind,
        component_head(t.chosen) as head
    from target as t
),

checked as (
    select
        p.*,
        case when p.kind = 'mlp' then 'ablated MLP ' || p.layer
             else 'ablated ' || p.layer || '.' || p.head end as curve
    from parsed as p
),

ranks as (
    select k.k from settings as s, range(1, 4) as k(k) where k.k <= s.top_k
),

predicted as (
    select * from predicted_positions(coalesce($run_id::varchar, latest_run()),
                                        $positions::varchar)
),

entries as (
    select
        'model' as curve,
        kth_prob(r.k, p.top1_prob, p.top2_prob, p.top3_prob) as prob,
        p.target_rank is not distinct from r.k as hit
    from predicted as p, ranks as r
    where p.top1_prob is not null
    union all
    select
        s.curve,
        kth_prob(r.k, c.ablated_top1_prob, c.ablated_top2_prob, c.ablated_top3_prob),
        c.ablated_target_rank is not distinct from r.k
    from component_effects as c
    join checked as s
        on c.run_id = s.run_id and c.layer = s.layer and c.kind = s.kind
        and c.head is not distinct from s.head
    semi join predicted as p
        on p.run_id = c.run_id and p.seq = c.seq and p.position = c.position
    cross join ranks as r
    where c.ablated_top1_prob is not null
),

binned as (
    select e.curve, e.hit, probability_bin(e.prob, s.n_bins) as bin
    from entries as e, settings as s
),

counted as (
    select b.curve, b.bin, count(*) as n, count(*) filter (where b.hit) as hits
    from binned as b, settings as s
    where b.bin >= 0 and b.bin < s.n_bins
    group by b.curve, b.bin
),

grid as (
    select c.curve, b.bin
    from (select 'model' as curve union all select curve from checked) as c,
         settings as s,
         range(0, s.n_bins) as b(bin)
),

final as (
    select
        s.run_id,
        g.curve,
        g.bin,
        (g.bin + 0.5) / s.n_bins as p_mid,
        coalesce(c.n, 0) as n,
        c.hits / c.n as accuracy
    from grid as g
    cross join settings as s
    left join counted as c on c.curve = g.curve and c.bin = g.bin
)

select * from final
order by curve = 'model' desc, bin
