-- Staging: the numeric extendInfo metrics of each instance's newest successful runs, one row each.
-- Grain: one row per (app_group, function_name, instance_name, run_id, metric_name), for the (up to)
-- 21 newest successful runs per instance whose extendInfo holds a number; run_rank 1 is the newest
-- run that reported at least one numeric metric, 2 the one before, and so on.
-- Read from the raw extend_info JSON (not the flattened columns) so that the result is the same
-- whatever extend_info__* columns a destination happens to hold. metric_name is the path of a
-- numeric leaf, keys joined with '__' and snake_cased like dlt's column names (metrics__precision);
-- leaves inside lists (errors) and non-numeric leaves are skipped.
with recursive

tasks as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        start_time,
        extend_info,
        is_extend_info_malformed
    from analytics.stg_function_tasks
    where is_succeeded

),

candidate_runs as (

    -- Only the newest runs matter (the newest, the one before, an alert's baseline): parse JSON for
    -- a handful per instance, not for the whole history. A run qualifies cheaply when its raw text
    -- holds a number at all. The 21 newest per instance come from a top-N aggregate (a sort of
    -- every run costs more), in the order of ranked_runs below: newest start_time first, unknown ones last, then run_id.
    select
        app_group,
        function_name,
        instance_name,
        unnest(
            max_by(
                struct_pack(run_id, start_time, extend_info),
                -- nested NULLs compare as greatest: rank by "is known" first to put them last
                struct_pack(
                    has_start_time := start_time is not null,
                    start_time,
                    has_run_id := run_id is not null,
                    run_id
                ),
                21
            ),
            recursive := true
        )
    from tasks
    where not is_extend_info_malformed
        and regexp_matches(extend_info, ':\s*-?[0-9]')
    group by app_group, function_name, instance_name

),

parsed_tasks as (

    select
        *,
        case
            when not json_valid(extend_info) then null
            when json_type(extend_info) = 'OBJECT' then cast(extend_info as json)
        end as extend_info_json
    from candidate_runs

),

json_nodes (app_group, function_name, instance_name, run_id, start_time, path, value, type) as (

    select
        parsed_tasks.app_group,
        parsed_tasks.function_name,
        parsed_tasks.instance_name,
        parsed_tasks.run_id,
        parsed_tasks.start_time,
        [node.key],
        node.value,
        node.type
    from parsed_tasks, json_each(parsed_tasks.extend_info_json) as node
    where parsed_tasks.extend_info_json is not null

    union all

    -- descend into objects only: lists such as errors are not metrics
    select
        json_nodes.app_group,
        json_nodes.function_name,
        json_nodes.instance_name,
        json_nodes.run_id,
        json_nodes.start_time,
        list_append(json_nodes.path, child.key),
        child.value,
        child.type
    from json_nodes, json_each(json_nodes.value) as child
    where json_nodes.type = 'OBJECT'

),

metric_values as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        start_time,
        -- each key snake_cased like dlt names columns (trainLoss -> train_loss, a.b -> a_b)
        array_to_string(
            list_transform(
                path,
                lambda json_key: regexp_replace(
                    regexp_replace(
                        lower(
                            regexp_replace(
                                regexp_replace(
                                    regexp_replace(
                                        translate(trim(json_key), '+-*@|', 'x_xal'),
                                        '[^a-zA-Z0-9_]+', '_', 'g'
                                    ),
                                    '([^_])([A-Z][a-z]+)', '\1_\2', 'g'
                                ),
                                '([a-z0-9])([A-Z])', '\1_\2', 'g'
                            )
                        ),
                        '^([0-9])', '_\1'
                    ),
                    '__+', '_', 'g'
                )
            ),
            '__'
        ) as metric_name,
        cast(value as double) as metric_value
    from json_nodes
    where type in ('BIGINT', 'UBIGINT', 'DOUBLE')

),

runs_with_metrics as (

    select distinct
        app_group,
        function_name,
        instance_name,
        run_id,
        start_time
    from metric_values

),

ranked_runs as (

    select
        *,
        row_number() over (
            partition by app_group, function_name, instance_name
            order by start_time desc nulls last, run_id desc
        ) as run_rank
    from runs_with_metrics

),

final as (

    select
        metric_values.app_group,
        metric_values.function_name,
        metric_values.instance_name,
        metric_values.run_id,
        metric_values.start_time,
        ranked_runs.run_rank,
        metric_values.metric_name,
        metric_values.metric_value
    from metric_values
    inner join ranked_runs
        on ranked_runs.app_group = metric_values.app_group
        and ranked_runs.function_name = metric_values.function_name
        and ranked_runs.instance_name = metric_values.instance_name
        and ranked_runs.run_id = metric_values.run_id

)

select * from final
