-- study_comparison: one run's per-component means beside the study's published values for
-- GPT-2 small (the table study_reference: queries/reference/study_gpt2_small/, cited in its
-- README.md), under the study's conventions: every position counted (BOS and padding
-- included), every batch weighted equally (the mean of the per-batch means), the final-scale
-- lens and the study table's ablation. Tables: 'seed', the seed notebook's mean entropy diff
-- and marginal of every head and MLP on IOI or webtext (zero ablation); 'fig13', the Copy
-- Suppression paper's Fig. 13 on webtext (mean ablation): each head's mean entropy marginal
-- and neg_relative_change = −(overconfidence ablated / the model's − 1), the study's
-- overconfidence over the top 3 probabilities in 100 bins (NULL for a run without the
-- calibration measures). One row per component and measure, joined in full: a component only
-- the run has (another shape of model) or only the study has shows with NULL on the other
-- side. difference = run_value − study_value (nats, a fraction for neg_relative_change);
-- run_rank and study_rank rank, per measure, heads among heads and MLPs among MLPs, largest
-- value first. A run whose lens, ablation or dataset (IOI or not) is not the table's is
-- refused, or with mismatch 'mark' shown with what differs in the column mismatch (NULL when
-- nothing does).
-- @param run_id NULL one run id, or NULL for the latest run under the final-scale lens (and the ablation of study_table when it is given)
-- @param study_table NULL 'seed' (zero ablation) or 'fig13' (mean ablation); NULL: the table of the run's ablation
-- @param dataset NULL the study's dataset: 'ioi' or 'webtext' ('fig13': webtext only); NULL: ioi for an IOI run, else webtext
-- @param mismatch 'refuse' 'refuse' (a run whose lens, ablation or dataset is not the table's is an error) or 'mark' (its rows are shown, the column mismatch says what differs)
with

chosen as (
    select coalesce(
        $run_id::varchar,
        (select r.run_id
         from runs as r
         where r.lens = 'final-scale'
           and ($study_table::varchar is null
                or r.ablation = (select c.ablation from study_conventions as c
                                 where c.study_table = study_table_param($study_table::varchar)))
         order by r.created_at desc, r.run_id desc
         limit 1),
        latest_run()) as run_id
),

settings as (
    select
        r.run_id,
        r.lens,
        r.ablation,
        r.dataset as run_dataset,
        c.study_table,
        c.lens as study_lens,
        c.ablation as study_ablation,
        study_dataset_param(
            coalesce($dataset::varchar,
                     case when c.study_table = 'seed' and r.dataset = 'ioi' then 'ioi'
                          else 'webtext' end),
            c.study_table) as dataset
    from runs as r
    semi join chosen as k using (run_id)
    join study_conventions as c
        on c.study_table = study_table_param(
            coalesce($study_table::varchar,
                     case when r.ablation = 'mean' then 'fig13' else 'seed' end))
),

checked as (
    select
        s.*,
        nullif(concat_ws('; ',
            case when s.lens is distinct from s.study_lens
                 then 'its lens is ' || coalesce(s.lens, 'NULL') || ', the study''s '
                      || s.study_lens end,
            case when s.ablation is distinct from s.study_ablation
                 then 'its ablation is ' || coalesce(s.ablation, 'NULL') || ', the study''s '
                      || s.study_ablation end,
            case when (s.run_dataset = 'ioi') is distinct from (s.dataset = 'ioi')
                 then 'its dataset is ' || coalesce(s.run_dataset, 'NULL') || ', the study''s '
                      || s.dataset end), '') as mismatch
    from settings as s
),

verdict as (
    select
        c.*,
        study_mismatch(mismatch_param($mismatch::varchar), c.run_id, c.study_table, c.mismatch,
                       c.study_ablation) as shown
    from checked as c
),

-- the run's means under the study's weighting: per batch, then the mean of the batches'
batch_means as (
    select
        p.layer,
        p.head,
        p.kind,
        p.batch,
        summed_mean(p.entropy_diff_sum, p.entropy_diff_n) as diff,
        summed_mean(p.entropy_marginal_sum, p.entropy_marginal_n) as marginal
    from component_batch_partials('all', (select run_id from chosen)) as p
    group by p.layer, p.head, p.kind, p.batch
),

run_means as (
    select layer, head, kind, stable_mean(diff) as diff, stable_mean(marginal) as marginal
    from batch_means
    group by layer, head, kind
),

-- the overconfidence change, read from the rows for 'fig13' only (a name of its own: the
-- macro's CTEs would shadow settings)
fig13_run as (
    select run_id from settings where study_table = 'fig13'
),

calibrated as (
    select c.layer, c.head, c.kind, -c.relative_change as neg_relative_change
    from component_calibration((select fr.run_id from fig13_run as fr), 'all', 100, 3) as c
),

measures as (
    select distinct r.measure
    from study_reference as r
    join settings as s on r.study_table = s.study_table and r.dataset = s.dataset
),

run_values as (
    select v.*
    from (
        select layer, head, kind, 'diff' as measure, diff as value from run_means
        union all
        select layer, head, kind, 'marginal', marginal from run_means
        union all
        select layer, head, kind, 'neg_relative_change', neg_relative_change from calibrated
    ) as v
    semi join measures as m using (measure)
),

study_values as (
    select r.layer, r.head, r.kind, r.measure, r.value
    from study_reference as r
    join settings as s on r.study_table = s.study_table and r.dataset = s.dataset
),

run_ranked as (
    select v.*,
           case when v.value is not null then
               row_number() over (partition by v.measure, v.kind, v.value is null
                                  order by v.value desc, v.layer, v.head) end as rank
    from run_values as v
),

study_ranked as (
    select v.*,
           case when v.value is not null then
               row_number() over (partition by v.measure, v.kind, v.value is null
                                  order by v.value desc, v.layer, v.head) end as rank
    from study_values as v
),

joined as (
    select
        coalesce(r.measure, s.measure) as measure,
        coalesce(r.kind, s.kind) as kind,
        coalesce(r.layer, s.layer) as layer,
        coalesce(r.head, s.head) as head,
        r.value as run_value,
        s.value as study_value,
        r.rank as run_rank,
        s.rank as study_rank
    from run_ranked as r
    full outer join study_ranked as s
        on r.measure = s.measure and r.kind = s.kind and r.layer = s.layer
        and r.head is not distinct from s.head
),

final as (
    select
        v.run_id,
        v.study_table,
        v.dataset as study_dataset,
        j.measure,
        j.layer,
        j.head,
        j.kind,
        case when j.kind = 'mlp' then 'MLP ' || j.layer else j.layer || '.' || j.head end
            as component,
        j.run_value,
        j.study_value,
        j.run_value - j.study_value as difference,
        j.run_rank,
        j.study_rank,
        v.mismatch
    from joined as j
    cross join verdict as v
    where v.shown
)

select * from final
order by measure, kind, layer, head
