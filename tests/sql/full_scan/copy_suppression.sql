-- copy_suppression: per head and MLP of one run, how much of its entropy marginal and of
-- its KL divergence flows through the tokens already in the context, and how much through
-- those whose logit the component lowers (copy suppression proper), with 95 % confidence
-- intervals. Columns: n; the mean entropy_marginal, entropy_marginal_context and
-- entropy_marginal_suppression (nats); entropy_context_share = mean in-context part / mean
-- marginal and entropy_suppression_share = mean suppression part / mean marginal; the mean
-- kl_marginal, kl_context_kept and kl_suppression_kept; context_share = 1 − mean
-- kl_context_kept / mean kl_marginal (what the in-context tokens, either way, account for)
-- and suppression_share = 1 − mean kl_suppression_kept / mean kl_marginal (what lowering
-- in-context tokens alone accounts for: near 1 for a copy-suppression head, near 0 for a
-- copying head or one acting on absent tokens); for heads, the study's CSPA: the mean
-- kl_mean_ablated and kl_cspa and cspa_share = 1 − mean kl_cspa / mean kl_mean_ablated (the
-- Copy Suppression paper's "performance recovered", 76.9 % for GPT-2 small's 10.7; NULL for
-- MLPs and for runs without the cspa group); each share with its 95 % interval, Fieller's
-- for a ratio of sums with sequences as clusters (share_interval in views.sql):
-- <share>_ci95_low/high, both NULL and <share>_ci_unbounded true where the denominator
-- does not differ significantly from 0 (the set of ratios the data allow is then
-- unbounded); rank orders heads among heads and MLPs among MLPs by mean entropy_marginal,
-- largest first. The context and suppression columns are NULL for a run without those
-- measure groups.
-- @param run_id NULL one run id, or NULL for the latest run
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select
        coalesce($run_id::varchar, latest_run()) as run_id,
        positions_param($positions::varchar) as positions
),

kept as (
    select c.*
    from component_rows($positions::varchar,
                        coalesce($run_id::varchar, latest_run())) as c
),

per_component as (
    select
        run_id, layer, head, kind,
        count(*) as n,
        stable_mean(entropy_marginal) as entropy_marginal,
        stable_mean(entropy_marginal_context) as entropy_marginal_context,
        stable_mean(entropy_marginal_suppression) as entropy_marginal_suppression,
        stable_mean(kl_marginal) as kl_marginal,
        stable_mean(kl_context_kept) as kl_context_kept,
        stable_mean(kl_suppression_kept) as kl_suppression_kept,
        stable_mean(kl_mean_ablated) as kl_mean_ablated,
        stable_mean(kl_cspa) as kl_cspa
    from kept
    group by run_id, layer, head, kind
),

-- each sequence's totals (Σ fine_point, over the positions kept where both measures of a
-- share are present): the clusters of the shares' intervals
per_sequence as (
    select
        run_id, layer, head, kind, seq,
        sum(fine_point(case when entropy_marginal is not null
                            then entropy_marginal_context end)) as context_x,
        sum(fine_point(case when entropy_marginal_context is not null
                            then entropy_marginal end)) as context_y,
        sum(fine_point(case when entropy_marginal is not null
                            then entropy_marginal_suppression end)) as suppression_x,
        sum(fine_point(case when entropy_marginal_suppression is not null
                            then entropy_marginal end)) as suppression_y,
        sum(fine_point(case when kl_marginal is not null then kl_context_kept end))
            as kept_x,
        sum(fine_point(case when kl_context_kept is not null then kl_marginal end))
            as kept_y,
        sum(fine_point(case when kl_marginal is not null then kl_suppression_kept end))
            as suppression_kept_x,
        sum(fine_point(case when kl_suppression_kept is not null then kl_marginal end))
            as suppression_kept_y,
        sum(fine_point(case when kl_mean_ablated is not null then kl_cspa end)) as cspa_x,
        sum(fine_point(case when kl_cspa is not null then kl_mean_ablated end)) as cspa_y
    from kept
    group by run_id, layer, head, kind, seq
),

intervals as (
    select
        run_id, layer, head, kind,
        share_interval(context_x, context_y, false) as entropy_context_ci,
        share_interval(suppression_x, suppression_y, false) as entropy_suppression_ci,
        share_interval(kept_x, kept_y, true) as context_ci,
        share_interval(suppression_kept_x, suppression_kept_y, true) as suppression_ci,
        share_interval(cspa_x, cspa_y, true) as cspa_ci
    from per_sequence
    group by run_id, layer, head, kind
),

shares as (
    select
        p.*,
        p.entropy_marginal_context / p.entropy_marginal as entropy_context_share,
        p.entropy_marginal_suppression / p.entropy_marginal as entropy_suppression_share,
        1 - p.kl_context_kept / p.kl_marginal as context_share,
        1 - p.kl_suppression_kept / p.kl_marginal as suppression_share,
        1 - p.kl_cspa / p.kl_mean_ablated as cspa_share,
        i.entropy_context_ci, i.entropy_suppression_ci, i.context_ci, i.suppression_ci,
        i.cspa_ci
    from per_component as p
    left join intervals as i
        on i.run_id = p.run_id and i.layer = p.layer and i.kind = p.kind
       and i.head is not distinct from p.head  -- NULL for the MLP
),

ranked as (
    select
        s.*,
        row_number() over (partition by s.run_id, s.kind
                           order by s.entropy_marginal desc, s.layer, s.head) as rank
    from shares as s
),

final as (
    select
        r.run_id,
        r.rank,
        r.layer,
        r.head,
        r.kind,
        case when r.kind = 'mlp' then 'MLP ' || r.layer else r.layer || '.' || r.head end
            as component,
        r.n,
        r.entropy_marginal,
        r.entropy_marginal_context,
        r.entropy_context_share,
        r.entropy_context_ci.low as entropy_context_share_ci95_low,
        r.entropy_context_ci.high as entropy_context_share_ci95_high,
        r.entropy_context_ci.unbounded as entropy_context_share_ci_unbounded,
        r.entropy_marginal_suppression,
        r.entropy_suppression_share,
        r.entropy_suppression_ci.low as entropy_suppression_share_ci95_low,
        r.entropy_suppression_ci.high as entropy_suppression_share_ci95_high,
        r.entropy_suppression_ci.unbounded as entropy_suppression_share_ci_unbounded,
        r.kl_marginal,
        r.kl_context_kept,
        r.context_share,
        r.context_ci.low as context_share_ci95_low,
        r.context_ci.high as context_share_ci95_high,
        r.context_ci.unbounded as context_share_ci_unbounded,
        r.kl_suppression_kept,
        r.suppression_share,
        r.suppression_ci.low as suppression_share_ci95_low,
        r.suppression_ci.high as suppression_share_ci95_high,
        r.suppression_ci.unbounded as suppression_share_ci_unbounded,
        r.kl_mean_ablated,
        r.kl_cspa,
        r.cspa_share,
        r.cspa_ci.low as cspa_share_ci95_low,
        r.cspa_ci.high as cspa_share_ci95_high,
        r.cspa_ci.unbounded as cspa_share_ci_unbounded
    from ranked as r
    cross join settings as s
    where r.run_id = s.run_id
)

select * from final
order by run_id, kind, rank
