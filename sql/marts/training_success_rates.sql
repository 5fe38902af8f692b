-- Daily training outcomes per instance: how many tasks started, succeeded, failed, still run.
-- Grain: one row per (app_group, function_name, instance_name, day); day = UTC date of start_time.
-- success_rate = succeeded / (succeeded + failed); NULL when no task of that day has finished.
with

tasks as (

    select
        app_group,
        function_name,
        instance_name,
        start_date,
        status,
        is_succeeded,
        is_failed
    from analytics.stg_function_tasks

),

daily_counts as (

    select
        app_group,
        function_name,
        instance_name,
        start_date as day,
        count(*) as tasks_started,
        count(*) filter (where is_succeeded) as tasks_succeeded,
        count(*) filter (where is_failed) as tasks_failed,
        count(*) filter (where status = 'running') as tasks_running
    from tasks
    group by app_group, function_name, instance_name, start_date

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        day,
        tasks_started,
        tasks_succeeded,
        tasks_failed,
        tasks_running,
        tasks_succeeded::double / nullif(tasks_succeeded + tasks_failed, 0) as success_rate
    from daily_counts

)

select * from final
