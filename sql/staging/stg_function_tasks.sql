-- Staging: the newest version of every training task, typed, with status flags.
-- Grain: one row per (app_group, function_name, instance_name, run_id).
-- Every loaded column passes through under its own name (unknown extend_info__* columns included);
-- Parquet appends one version per load, so the newest (_dlt_load_id, then fetched_at) wins. A source
-- the build found to hold one row per task (raw.model_settings.source_has_one_row_per_task, checked
-- for the DuckDB table) has nothing to rank and is read as it is.
with

source as not materialized (

    select * from raw.function_tasks

),

model_settings as (

    select stale_after_hours, source_has_one_row_per_task, time_zone from raw.model_settings

),

only_versions as (

    -- each row its task's only version; the flag is a constant of the view, so DuckDB plans away
    -- whichever of this and ranked_versions does not apply
    select source.*
    from source
    cross join model_settings
    where model_settings.source_has_one_row_per_task

),

ranked_versions as (

    select
        source.*,
        row_number() over (
            partition by source.app_group, source.function_name, source.instance_name, source.run_id
            order by
                -- load ids are unix timestamps as text: compare as numbers, text breaks ties
                try_cast(source._dlt_load_id as double) desc nulls last,
                source._dlt_load_id desc nulls last,
                source.fetched_at desc nulls last,
                source._dlt_id desc nulls last
        ) as version_rank
    from source
    cross join model_settings
    where not model_settings.source_has_one_row_per_task

),

newest_versions as (

    select * from only_versions
    union all
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
                case
                    when cast(end_time_ms as bigint) >= cast(start_time_ms as bigint)
                        then (cast(end_time_ms as bigint) - cast(start_time_ms as bigint)) / 1000.0
                end
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
        -- the date in the configured time zone (model_settings.time_zone), whatever the session's;
        -- for UTC from epoch_us, which counts from 1970-01-01 UTC and is much cheaper than a
        -- time-zone conversion through the ICU calendar
        case
            when model_settings.time_zone = 'UTC'
                then cast(make_timestamp(epoch_us(typed.start_time)) as date)
            else cast(timezone(model_settings.time_zone, typed.start_time) as date)
        end as start_date
    from typed
    cross join model_settings

)

select * from flagged
