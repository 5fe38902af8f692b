-- Staging: the newest version of every training task, typed, with status flags.
-- Grain: one row per (app_group, function_name, instance_name, run_id).
-- Every loaded column passes through under its own name (unknown extend_info__* columns included);
-- Parquet appends one version per load, so the newest (_dlt_load_id, then fetched_at) wins.
with

source as (

    select * from raw.function_tasks

),

model_settings as (

    select stale_after_hours from raw.model_settings

),

ranked_versions as (

    select
        *,
        row_number() over (
            partition by app_group, function_name, instance_name, run_id
            order by
                -- load ids are unix timestamps as text: compare as numbers, text breaks ties
                try_cast(_dlt_load_id as double) desc nulls last,
                _dlt_load_id desc nulls last,
                fetched_at desc nulls last,
                _dlt_id desc nulls last
        ) as version_rank
    from source

),

newest_versions as (

    select * exclude (version_rank)
    from ranked_versions
    where version_rank = 1

),

typed as (

    select
        * replace (
            -- ids
            cast(app_group as varchar) as app_group,
            cast(function_name as varchar) as function_name,
            cast(instance_name as varchar) as instance_name,
            cast(run_id as varchar) as run_id,
            cast(generation as varchar) as generation,
            lower(cast(status as varchar)) as status,
            cast(source_time_unit as varchar) as source_time_unit,
            cast(extend_info as varchar) as extend_info,
            cast(_dlt_load_id as varchar) as _dlt_load_id,
            cast(_dlt_id as varchar) as _dlt_id,
            -- numerics
            cast(progress as bigint) as progress,
            cast(start_time_ms as bigint) as start_time_ms,
            cast(end_time_ms as bigint) as end_time_ms,
            coalesce(
                cast(duration_seconds as double),
                (cast(end_time_ms as bigint) - cast(start_time_ms as bigint)) / 1000.0
            ) as duration_seconds,
            -- booleans
            coalesce(cast(is_extend_info_malformed as boolean), false) as is_extend_info_malformed,
            -- timestamps: fall back to the epoch-ms columns (dlt nulls ms values in timestamp columns)
            coalesce(
                cast(start_time as timestamptz),
                make_timestamptz(cast(start_time_ms as bigint) * 1000)
            ) as start_time,
            coalesce(
                cast(end_time as timestamptz),
                make_timestamptz(cast(end_time_ms as bigint) * 1000)
            ) as end_time,
            cast(fetched_at as timestamptz) as fetched_at
        )
    from newest_versions

),

flagged as (

    select
        typed.*,
        coalesce(typed.status in ('success', 'failed'), false) as is_finished,
        coalesce(typed.status = 'success', false) as is_succeeded,
        coalesce(typed.status = 'failed', false) as is_failed,
        coalesce(
            typed.status = 'running'
            -- in seconds as doubles: a huge setting must not overflow an interval
            and epoch(now()) - epoch(typed.start_time) > model_settings.stale_after_hours * 3600,
            false
        ) as is_stale,
        cast(timezone('UTC', typed.start_time) as date) as start_date
    from typed
    cross join model_settings

)

select * from flagged
