-- The numeric extendInfo metrics of each instance's newest successful run, against the run before.
-- Grain: one row per (app_group, function_name, instance_name, metric_name).
-- Read from the raw extend_info JSON (not the flattened columns) so that the result is the same
-- whatever extend_info__* columns a destination happens to hold. metric_name is the path of a
-- numeric leaf, keys joined with '__' and snake_cased like dlt's column names (metrics__precision);
-- leaves inside lists (errors) and non-numeric leaves are skipped. "Newest run" = the newest
-- successful run that reported at least one numeric metric; previous_* come from the one before it
-- (searched among each instance's ten newest successful runs whose extendInfo holds any number).
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

    -- Only the newest runs can be "newest" or "previous": parse JSON for a handful per instance,
    -- not for the whole history. A run qualifies cheaply when its raw text holds a number at all.
    -- The ten newest per instance come from a top-10 aggregate (a sort of every run costs more),
    -- in the order of ranked_runs below: newest start_time first, unknown ones last, then run_id.
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
                10
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

newest_run as (

    select * from ranked_runs where run_rank = 1

),

previous_run as (

    select * from ranked_runs where run_rank = 2

),

newest_metrics as (

    select
        metric_values.*,
        previous_run.run_id as previous_run_id
    from metric_values
    inner join newest_run
        on newest_run.app_group = metric_values.app_group
        and newest_run.function_name = metric_values.function_name
        and newest_run.instance_name = metric_values.instance_name
        and newest_run.run_id = metric_values.run_id
    left join previous_run
        on previous_run.app_group = metric_values.app_group
        and previous_run.function_name = metric_values.function_name
        and previous_run.instance_name = metric_values.instance_name

),

with_previous_value as (

    select
        newest_metrics.*,
        previous_values.metric_value as previous_metric_value
    from newest_metrics
    left join metric_values as previous_values
        on previous_values.app_group = newest_metrics.app_group
        and previous_values.function_name = newest_metrics.function_name
        and previous_values.instance_name = newest_metrics.instance_name
        and previous_values.run_id = newest_metrics.previous_run_id
        and previous_values.metric_name = newest_metrics.metric_name

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        metric_name,
        run_id,
        start_time,
        metric_value,
        previous_run_id,
        previous_metric_value,
        metric_value - previous_metric_value as metric_change
    from with_previous_value

)

select * from final
