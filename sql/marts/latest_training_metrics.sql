-- The numeric extendInfo metrics of each instance's newest successful run, against the run before.
-- Grain: one row per (app_group, function_name, instance_name, metric_name).
-- "Newest run" = the newest successful run that reported at least one numeric metric; previous_*
-- come from the one before it (both from stg_training_metric_values: among each instance's 21
-- newest successful runs whose extendInfo holds any number).
with

metric_values as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        start_time,
        run_rank,
        metric_name,
        metric_value
    from analytics.stg_training_metric_values
    where run_rank <= 2

),

newest_metrics as (

    select
        app_group,
        function_name,
        instance_name,
        metric_name,
        run_id,
        start_time,
        metric_value
    from metric_values
    where run_rank = 1

),

previous_runs as (

    select distinct
        app_group,
        function_name,
        instance_name,
        run_id as previous_run_id
    from metric_values
    where run_rank = 2

),

with_previous_value as (

    select
        newest_metrics.*,
        previous_runs.previous_run_id,
        previous_values.metric_value as previous_metric_value
    from newest_metrics
    left join previous_runs
        on previous_runs.app_group = newest_metrics.app_group
        and previous_runs.function_name = newest_metrics.function_name
        and previous_runs.instance_name = newest_metrics.instance_name
    left join metric_values as previous_values
        on previous_values.app_group = newest_metrics.app_group
        and previous_values.function_name = newest_metrics.function_name
        and previous_values.instance_name = newest_metrics.instance_name
        and previous_values.run_rank = 2
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
