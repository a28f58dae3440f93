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
    select coalesce($run_id::varchar, latest_run()) as run_id
),

final as (
    select s.run_id, c.*
    from component_calibration(coalesce($run_id::varchar, latest_run()), $positions::varchar,
                               $n_bins::integer, $top_k::integer) as c
    cross join settings as s
)

select * from final
order by run_id, layer, kind, head
