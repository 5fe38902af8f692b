-- All-time training outcomes per instance, and the last 7 days against the 7 days before.
-- Grain: one row per (app_group, function_name, instance_name).
-- The windows are anchored at the instance's newest start_time in the data, not at now(), so the
-- numbers depend only on the data: last 7 days = (newest - 7 days, newest], previous 7 days =
-- (newest - 14 days, newest - 7 days] (days 8..14). Rates count finished tasks only.
with

tasks as (

    select
        app_group,
        function_name,
        instance_name,
        start_time,
        status,
        is_succeeded,
        is_failed
    from analytics.stg_function_tasks

),

anchors as (

    -- the window bounds, once per instance. Fixed lengths of 7 x 24 hours, not calendar days: on a
    -- timestamptz, "- interval 7 day" counts days in the session's time zone, and across a
    -- daylight-saving change the windows would depend on the session rather than on the data.
    select
        app_group,
        function_name,
        instance_name,
        max(start_time) as newest_start_time,
        max(start_time) - to_hours(7 * 24) as last_7_days_starts_after,
        max(start_time) - to_hours(14 * 24) as previous_7_days_starts_after
    from tasks
    group by app_group, function_name, instance_name

),

windowed_tasks as (

    select
        tasks.*,
        anchors.newest_start_time,
        tasks.start_time > anchors.last_7_days_starts_after as is_in_last_7_days,
        tasks.start_time > anchors.previous_7_days_starts_after
        and tasks.start_time <= anchors.last_7_days_starts_after
            as is_in_previous_7_days
    from tasks
    inner join anchors
        on anchors.app_group = tasks.app_group
        and anchors.function_name = tasks.function_name
        and anchors.instance_name = tasks.instance_name

),

counts as (

    select
        app_group,
        function_name,
        instance_name,
        max(newest_start_time) as newest_start_time,
        count(*) as tasks_started,
        count(*) filter (where is_succeeded) as tasks_succeeded,
        count(*) filter (where is_failed) as tasks_failed,
        count(*) filter (where status = 'running') as tasks_running,
        count(*) filter (where is_in_last_7_days and is_succeeded) as last_7_days_succeeded,
        count(*) filter (where is_in_last_7_days and (is_succeeded or is_failed))
            as last_7_days_finished,
        count(*) filter (where is_in_previous_7_days and is_succeeded)
            as previous_7_days_succeeded,
        count(*) filter (where is_in_previous_7_days and (is_succeeded or is_failed))
            as previous_7_days_finished
    from windowed_tasks
    group by app_group, function_name, instance_name

),

rates as (

    select
        *,
        tasks_succeeded::double / nullif(tasks_succeeded + tasks_failed, 0) as success_rate,
        last_7_days_succeeded::double / nullif(last_7_days_finished, 0)
            as last_7_days_success_rate,
        previous_7_days_succeeded::double / nullif(previous_7_days_finished, 0)
            as previous_7_days_success_rate
    from counts

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        newest_start_time,
        tasks_started,
        tasks_succeeded,
        tasks_failed,
        tasks_running,
        success_rate,
        last_7_days_finished,
        last_7_days_success_rate,
        previous_7_days_finished,
        previous_7_days_success_rate,
        last_7_days_success_rate - previous_7_days_success_rate as success_rate_change
    from rates

)

select * from final
