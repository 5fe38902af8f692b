-- How long finished training tasks take per instance, overall and split by outcome.
-- Grain: one row per (app_group, function_name, instance_name) with at least one finished task.
-- Percentiles use quantile_cont (linear interpolation between the two nearest durations), so
-- p50 of 10 s and 20 s is 15 s; running tasks are excluded (their duration is unknown).
with

tasks as (

    select
        app_group,
        function_name,
        instance_name,
        duration_seconds,
        is_succeeded,
        is_failed
    from analytics.stg_function_tasks
    where is_finished

),

durations as (

    select
        app_group,
        function_name,
        instance_name,
        count(*) as finished_tasks,
        avg(duration_seconds) as avg_duration_seconds,
        -- p50 and p90 from one aggregate (one sort of the durations, not two)
        quantile_cont(duration_seconds, [0.5, 0.9]) as percentiles,
        max(duration_seconds) as max_duration_seconds,
        count(*) filter (where is_succeeded) as succeeded_tasks,
        quantile_cont(duration_seconds, [0.5, 0.9]) filter (where is_succeeded)
            as succeeded_percentiles,
        count(*) filter (where is_failed) as failed_tasks,
        quantile_cont(duration_seconds, [0.5, 0.9]) filter (where is_failed) as failed_percentiles
    from tasks
    group by app_group, function_name, instance_name

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        finished_tasks,
        avg_duration_seconds,
        percentiles[1] as p50_duration_seconds,
        percentiles[2] as p90_duration_seconds,
        max_duration_seconds,
        succeeded_tasks,
        succeeded_percentiles[1] as succeeded_p50_duration_seconds,
        succeeded_percentiles[2] as succeeded_p90_duration_seconds,
        failed_tasks,
        failed_percentiles[1] as failed_p50_duration_seconds,
        failed_percentiles[2] as failed_p90_duration_seconds
    from durations

)

select * from final
