-- Training health: every alert that fires now, with the condition that fires it.
-- Grain: one row per (kind, app_group, function_name, instance_name, metric); metric is set for
-- metric_regression only, and load_freshness has no instance (it is about the destination).
-- Thresholds come from raw.alert_settings: a default row and per-function / per-instance rows
-- (NULL = any), the most specific one that matches an instance wins. "Now" is its as_of, or the
-- time of the query. Kinds:
--   failure_streak     the newest failure_streak finished tasks all failed (since: the streak's first)
--   silence            no success for longer than silence_factor x the usual interval between
--                      successes (their median), and at least silence_floor_hours; needs 3 successes
--   stuck              running longer than stuck_factor x the instance's p90 duration, or stale
--   slow               the newest finished task took more than slow_factor x the p90 of the finished
--                      tasks in the slow_window_days before it (at least 5 of them)
--   metric_regression  the newest successful run's metric is worse than the mean of the previous
--                      metric_baseline_runs successful runs by more than metric_threshold (relative):
--                      higher is better for recall, auc, precision, ndcg, accuracy, coverage, hit_rate,
--                      f1, map, mrr; lower for loss, rmse, mae, mse, error; other metrics are ignored
--   load_freshness     no task fetched for longer than freshness_hours
with

tasks as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        status,
        start_time,
        end_time,
        duration_seconds,
        is_finished,
        is_succeeded,
        is_failed,
        is_stale,
        fetched_at
    from analytics.stg_function_tasks

),

durations as (

    select app_group, function_name, instance_name, p90_duration_seconds
    from analytics.training_durations

),

metric_values as (

    select app_group, function_name, instance_name, run_id, start_time, run_rank, metric_name, metric_value
    from analytics.stg_training_metric_values

),

settings as (

    select * from raw.alert_settings

),

clock as (

    select coalesce(max(as_of), now()) as now_time from settings

),

instances as (

    select distinct app_group, function_name, instance_name from tasks

),

instance_settings as (

    -- the most specific settings row matching each instance
    select
        instances.app_group,
        instances.function_name,
        instances.instance_name,
        settings.failure_streak,
        settings.silence_factor,
        settings.silence_floor_hours,
        settings.stuck_factor,
        settings.slow_factor,
        settings.slow_window_days,
        settings.metric_baseline_runs,
        settings.metric_threshold
    from instances
    inner join settings
        on (settings.app_group is null or settings.app_group = instances.app_group)
        and (settings.function_name is null or settings.function_name = instances.function_name)
        and (settings.instance_name is null or settings.instance_name = instances.instance_name)
    qualify row_number() over (
        partition by instances.app_group, instances.function_name, instances.instance_name
        order by
            (settings.instance_name is not null) desc,
            (settings.function_name is not null) desc,
            (settings.app_group is not null) desc
    ) = 1

),

-- failure_streak ---------------------------------------------------------------------------------

finished_by_recency as (

    select
        *,
        row_number() over (
            partition by app_group, function_name, instance_name
            order by start_time desc, run_id desc
        ) as recency
    from tasks
    where is_finished

),

streak_lengths as (

    select
        app_group,
        function_name,
        instance_name,
        coalesce(min(recency) filter (where is_succeeded), max(recency) + 1) - 1 as streak_length
    from finished_by_recency
    group by app_group, function_name, instance_name

),

failure_streak_alerts as (

    select
        'failure_streak' as kind,
        streak_lengths.app_group,
        streak_lengths.function_name,
        streak_lengths.instance_name,
        streak_start.start_time as since,
        format(
            'the newest {} finished tasks failed (threshold {})',
            streak_lengths.streak_length,
            instance_settings.failure_streak
        ) as message,
        cast(null as varchar) as metric,
        cast(streak_lengths.streak_length as double) as value,
        cast(instance_settings.failure_streak as double) as baseline,
        newest.run_id
    from streak_lengths
    inner join instance_settings using (app_group, function_name, instance_name)
    inner join finished_by_recency as streak_start
        on streak_start.app_group = streak_lengths.app_group
        and streak_start.function_name = streak_lengths.function_name
        and streak_start.instance_name = streak_lengths.instance_name
        and streak_start.recency = streak_lengths.streak_length
    inner join finished_by_recency as newest
        on newest.app_group = streak_lengths.app_group
        and newest.function_name = streak_lengths.function_name
        and newest.instance_name = streak_lengths.instance_name
        and newest.recency = 1
    where streak_lengths.streak_length >= instance_settings.failure_streak

),

-- silence ----------------------------------------------------------------------------------------

successes as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        coalesce(end_time, start_time) as succeeded_at
    from tasks
    where is_succeeded

),

success_gaps as (

    select
        *,
        epoch_ms(succeeded_at) - epoch_ms(
            lag(succeeded_at) over (
                partition by app_group, function_name, instance_name order by succeeded_at, run_id
            )
        ) as gap_ms
    from successes

),

success_history as (

    select
        app_group,
        function_name,
        instance_name,
        count(*) as successes,
        max(succeeded_at) as last_success_at,
        arg_max(run_id, succeeded_at) as last_success_run_id,
        median(gap_ms) / 3600000.0 as usual_gap_hours
    from success_gaps
    group by app_group, function_name, instance_name

),

silence_alerts as (

    select
        'silence' as kind,
        success_history.app_group,
        success_history.function_name,
        success_history.instance_name,
        success_history.last_success_at as since,
        format(
            'no successful task for {:.1f} h; it usually succeeds every {:.1f} h',
            (epoch_ms(clock.now_time) - epoch_ms(success_history.last_success_at)) / 3600000.0,
            success_history.usual_gap_hours
        ) as message,
        cast(null as varchar) as metric,
        (epoch_ms(clock.now_time) - epoch_ms(success_history.last_success_at)) / 3600000.0 as value,
        greatest(
            instance_settings.silence_factor * success_history.usual_gap_hours,
            instance_settings.silence_floor_hours
        ) as baseline,
        success_history.last_success_run_id as run_id
    from success_history
    inner join instance_settings using (app_group, function_name, instance_name)
    cross join clock
    where success_history.successes >= 3
        and (epoch_ms(clock.now_time) - epoch_ms(success_history.last_success_at)) / 3600000.0
        > greatest(
            instance_settings.silence_factor * success_history.usual_gap_hours,
            instance_settings.silence_floor_hours
        )

),

-- stuck ------------------------------------------------------------------------------------------

running_tasks as (

    select
        tasks.app_group,
        tasks.function_name,
        tasks.instance_name,
        tasks.run_id,
        tasks.start_time,
        tasks.is_stale,
        (epoch_ms(clock.now_time) - epoch_ms(tasks.start_time)) / 1000.0 as elapsed_seconds
    from tasks
    cross join clock
    where tasks.status = 'running'

),

stuck_alerts as (

    select
        'stuck' as kind,
        running_tasks.app_group,
        running_tasks.function_name,
        running_tasks.instance_name,
        running_tasks.start_time as since,
        case
            when running_tasks.is_stale
                then format('task {} is still running, past the stale horizon', running_tasks.run_id)
            else format(
                'task {} has run {:.1f} h, over {} x the usual p90 of {:.1f} h',
                running_tasks.run_id,
                running_tasks.elapsed_seconds / 3600,
                instance_settings.stuck_factor,
                durations.p90_duration_seconds / 3600
            )
        end as message,
        cast(null as varchar) as metric,
        running_tasks.elapsed_seconds as value,
        instance_settings.stuck_factor * durations.p90_duration_seconds as baseline,
        running_tasks.run_id
    from running_tasks
    inner join instance_settings using (app_group, function_name, instance_name)
    left join durations using (app_group, function_name, instance_name)
    where running_tasks.is_stale
        or running_tasks.elapsed_seconds > instance_settings.stuck_factor * durations.p90_duration_seconds
    -- one alert per instance: its oldest stuck task
    qualify row_number() over (
        partition by running_tasks.app_group, running_tasks.function_name, running_tasks.instance_name
        order by running_tasks.start_time, running_tasks.run_id
    ) = 1

),

-- slow -------------------------------------------------------------------------------------------

newest_finished as (

    select * from finished_by_recency where recency = 1 and duration_seconds is not null

),

trailing_durations as (

    select
        newest_finished.app_group,
        newest_finished.function_name,
        newest_finished.instance_name,
        count(*) as finished_tasks,
        quantile_cont(earlier.duration_seconds, 0.9) as p90_duration_seconds
    from newest_finished
    inner join instance_settings using (app_group, function_name, instance_name)
    inner join finished_by_recency as earlier
        on earlier.app_group = newest_finished.app_group
        and earlier.function_name = newest_finished.function_name
        and earlier.instance_name = newest_finished.instance_name
        and earlier.recency > 1
        and earlier.duration_seconds is not null
        and epoch_ms(earlier.start_time)
        >= epoch_ms(newest_finished.start_time) - instance_settings.slow_window_days * 86400000
    group by newest_finished.app_group, newest_finished.function_name, newest_finished.instance_name

),

slow_alerts as (

    select
        'slow' as kind,
        newest_finished.app_group,
        newest_finished.function_name,
        newest_finished.instance_name,
        coalesce(newest_finished.end_time, newest_finished.start_time) as since,
        format(
            'the newest finished task {} took {:.1f} h, over {} x the p90 of {:.1f} h',
            newest_finished.run_id,
            newest_finished.duration_seconds / 3600,
            instance_settings.slow_factor,
            trailing_durations.p90_duration_seconds / 3600
        ) as message,
        cast(null as varchar) as metric,
        newest_finished.duration_seconds as value,
        instance_settings.slow_factor * trailing_durations.p90_duration_seconds as baseline,
        newest_finished.run_id
    from newest_finished
    inner join instance_settings using (app_group, function_name, instance_name)
    inner join trailing_durations using (app_group, function_name, instance_name)
    where trailing_durations.finished_tasks >= 5
        and newest_finished.duration_seconds
        > instance_settings.slow_factor * trailing_durations.p90_duration_seconds

),

-- metric_regression ------------------------------------------------------------------------------

directed_metrics as (

    select
        *,
        -- the metric's own name, its last path segment (metrics__recall -> recall)
        case
            when regexp_matches(
                regexp_extract(metric_name, '([a-z0-9_]+?)$', 1),
                '(^|_)(recall|auc|precision|ndcg|accuracy|coverage|hit_rate|f1|map|mrr)(_|$|[0-9])'
            ) then 1
            when regexp_matches(
                regexp_extract(metric_name, '([a-z0-9_]+?)$', 1),
                '(^|_)(loss|rmse|mae|mse|error|logloss)(_|$|[0-9])'
            ) then -1
        end as direction
    from metric_values

),

baselines as (

    select
        newest.app_group,
        newest.function_name,
        newest.instance_name,
        newest.metric_name,
        newest.run_id,
        newest.start_time,
        newest.metric_value,
        newest.direction,
        avg(previous.metric_value) as baseline_value,
        count(previous.metric_value) as baseline_runs
    from directed_metrics as newest
    inner join instance_settings using (app_group, function_name, instance_name)
    inner join directed_metrics as previous
        on previous.app_group = newest.app_group
        and previous.function_name = newest.function_name
        and previous.instance_name = newest.instance_name
        and previous.metric_name = newest.metric_name
        and previous.run_rank between 2 and 1 + instance_settings.metric_baseline_runs
    where newest.run_rank = 1 and newest.direction is not null
    group by all

),

metric_regression_alerts as (

    select
        'metric_regression' as kind,
        baselines.app_group,
        baselines.function_name,
        baselines.instance_name,
        baselines.start_time as since,
        format(
            '{} fell to {:.4g} against a mean of {:.4g} over the previous {} successful runs ({} is better)',
            baselines.metric_name,
            baselines.metric_value,
            baselines.baseline_value,
            baselines.baseline_runs,
            case when baselines.direction = 1 then 'higher' else 'lower' end
        ) as message,
        baselines.metric_name as metric,
        baselines.metric_value as value,
        baselines.baseline_value as baseline,
        baselines.run_id
    from baselines
    inner join instance_settings using (app_group, function_name, instance_name)
    where baselines.baseline_value is not null
        and (
            (
                baselines.direction = 1
                and baselines.metric_value
                < baselines.baseline_value - instance_settings.metric_threshold * abs(baselines.baseline_value)
            )
            or (
                baselines.direction = -1
                and baselines.metric_value
                > baselines.baseline_value + instance_settings.metric_threshold * abs(baselines.baseline_value)
            )
        )

),

-- load_freshness ---------------------------------------------------------------------------------

freshness as (

    select max(fetched_at) as newest_fetch from tasks

),

load_freshness_alerts as (

    select
        'load_freshness' as kind,
        cast(null as varchar) as app_group,
        cast(null as varchar) as function_name,
        cast(null as varchar) as instance_name,
        freshness.newest_fetch as since,
        format(
            'no task fetched for {:.1f} h (threshold {} h)',
            (epoch_ms(clock.now_time) - epoch_ms(freshness.newest_fetch)) / 3600000.0,
            settings.freshness_hours
        ) as message,
        cast(null as varchar) as metric,
        (epoch_ms(clock.now_time) - epoch_ms(freshness.newest_fetch)) / 3600000.0 as value,
        settings.freshness_hours as baseline,
        cast(null as varchar) as run_id
    from freshness
    cross join clock
    cross join settings
    where settings.app_group is null and settings.function_name is null and settings.instance_name is null
        and freshness.newest_fetch is not null
        and (epoch_ms(clock.now_time) - epoch_ms(freshness.newest_fetch)) / 3600000.0
        > settings.freshness_hours

),

final as (

    select kind, app_group, function_name, instance_name, since, message, metric, value, baseline, run_id
    from failure_streak_alerts
    union all
    select kind, app_group, function_name, instance_name, since, message, metric, value, baseline, run_id
    from silence_alerts
    union all
    select kind, app_group, function_name, instance_name, since, message, metric, value, baseline, run_id
    from stuck_alerts
    union all
    select kind, app_group, function_name, instance_name, since, message, metric, value, baseline, run_id
    from slow_alerts
    union all
    select kind, app_group, function_name, instance_name, since, message, metric, value, baseline, run_id
    from metric_regression_alerts
    union all
    select kind, app_group, function_name, instance_name, since, message, metric, value, baseline, run_id
    from load_freshness_alerts

)

select * from final
