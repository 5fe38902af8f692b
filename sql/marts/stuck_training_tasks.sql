-- Running tasks that need a look: stale, or running longer than the instance usually takes.
-- Grain: one row per running (app_group, function_name, instance_name, run_id) that is stale
-- (older than raw.model_settings.stale_after_hours) or whose elapsed time (now() - start_time)
-- exceeds the instance's p90 finished duration. A stale task is reported as 'stale' only.
with

running_tasks as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        generation,
        progress,
        start_time,
        is_stale
    from analytics.stg_function_tasks
    where status = 'running'

),

instance_durations as (

    select
        app_group,
        function_name,
        instance_name,
        p90_duration_seconds
    from analytics.training_durations

),

with_elapsed as (

    select
        running_tasks.*,
        date_diff('microsecond', running_tasks.start_time, now()) / 1e6 as elapsed_seconds,
        instance_durations.p90_duration_seconds
    from running_tasks
    left join instance_durations
        on instance_durations.app_group = running_tasks.app_group
        and instance_durations.function_name = running_tasks.function_name
        and instance_durations.instance_name = running_tasks.instance_name

),

classified as (

    select
        *,
        case
            when is_stale then 'stale'
            when elapsed_seconds > p90_duration_seconds then 'longer_than_p90'
        end as reason
    from with_elapsed

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        generation,
        progress,
        start_time,
        elapsed_seconds,
        p90_duration_seconds,
        reason
    from classified
    where reason is not null

)

select * from final
