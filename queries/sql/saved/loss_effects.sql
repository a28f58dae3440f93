-- loss_effects: per run and component (heads and MLP), the mean direct effect on the
-- next-token loss and the mean KL divergence of removing it, with 95 % confidence intervals.
-- loss_marginal = NLL_p(y) − NLL_q(y) (nats; negative: the component lowers the loss, it
-- helps predict the next token) over the n positions that have a next token; kl_marginal =
-- KL(p ‖ q) over every kept position (the KL needs no next token). NULL for a run without
-- the loss or kl measures.
-- @param run_id NULL one run id, or NULL for every run
-- @param positions 'real' which positions count: 'real' (the tokens of the text: BOS and padding excluded) or 'all' (every position, as the study averaged)
with

settings as (
    select positions_param($positions::varchar) as positions
),

kept as (
    select p.*
    from component_partials($positions::varchar, $run_id::varchar) as p
),

per_component as (
    select
        run_id, layer, head, kind,
        sum(loss_marginal_n)::bigint as n,
        summed_mean(loss_marginal_sum, loss_marginal_n) as loss_marginal,
        summed_sd(loss_marginal_sum, loss_marginal_sq, loss_marginal_n) as sd_loss,
        sum(kl_marginal_n)::bigint as n_kl,
        summed_mean(kl_marginal_sum, kl_marginal_n) as kl_marginal,
        summed_sd(kl_marginal_sum, kl_marginal_sq, kl_marginal_n) as sd_kl
    from kept
    group by run_id, layer, head, kind
),

final as (
    select
        p.run_id,
        p.layer,
        p.head,
        p.kind,
        case when p.kind = 'mlp' then 'MLP ' || p.layer else p.layer || '.' || p.head end
            as component,
        p.n,
        p.loss_marginal,
        ci95_low(p.loss_marginal, p.sd_loss, p.n) as loss_ci95_low,
        ci95_high(p.loss_marginal, p.sd_loss, p.n) as loss_ci95_high,
        p.kl_marginal,
        ci95_low(p.kl_marginal, p.sd_kl, p.n_kl) as kl_ci95_low,
        ci95_high(p.kl_marginal, p.sd_kl, p.n_kl) as kl_ci95_high
    from per_component as p
    cross join settings as s
)

select * from final
order by run_id, layer, kind, head
