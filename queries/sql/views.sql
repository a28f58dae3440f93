-- Views over the entropy warehouse's Parquet files and run manifests.
--
-- Only complete runs are visible (a run is complete once runs/run_id=<id>/manifest.json
-- exists), and of those only the files their manifests list: a run being written, files of
-- another generation and stray files never show. The views read the files named in the
-- DuckDB variables manifest_files and <table>_files. `python -m queries` sets them to the
-- runs whose files pass a check; without them this script derives them from the manifests
-- under the variable `warehouse` (default 'data/warehouse', relative to the current
-- folder), once, when it runs. From any folder:
--     python -m queries --warehouse /path/to/warehouse shell
-- or, from the DuckDB shell itself, with absolute paths:
--     duckdb -cmd "set variable warehouse = '/path/to/warehouse'" \
--            -cmd ".read /path/to/entropy-warehouse/queries/sql/views.sql"
-- (in the repository root, `duckdb -init queries/sql/views.sql` opens data/warehouse).
-- `.read` this file again to see runs completed since.
--
-- Views:
--   runs(run_id, created_at, model, dataset, variant, lens, ablation, n_layers, n_heads,
--        normalization, parallel_blocks, n_kv_heads, n_seqs, seq_len, n_tokens, ...)
--                                           one row per complete run (its manifest)
--   tokens(run_id, seq, position, token_id, token, is_bos, is_pad, role, variant, example,
--        next_token_id, top1_prob, top2_prob, top3_prob, target_rank, final_scale,
--        resid_norm)
--                                           next_token_id NULL at the last position and
--                                           on or before padding; the model's top-3
--                                           next-token probabilities and the next token's
--                                           rank among them (NULL: not among them); the
--                                           final normalisation's scale and the final
--                                           residual's L2 norm
--   component_effects(run_id, seq, position, layer, head, kind, entropy_diff,
--        entropy_marginal, loss_marginal, kl_marginal, entropy_marginal_context,
--        kl_context_kept, entropy_marginal_suppression, kl_suppression_kept, kl_cspa,
--        kl_mean_ablated, suppressed_token_id, suppressed_logit, ablated_top1_prob,
--        ablated_top2_prob, ablated_top3_prob, ablated_target_rank, bos_attention)
--                                           kind 'head' or 'mlp'; head is NULL for the MLP;
--                                           the columns after entropy_marginal are NULL
--                                           for measures the run did not take
--                                           (runs.measures); also readable as
--                                           component_entropy, its earlier name
--   resid_entropy(run_id, seq, position, layer, point, entropy)
--                                           point 'resid_pre', 'resid_mid' or 'final';
--                                           layer is NULL for 'final'; no 'resid_mid'
--                                           rows where runs.parallel_blocks
--   component_sums(run_id, layer, head, kind, class, role, variant, n, m_n, m_pos, m_sum,
--        m_sq, ...), component_batch_sums(run_id, batch, layer, head, kind, class, n, ...),
--        component_seq_sums(run_id, seq, layer, head, kind, class, n, <pair>_x, <pair>_y, ...),
--        resid_sums(run_id, layer, point, class, role, variant, n, entropy_n, entropy_sum,
--        entropy_sq)
--                                           each run's partial sums, written when it was
--                                           published: what the summaries add up (below)
-- Entropies are in nats; positive diffs and marginals increase entropy.

set variable warehouse = coalesce(getvariable('warehouse'), 'data/warehouse');

-- The files to read, unless already set: every manifest that lists its shards and partial
-- sums (a manifest written by an earlier version lists none until `python -m queries
-- migrate` rewrites it), and the files each lists.

set variable manifest_files = coalesce(
    getvariable('manifest_files'),
    (select coalesce(list(filename order by filename), []::varchar[])
     from read_text(getvariable('warehouse') || '/runs/*/manifest.json')
     where json_extract(content, '$.shards.component_sums') is not null
       and json_extract(content, '$.shards.component_batch_sums') is not null
       and json_extract(content, '$.shards.component_seq_sums') is not null
       and json_extract(content, '$.shards.resid_sums') is not null)
);

-- manifest_shards(tbl): the files of table tbl that the manifests in manifest_files list
-- (their `shards` entries).
create or replace macro manifest_shards(tbl) as table
    with manifests as (
        select regexp_extract(filename, '([^/]+)/manifest\.json$', 1) as folder,
               json_extract(content, '$.shards') as shards
        from read_text(getvariable('manifest_files'))
    ),
    listed as (
        select folder, unnest(json_extract_string(shards, '$.' || tbl || '[*].file')) as name
        from manifests
    ),
    final as (
        select getvariable('warehouse') || '/' || tbl || '/' || folder || '/' || name as file
        from listed
        where name not like '%/%' and name not in ('', '.', '..')
    )
    select * from final;

set variable component_effects_files = coalesce(
    getvariable('component_effects_files'),
    (select coalesce(list(file order by file), []::varchar[])
     from manifest_shards('component_effects'))
);
set variable resid_entropy_files = coalesce(
    getvariable('resid_entropy_files'),
    (select coalesce(list(file order by file), []::varchar[])
     from manifest_shards('resid_entropy'))
);
set variable tokens_files = coalesce(
    getvariable('tokens_files'),
    (select coalesce(list(file order by file), []::varchar[]) from manifest_shards('tokens'))
);
set variable component_sums_files = coalesce(
    getvariable('component_sums_files'),
    (select coalesce(list(file order by file), []::varchar[])
     from manifest_shards('component_sums'))
);
set variable component_batch_sums_files = coalesce(
    getvariable('component_batch_sums_files'),
    (select coalesce(list(file order by file), []::varchar[])
     from manifest_shards('component_batch_sums'))
);
set variable component_seq_sums_files = coalesce(
    getvariable('component_seq_sums_files'),
    (select coalesce(list(file order by file), []::varchar[])
     from manifest_shards('component_seq_sums'))
);
set variable resid_sums_files = coalesce(
    getvariable('resid_sums_files'),
    (select coalesce(list(file order by file), []::varchar[]) from manifest_shards('resid_sums'))
);

-- shard_rows(files): the rows of Parquet files, run_id from their run_id=<id> folder.
create or replace macro shard_rows(files) as table
    from read_parquet(files, hive_partitioning = true, hive_types_autocast = false,
                      union_by_name = true);

-- The empty tables a view shows when it has no file (read_parquet needs at least one).
create or replace macro no_runs() as table
    select null::varchar as run_id, null::varchar as created_at, null::varchar as model,
           null::varchar as dataset, null::varchar as lens, null::varchar as ablation,
           null::varchar[] as measures,
           null::bigint as n_layers, null::bigint as n_heads, null::bigint as n_seqs,
           null::bigint as seq_len, null::bigint as n_tokens, null::bigint as d_vocab,
           null::bigint as n_component_rows, null::bigint as n_resid_rows,
           null::bigint as n_token_rows, null::varchar as device, null::varchar as dtype,
           null::double as seconds, null::double as tokens_per_s,
           null::varchar as completed_at, null::varchar as dataset_fingerprint,
           null::varchar as git_commit, null::json as config, null::json as model_identity,
           null::json as dataset_source, null::json as packages, null::json as timing
    where false;

create or replace macro no_tokens() as table
    select null::varchar as run_id, null::integer as seq, null::integer as position,
           null::integer as token_id, null::varchar as token, null::boolean as is_bos,
           null::boolean as is_pad, null::varchar as role, null::varchar as variant,
           null::integer as example, null::integer as next_token_id, null::float as top1_prob,
           null::float as top2_prob, null::float as top3_prob, null::tinyint as target_rank,
           null::float as final_scale, null::float as resid_norm
    where false;

create or replace macro no_component_rows() as table
    select null::varchar as run_id, null::integer as seq, null::integer as position,
           null::smallint as layer, null::smallint as head, null::varchar as kind,
           null::float as entropy_diff, null::float as entropy_marginal,
           null::float as loss_marginal, null::float as kl_marginal,
           null::float as entropy_marginal_context, null::float as kl_context_kept,
           null::float as entropy_marginal_suppression, null::float as kl_suppression_kept,
           null::float as kl_cspa, null::float as kl_mean_ablated,
           null::integer as suppressed_token_id, null::float as suppressed_logit,
           null::float as ablated_top1_prob, null::float as ablated_top2_prob,
           null::float as ablated_top3_prob, null::tinyint as ablated_target_rank,
           null::float as bos_attention
    where false;

create or replace macro no_resid_rows() as table
    select null::varchar as run_id, null::integer as seq, null::integer as position,
           null::smallint as layer, null::varchar as point, null::float as entropy
    where false;

create or replace view runs as
select
    run_id,
    created_at::timestamptz as created_at,
    model,
    dataset,
    -- the IOI prompt set: 'clean', 'abc' (corrupted) or 'both'; NULL for other datasets
    case when dataset = 'ioi'
         then coalesce(json_extract_string(to_json(config), '$.ioi_variant'), 'clean') end
        as variant,
    lens,
    ablation,
    measures::varchar[] as measures,
    n_layers,
    n_heads,
    -- architecture facts (NULL for runs recorded before they were; parallel blocks could
    -- not be measured then): 'LayerNorm' or 'RMSNorm'; parallel attention+MLP blocks have
    -- no resid_mid rows; n_kv_heads < n_heads under grouped-query attention
    json_extract_string(to_json(model_identity), '$.normalization') as normalization,
    coalesce(json_extract(to_json(model_identity), '$.parallel_blocks')::boolean, false)
        as parallel_blocks,
    json_extract(to_json(model_identity), '$.n_kv_heads')::bigint as n_kv_heads,
    n_seqs,
    seq_len,
    n_tokens,
    d_vocab,
    n_component_rows,
    n_resid_rows,
    n_token_rows,
    device,
    dtype,
    seconds,
    tokens_per_s::double as tokens_per_s,
    completed_at::timestamptz as completed_at,
    dataset_fingerprint,
    git_commit,
    config,
    model_identity,
    dataset_source,
    packages,
    timing
from query(case when len(getvariable('manifest_files')) > 0
                then 'from read_json(getvariable(''manifest_files''), union_by_name = true)'
                else 'from no_runs()' end);

-- Shards written before a column existed read it as NULL: each table's rows are unioned by
-- name with its empty table (no_tokens(), no_component_rows()), which has every column.
create or replace view tokens as
select run_id, seq, position, token_id, token, is_bos, is_pad, role, variant, example,
       next_token_id, top1_prob, top2_prob, top3_prob, target_rank, final_scale, resid_norm
from query(case when len(getvariable('tokens_files')) > 0
                then 'from shard_rows(getvariable(''tokens_files''))
                      union all by name from no_tokens()'
                else 'from no_tokens()' end);

create or replace view component_effects as
select run_id, seq, position, layer, head, kind, entropy_diff, entropy_marginal,
       loss_marginal, kl_marginal, entropy_marginal_context, kl_context_kept,
       entropy_marginal_suppression, kl_suppression_kept, kl_cspa, kl_mean_ablated,
       suppressed_token_id, suppressed_logit, ablated_top1_prob, ablated_top2_prob,
       ablated_top3_prob, ablated_target_rank, bos_attention
from query(case when len(getvariable('component_effects_files')) > 0
                then 'from shard_rows(getvariable(''component_effects_files''))
                      union all by name from no_component_rows()'
                else 'from no_component_rows()' end);

-- component_entropy: the name this table had while it held the entropies alone; the same
-- rows, so that queries written then still run.
create or replace view component_entropy as from component_effects;

create or replace view resid_entropy as
select run_id, seq, position, layer, point, entropy
from query(case when len(getvariable('resid_entropy_files')) > 0
                then 'from shard_rows(getvariable(''resid_entropy_files''))'
                else 'from no_resid_rows()' end);

-- The runs' partial sums (etl/warehouse/sums.py), written when each run was published: one
-- row per (run_id, layer, head, kind, class, role, variant) of component_effects and per
-- (run_id, layer, point, class, role, variant) of resid_entropy, where class is 'bos', 'pad'
-- or 'real'; component_batch_sums has the entropy diffs' and marginals' sums per (run_id,
-- batch, layer, head, kind, class), batch = seq // the run's batch size; component_seq_sums
-- the copy-suppression pairs' sums per (run_id, seq, layer, head, kind, class), the
-- sequences' totals that the shares' intervals take (share_interval). Per measure m: m_n
-- (count), m_pos (count of m > 0), m_sum and m_sq (Σ fixed_point(m), Σ fixed_point(m²)),
-- and, per sequence, the finer totals of the copy-suppression pairs. The summaries add
-- them up with the summed_* macros below, to the bytes a scan of the rows gives. (Without
-- any run, the views have the key columns only.)
create or replace view component_sums as
from query(case when len(getvariable('component_sums_files')) > 0
                then 'from shard_rows(getvariable(''component_sums_files''))'
                else 'select null::varchar as run_id, null::smallint as layer,
                             null::smallint as head, null::varchar as kind,
                             null::varchar as class, null::varchar as role,
                             null::varchar as variant, null::bigint as n where false' end);

create or replace view component_batch_sums as
from query(case when len(getvariable('component_batch_sums_files')) > 0
                then 'from shard_rows(getvariable(''component_batch_sums_files''))'
                else 'select null::varchar as run_id, null::integer as batch,
                             null::smallint as layer, null::smallint as head,
                             null::varchar as kind, null::varchar as class,
                             null::bigint as n where false' end);

create or replace view component_seq_sums as
from query(case when len(getvariable('component_seq_sums_files')) > 0
                then 'from shard_rows(getvariable(''component_seq_sums_files''))'
                else 'select null::varchar as run_id, null::integer as seq,
                             null::smallint as layer, null::smallint as head,
                             null::varchar as kind, null::varchar as class,
                             null::bigint as n where false' end);

create or replace view resid_sums as
from query(case when len(getvariable('resid_sums_files')) > 0
                then 'from shard_rows(getvariable(''resid_sums_files''))'
                else 'select null::varchar as run_id, null::smallint as layer,
                             null::varchar as point, null::varchar as class,
                             null::varchar as role, null::varchar as variant,
                             null::bigint as n where false' end);

-- The study's published values for GPT-2 small (queries/reference/study_gpt2_small/, whose
-- README.md cites their sources), read when this script runs from the folder in the variable
-- study_reference_dir (default 'queries/reference/study_gpt2_small', relative to the current
-- folder; `python -m queries` sets it to the installed package's copy) into tables, since a
-- locked session reads nothing outside the warehouse. Without the files the tables are empty.
--   study_reference(study_table, dataset, measure, layer, head, kind, value)
--       'seed': the seed notebook's per-component means (zero ablation; dataset 'ioi' or
--       'webtext'; measure 'diff' or 'marginal'; heads and MLPs, head NULL for the MLP);
--       'fig13': the Copy Suppression paper's Fig. 13 (mean ablation; dataset 'webtext';
--       measure 'marginal' or 'neg_relative_change', −(overconfidence ablated / the
--       model's − 1); heads)
--   study_resid_reference(dataset, step, layer, value)
--       the seed notebook's per-layer entropy change of the attention step (mid − pre) and
--       the MLP step (next pre − mid), step 'attention' or 'mlp'
--   study_conventions(study_table, lens, ablation)
--       the lens and ablation each table's values were measured under

set variable study_reference_dir = coalesce(getvariable('study_reference_dir'),
                                            'queries/reference/study_gpt2_small');

set variable study_reference_found = (
    select count(*) = 3
    from glob(getvariable('study_reference_dir') || '/*.csv')
    where parse_filename(file) in ('seed_head_entropy.csv', 'seed_resid_line.csv',
                                   'calibration_fig13.csv')
);

-- study_csv(dir, name, types): the CSV file name of the folder dir, its columns of the given
-- types; study_reference_rows(dir) and study_resid_rows(dir): the tables' rows from the
-- reference's files in dir.
create or replace macro study_csv(dir, name, types) as table
    from read_csv(dir || '/' || name, header = true, columns = types);

create or replace macro study_reference_rows(dir) as table
    select 'seed' as study_table, dataset, measure, layer::smallint as layer,
           try_cast(nullif(head, 'MLP') as smallint) as head,
           case when head = 'MLP' then 'mlp' else 'head' end as kind, value_nats as value
    from study_csv(dir, 'seed_head_entropy.csv',
                   {'dataset': 'VARCHAR', 'measure': 'VARCHAR', 'layer': 'INTEGER',
                    'head': 'VARCHAR', 'value_nats': 'DOUBLE'})
    union all
    select 'fig13', 'webtext',
           case measure
               when 'marginal_entropy_mean_ablation_nats' then 'marginal'
               when 'neg_relative_change_overconfidence_on_direct_effect_mean_ablation'
                   then 'neg_relative_change'
               else error('calibration_fig13.csv: unknown measure ' || measure) end,
           layer::smallint, head::smallint, 'head', value
    from study_csv(dir, 'calibration_fig13.csv',
                   {'measure': 'VARCHAR', 'layer': 'INTEGER', 'head': 'INTEGER',
                    'value': 'DOUBLE'});

create or replace macro study_resid_rows(dir) as table
    select case when dataset like 'webtext%' then 'webtext' else dataset end as dataset,
           case when component = 'Attention' then 'attention' else 'mlp' end as step,
           layer::smallint as layer, entropy_diff_nats as value
    from study_csv(dir, 'seed_resid_line.csv',
                   {'dataset': 'VARCHAR', 'component': 'VARCHAR', 'layer': 'INTEGER',
                    'entropy_diff_nats': 'DOUBLE'});

create or replace table study_reference as
from query(case when getvariable('study_reference_found')
                then 'from study_reference_rows(getvariable(''study_reference_dir''))'
                else 'select null::varchar as study_table, null::varchar as dataset,
                             null::varchar as measure, null::smallint as layer,
                             null::smallint as head, null::varchar as kind,
                             null::double as value where false' end);

create or replace table study_resid_reference as
from query(case when getvariable('study_reference_found')
                then 'from study_resid_rows(getvariable(''study_reference_dir''))'
                else 'select null::varchar as dataset, null::varchar as step,
                             null::smallint as layer, null::double as value where false' end);

create or replace table study_conventions as
select * from (values ('seed', 'final-scale', 'zero'), ('fig13', 'final-scale', 'mean'))
    as t(study_table, lens, ablation);

-- Macros shared by the saved queries.

-- positions_param(p): p when it is 'real' (the tokens of the text: BOS and padding
-- excluded; every saved query's default) or 'all' (every position, BOS and padding included,
-- as the study averaged); an error otherwise.
create or replace macro positions_param(p) as
    case when p in ('all', 'real') then p
         else error('positions must be ''all'' or ''real''') end;

-- weighting_param(w): w when it is 'token' or 'batch'; an error otherwise.
create or replace macro weighting_param(w) as
    case when w in ('token', 'batch') then w
         else error('weighting must be ''token'' or ''batch''') end;

-- measure_param(m): m when it is 'diff' or 'marginal'; an error otherwise.
create or replace macro measure_param(m) as
    case when m in ('diff', 'marginal') then m
         else error('measure must be ''diff'' or ''marginal''') end;

-- study_table_param(t): t when it is 'seed', 'fig13' or NULL (the study's tables, see
-- study_reference); study_dataset_param(d, t): d when it is 'ioi' or 'webtext' and table t
-- holds it; mismatch_param(m): m when it is 'refuse' or 'mark'; an error otherwise.
create or replace macro study_table_param(t) as
    case when t is null or t in ('seed', 'fig13') then t
         else error('study_table must be ''seed'' or ''fig13'', not ''' || t || '''') end;

create or replace macro study_dataset_param(d, t) as
    case when d not in ('ioi', 'webtext')
         then error('dataset must be ''ioi'' or ''webtext'', not ''' || d || '''')
         when t = 'fig13' and d <> 'webtext'
         then error('the study''s fig13 table holds webtext only; pass dataset=webtext')
         else d end;

create or replace macro mismatch_param(m) as
    case when m in ('refuse', 'mark') then m
         else error('mismatch must be ''refuse'' or ''mark''') end;

-- study_mismatch(mode, run, study_table, mismatch, ablation): true when run may be put
-- beside the study's table: nothing differs (mismatch NULL) or mode is 'mark'; otherwise
-- an error naming what differs.
create or replace macro study_mismatch(mode, run, study_table, mismatch, ablation) as
    case when mismatch is null or mode = 'mark' then true
         else error('run ''' || run || ''' is not comparable with the study''s ' || study_table
                    || ' table: ' || mismatch || '; compare a run extracted with --lens '
                    || 'final-scale --ablation ' || ablation || ' on the study''s dataset, or '
                    || 'pass --param mismatch=mark to see it anyway') end;

-- excluded_positions(p): the (run_id, seq, position) keys that the positions convention p
-- leaves out: none for 'all'; BOS and padding tokens for 'real'.
create or replace macro excluded_positions(p) as table
    select run_id, seq, position
    from tokens
    where positions_param(p) = 'real' and (is_bos or is_pad);

-- component_rows(positions, only_run): the component_effects rows of run only_run (every
-- run when NULL) at the positions that the convention positions keeps (see
-- excluded_positions): what every per-component summary starts from.
create or replace macro component_rows(positions, only_run) as table
    select c.*
    from component_effects as c
    anti join excluded_positions(positions) as x using (run_id, seq, position)
    where only_run is null or c.run_id = only_run;

-- resid_rows(positions, only_run): the same for resid_entropy.
create or replace macro resid_rows(positions, only_run) as table
    select r.*
    from resid_entropy as r
    anti join excluded_positions(positions) as x using (run_id, seq, position)
    where only_run is null or r.run_id = only_run;

-- component_partials(positions, only_run), component_batch_partials(positions, only_run),
-- component_seq_partials(positions, only_run) and resid_partials(positions, only_run): the
-- rows of component_sums, component_batch_sums, component_seq_sums and resid_sums of run
-- only_run (every run when NULL) for the kinds of
-- position that the convention positions keeps ('real': class 'real'; 'all': every class):
-- what the summaries add up, as component_rows and resid_rows are what they would scan.
create or replace macro component_partials(positions, only_run) as table
    select p.*
    from component_sums as p
    where (positions_param(positions) = 'all' or p.class = 'real')
      and (only_run is null or p.run_id = only_run);

create or replace macro component_batch_partials(positions, only_run) as table
    select p.*
    from component_batch_sums as p
    where (positions_param(positions) = 'all' or p.class = 'real')
      and (only_run is null or p.run_id = only_run);

create or replace macro component_seq_partials(positions, only_run) as table
    select p.*
    from component_seq_sums as p
    where (positions_param(positions) = 'all' or p.class = 'real')
      and (only_run is null or p.run_id = only_run);

create or replace macro resid_partials(positions, only_run) as table
    select p.*
    from resid_sums as p
    where (positions_param(positions) = 'all' or p.class = 'real')
      and (only_run is null or p.run_id = only_run);

-- head_stats(positions, measure, only_run): per run and attention head, n and the mean and
-- sample standard deviation of the measure ('diff' or 'marginal', see measure_param) at the
-- positions the convention positions keeps, from the partial sums (component_partials).
create or replace macro head_stats(positions, measure, only_run) as table
    select
        p.run_id,
        p.layer,
        p.head,
        sum(p.n)::bigint as n,
        case when measure_param(measure) = 'diff'
             then summed_mean(p.entropy_diff_sum, p.entropy_diff_n)
             else summed_mean(p.entropy_marginal_sum, p.entropy_marginal_n) end as mean,
        case when measure_param(measure) = 'diff'
             then summed_sd(p.entropy_diff_sum, p.entropy_diff_sq, p.entropy_diff_n)
             else summed_sd(p.entropy_marginal_sum, p.entropy_marginal_sq,
                            p.entropy_marginal_n) end as sd
    from component_partials(positions, only_run) as p
    where p.kind = 'head'
    group by p.run_id, p.layer, p.head;

-- head_values(positions, measure, only_run): the heads' rows of component_rows with the
-- chosen measure ('diff' or 'marginal', see measure_param) as value.
create or replace macro head_values(positions, measure, only_run) as table
    select c.run_id, c.seq, c.position, c.layer, c.head,
           case when measure_param(measure) = 'diff' then c.entropy_diff
                else c.entropy_marginal end as value
    from component_rows(positions, only_run) as c
    where c.kind = 'head';

-- latest_run(): the run_id of the latest complete run (by created_at, ties broken by the
-- larger run_id), or NULL when there is none: the run a query's NULL run_id stands for.
create or replace macro latest_run() as
    (select run_id from runs order by created_at desc, run_id desc limit 1);

-- earliest_run(): the run_id of the earliest complete run (by created_at, ties broken by
-- the smaller run_id), or NULL when there is none.
create or replace macro earliest_run() as
    (select run_id from runs order by created_at, run_id limit 1);

-- ci95_low(mean, sd, n), ci95_high(mean, sd, n): the bounds of the 95 % confidence interval
-- of a mean of n values with sample standard deviation sd (normal approximation:
-- mean ± 1.96·sd/√n).
create or replace macro ci95_low(mean, sd, n) as mean - 1.96 * sd / sqrt(n);

create or replace macro ci95_high(mean, sd, n) as mean + 1.96 * sd / sqrt(n);

-- component_param(c): c when it names a component, 'L.H' (head H of layer L) or 'L.mlp';
-- an error otherwise. component_layer(c), component_kind(c) ('head' or 'mlp') and
-- component_head(c) (NULL for the MLP) take it apart.
create or replace macro component_layer(c) as try_cast(split_part(c, '.', 1) as integer);

create or replace macro component_kind(c) as
    case when split_part(c, '.', 2) = 'mlp' then 'mlp' else 'head' end;

create or replace macro component_head(c) as
    try_cast(nullif(split_part(c, '.', 2), 'mlp') as integer);

create or replace macro component_param(c) as
    case when component_layer(c) is not null
              and (component_kind(c) = 'mlp' or component_head(c) is not null) then c
         else error('component must look like ''10.7'' (a head) or ''10.mlp'', not '''
                    || coalesce(c, 'NULL') || '''') end;

-- chosen_component(given, top, run): the component a query of one run shows: given, else
-- top (the run's highest-ranked head); an error when there is neither, as in a run that
-- holds no rows.
create or replace macro chosen_component(given, top, run) as
    case when given is not null then given
         when top is not null then top
         else error('run ''' || coalesce(run, 'NULL') || ''' holds no rows, so it has no '
                    || 'component to choose; choose a run that has rows') end;

-- Calibration pieces shared by the calibration and calibration_curve queries.

-- n_bins_param(n), top_k_param(k): n when it is at least 1; k when it is 1, 2 or 3; an
-- error otherwise.
create or replace macro n_bins_param(n) as
    case when n >= 1 then n else error('n_bins must be at least 1') end;

create or replace macro top_k_param(k) as
    case when k between 1 and 3 then k else error('top_k must be 1, 2 or 3') end;

-- kth_prob(k, p1, p2, p3): the k-th largest probability of a prediction, as double.
create or replace macro kth_prob(k, p1, p2, p3) as
    (case k when 1 then p1 when 2 then p2 else p3 end)::double;

-- probability_bin(p, n): the bin i of n equal bins of [0, 1) with i/n ≤ p < (i+1)/n,
-- compared in double (floor(p·n) corrected where the product rounds across a bin edge);
-- p = 1 gives n, in no bin.
create or replace macro probability_bin(p, n) as
    (case when p < floor(p * n) / n then floor(p * n) - 1
          when p >= (floor(p * n) + 1) / n then floor(p * n) + 1
          else floor(p * n) end)::bigint;

-- overconfidence_fx(hits, n, bin, n_bins), overconfidence_xx(bin, n_bins): a non-empty
-- bin's terms of the study's overconfidence Σ f·x / Σ x², f = accuracy − (bin + ½)/n_bins,
-- x = ½ − (bin + ½)/n_bins.
create or replace macro overconfidence_fx(hits, n, bin, n_bins) as
    (hits / n - (bin + 0.5) / n_bins) * (0.5 - (bin + 0.5) / n_bins);

create or replace macro overconfidence_xx(bin, n_bins) as (0.5 - (bin + 0.5) / n_bins) ** 2;

-- predicted_positions(run, positions): the (run_id, seq, position) of run's tokens that have
-- a next token (the study's [:, :-1], less positions before padding) and that the
-- positions convention keeps ('real': not BOS), with the model's top-3 probabilities and
-- the next token's rank.
create or replace macro predicted_positions(run, positions) as table
    select t.run_id, t.seq, t.position, t.top1_prob, t.top2_prob, t.top3_prob, t.target_rank
    from tokens as t
    where t.run_id = run and t.next_token_id is not null
      and (positions_param(positions) = 'all' or not t.is_bos);

-- component_calibration(run, positions, n_bins, top_k): per head and MLP of run, the study's
-- overconfidence with the component's direct effect removed, the model's own and
-- relative_change (the calibration query's columns but run_id; see its header), over the
-- predictions at the positions the convention positions keeps, with the top_k largest
-- probabilities of each in n_bins equal bins. Reads the run's rows.
create or replace macro component_calibration(run, positions, n_bins, top_k) as table
    with

    settings as (
        select n_bins_param(n_bins::integer) as n_bins, top_k_param(top_k::integer) as top_k
    ),

    ranks as (
        select k.k from settings as s, range(1, 4) as k(k) where k.k <= s.top_k
    ),

    predicted as (
        select * from predicted_positions(run, positions)
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

    select * from final;

-- stable_mean(x), stable_sd(x): the mean and sample standard deviation of x (aggregates),
-- the same to the last bit however the rows are split over threads and files. DuckDB's
-- avg() and stddev_samp() add doubles in the order its threads happen to read the shards,
-- so one query can differ in the last digits from one run to the next; these add fixed-point
-- integers (x × 2^40, rounded: within 2^-41 of x, ample for entropies in nats), which is
-- exact in 128 bits and so independent of the order. For |x| < 2,896 (entropies are below
-- ln(vocabulary size)). stable_sd is NULL for fewer than 2 values, as stddev_samp is.
-- fixed_mean(s, n) and fixed_sd(s, q, n) give them from the integer sums s = Σ fixed_point(x)
-- and q = Σ fixed_point(x²) of n values; summed_mean(s, n) and summed_sd(s, q, n) (aggregates)
-- from partial sums, such as the sums views' m_sum, m_sq and m_n columns, to the same bytes.
-- fixed_point and fine_point are also spelt in etl/warehouse/sums.py, which writes those
-- sums.
create or replace macro fixed_point(x) as (x::double * 1099511627776)::bigint;

create or replace macro fixed_mean(s, n) as s / n / 1099511627776;

create or replace macro fixed_sd(s, q, n) as
    case when n > 1 then sqrt(greatest(0,
        (q / 1099511627776 - (s / 1099511627776) ** 2 / n) / (n - 1))) end;

create or replace macro stable_mean(x) as fixed_mean(sum(fixed_point(x)), count(x));

create or replace macro stable_sd(x) as
    fixed_sd(sum(fixed_point(x)), sum(fixed_point(x::double * x::double)), count(x));

create or replace macro summed_mean(s, n) as fixed_mean(sum(s::hugeint), sum(n)::bigint);

create or replace macro summed_sd(s, q, n) as
    fixed_sd(sum(s::hugeint), sum(q::hugeint), sum(n)::bigint);

-- summed_fraction(k, n): Σk / Σn (an aggregate) as double: the fraction of n values counted
-- by k (the sums views' m_pos and m_n columns: the fraction of positive values).
create or replace macro summed_fraction(k, n) as sum(k)::double / sum(n)::bigint;

-- stable_cov(x, y): the sample covariance of x and y (an aggregate) over the rows where both
-- are non-NULL; stable_cov(x, x) is the sample variance. Order-independent like stable_sd,
-- but finer: its fixed-point integers are x × 2^80 (128 bits, within 2^-81 of x·y, whose
-- product of two float32 values is exact in double), so the small values and near-equal
-- terms of a variance keep their digits. For Σ|x·y| and Σ|x|, Σ|y| below 10^14.
-- NULL for fewer than 2 such rows. fine_cov(sxy, sx, sy, n) gives it from the sums
-- sxy = Σ fine_point(x·y), sx = Σ fine_point(x), sy = Σ fine_point(y) over the n rows where
-- both are present.
create or replace macro fine_point(x) as (x::double * 2.0 ** 80)::hugeint;

create or replace macro fine_cov(sxy, sx, sy, n) as
    case when n > 1 then
        (sxy / 2.0 ** 80 - sx / 2.0 ** 80 * (sy / 2.0 ** 80) / n) / (n - 1) end;

create or replace macro stable_cov(x, y) as
    fine_cov(sum(fine_point(x::double * y::double)),
             sum(fine_point(case when y is not null then x end)),
             sum(fine_point(case when x is not null then y end)),
             count(x::double * y::double));

-- The copy-suppression shares' 95 % intervals (Fieller's, with sequences as clusters).
-- A share is R = ΣX/ΣY or 1 − R, X and Y two measures summed over the positions kept.
-- Positions of one sequence are not independent, so the variances are those of the n
-- sequences' totals X_s, Y_s: with means X̄, Ȳ of the totals and v_xx, v_xy, v_yy the
-- sample (co)variances of the totals over n (the (co)variances of the means), the interval
-- is {R : (X̄ − R·Ȳ)² ≤ t²·(v_xx − 2R·v_xy + R²·v_yy)}, t = t975(n − 1). It is an interval
-- when a = Ȳ² − t²·v_yy > 0 (the denominator differs significantly from 0): its ends are
-- (b ∓ √D)/a with b = X̄·Ȳ − t²·v_xy and D = b² − a·(X̄² − t²·v_xx), written below without
-- the cancelling terms. Otherwise the set is unbounded (the whole line, or the line less an
-- interval): no finite interval is given.

-- t975_expansion(z, e): Student's t quantile from the normal one z, e = 1/df (below).
create or replace macro t975_expansion(z, e) as
    z + e * (z ** 3 + z) / 4 + e ** 2 * (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
      + e ** 3 * (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
      + e ** 4 * (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z)
        / 92160;

-- t975(df): the 0.975 quantile of Student's t with df degrees of freedom: exact (12
-- digits) for df ≤ 30, the Cornish–Fisher expansion in 1/df to its fourth term beyond
-- (within 3e-8); NULL for df < 1.
create or replace macro t975(df) as
    case when df between 1 and 30 then
        [12.7062047362::double, 4.30265272975, 3.18244630528, 2.7764451052, 2.57058183564,
         2.44691185114, 2.36462425159, 2.3060041352, 2.2621571628, 2.22813885199,
         2.20098516009, 2.17881282967, 2.16036865646, 2.14478668792, 2.13144954556,
         2.11990529922, 2.10981557783, 2.10092204024, 2.09302405441, 2.08596344727,
         2.07961384473, 2.0738730679, 2.06865761042, 2.06389856163, 2.05953855275,
         2.05552943864, 2.05183051648, 2.0484071418, 2.04522964213, 2.0422724563][df]
         when df > 30 then t975_expansion(1.959963984540054::double, 1.0::double / df) end;

-- fieller_ends(a, b, d): the struct of the interval (b ∓ √d)/a (a > 0).
create or replace macro fieller_ends(a, b, d) as
    {'low': ((b - sqrt(greatest(0, d))) / a)::double,
     'high': ((b + sqrt(greatest(0, d))) / a)::double, 'unbounded': false};

-- fieller_interval(mx, my, vxx, vxy, vyy, t): the set of ratios R above as a struct
-- {low, high, unbounded}: its ends and false when a > 0; NULL ends and true when a ≤ 0;
-- NULL when an input is NULL (fewer than 2 sequences).
create or replace macro fieller_interval(mx, my, vxx, vxy, vyy, t) as
    case when mx is null or my is null or vxx is null or vxy is null or vyy is null
              or t is null then null
         when my * my - t * t * vyy <= 0
              then {'low': null::double, 'high': null::double, 'unbounded': true}
         else fieller_ends(my * my - t * t * vyy, mx * my - t * t * vxy,
                           t * t * (my * my * vxx - 2 * mx * my * vxy + mx * mx * vyy)
                           - t ** 4 * (vxx * vyy - vxy * vxy)) end;

-- share_ends(r, complement): the interval r of a ratio, or of 1 − ratio (ends swapped).
create or replace macro share_ends(r, complement) as
    list_transform([r], lambda i: case
        when i is null then null
        when complement then {'low': 1 - i.high, 'high': 1 - i.low, 'unbounded': i.unbounded}
        else i end)[1];

-- share_moments(sx, sy): an aggregate over one row per sequence, sx and sy its totals
-- Σ fine_point(x), Σ fine_point(y): {mx, my, vxx, vxy, vyy, t}, the totals' means, the
-- (co)variances of the means and t975(n − 1), n the sequences with a total.
create or replace macro share_moments(sx, sy) as
    {'mx': sum(sx::hugeint) / 2.0 ** 80 / count(sx),
     'my': sum(sy::hugeint) / 2.0 ** 80 / count(sy),
     'vxx': stable_cov(sx / 2.0 ** 80, sx / 2.0 ** 80) / count(sx),
     'vxy': stable_cov(sx / 2.0 ** 80, sy / 2.0 ** 80) / count(sx),
     'vyy': stable_cov(sy / 2.0 ** 80, sy / 2.0 ** 80) / count(sy),
     't': t975(count(sx) - 1)};

-- share_interval(sx, sy, complement): an aggregate over one row per sequence, sx and sy
-- its totals Σ fine_point(x) and Σ fine_point(y) over the positions kept where both are
-- present (the <pair>_x, <pair>_y columns of component_seq_sums, added over its classes):
-- the 95 % interval {low, high, unbounded} of the share R = Σx / Σy (complement false) or
-- 1 − R (complement true: the ends swap), by fieller_interval with share_moments.
-- Order-independent: the totals are exact integers, their (co)variances stable_cov's. For
-- Σ_s |X_s·Y_s| below 10^14 (nats², X_s the sequence's total in nats); beyond, DuckDB stops
-- with an overflow error. (The lambdas bind each argument once: a macro repeats its
-- argument's expression wherever it names it.)
create or replace macro share_interval(sx, sy, complement) as
    share_ends(list_transform([share_moments(sx, sy)], lambda m:
        fieller_interval(m.mx, m.my, m.vxx, m.vxy, m.vyy, m.t))[1], complement);
