-- Weekly training outcomes per instance, with the change against the calendar week before.
-- Grain: one row per (app_group, function_name, instance_name, week); week = Monday (in the
-- configured time zone, as start_date) of
-- start_time. previous_week_success_rate is NULL when the week before had no finished task.
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

weekly_counts as (

    select
        app_group,
        function_name,
        instance_name,
        cast(date_trunc('week', start_date) as date) as week,
        count(*) as tasks_started,
        count(*) filter (where is_succeeded) as tasks_succeeded,
        count(*) filter (where is_failed) as tasks_failed,
        count(*) filter (where status = 'running') as tasks_running
    from tasks
    group by app_group, function_name, instance_name, week

),

weekly_rates as (

    select
        *,
        tasks_succeeded::double / nullif(tasks_succeeded + tasks_failed, 0) as success_rate
    from weekly_counts

),

with_previous_week as (

    select
        this_week.*,
        previous_week.success_rate as previous_week_success_rate
    from weekly_rates as this_week
    left join weekly_rates as previous_week
        on previous_week.app_group = this_week.app_group
        and previous_week.function_name = this_week.function_name
        and previous_week.instance_name = this_week.instance_name
        and previous_week.week = this_week.week - 7

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        week,
        tasks_started,
        tasks_succeeded,
        tasks_failed,
        tasks_running,
        success_rate,
        previous_week_success_rate,
        success_rate - previous_week_success_rate as success_rate_change
    from with_previous_week

)

select * from final
