-- Why training fails: the error messages of failed tasks per instance, most recent example first.
-- Grain: one row per (app_group, function_name, instance_name, error_message).
-- Messages come from the extend_info "errors" list: an object's message (its code when it has no
-- message) or a plain string. A failed task with no message counts under '(no error message)'.
-- A task with two different messages counts once under each; first/last_seen use start_time.
with

failed_tasks as (

    select
        app_group,
        function_name,
        instance_name,
        run_id,
        start_time,
        extend_info,
        is_extend_info_malformed
    from analytics.stg_function_tasks
    where is_failed

),

text_groups as (

    -- the failed tasks of each instance grouped by their extend_info text (a task has one text):
    -- the counts are taken once per text, and each text's messages are joined to its group
    select
        app_group,
        function_name,
        instance_name,
        extend_info,
        is_extend_info_malformed,
        count(run_id) as failed_tasks,
        min(start_time) as first_seen,
        max(start_time) as last_seen,
        arg_max(run_id, struct_pack(start_time, run_id)) as example_run_id,
        max(struct_pack(start_time, run_id)) filter (where run_id is not null) as example_order
    from failed_tasks
    group by app_group, function_name, instance_name, extend_info, is_extend_info_malformed

),

extend_infos as (

    -- failures repeat the same few texts: parse each distinct one once, not once per task
    select distinct
        extend_info,
        is_extend_info_malformed
    from text_groups
    where extend_info is not null

),

parsed_extend_infos as (

    select
        *,
        case
            when is_extend_info_malformed or not json_valid(extend_info) then null
            when json_type(extend_info) = 'OBJECT' then cast(extend_info as json)
        end as extend_info_json
    from extend_infos

),

error_lists as (

    select
        *,
        case
            when json_type(extend_info_json, '$.errors') = 'ARRAY'
                then json_extract(extend_info_json, '$.errors')
        end as errors_json
    from parsed_extend_infos

),

error_elements as (

    select
        error_lists.extend_info,
        error_lists.is_extend_info_malformed,
        nullif(
            trim(
                case
                    when element.type = 'VARCHAR' then element.value ->> '$'
                    when element.type = 'OBJECT'
                        then coalesce(
                            nullif(trim(element.value ->> 'message'), ''), element.value ->> 'code'
                        )
                end
            ),
            ''
        ) as error_message
    from error_lists, json_each(error_lists.errors_json) as element
    where error_lists.errors_json is not null

),

extend_info_messages as (

    select distinct
        extend_info,
        is_extend_info_malformed,
        error_message
    from error_elements
    where error_message is not null

),

messages as (

    -- a task counts once under each of its messages; one with none (no errors list, NULL or
    -- malformed extend_info) under '(no error message)'. Run ids are unique per instance
    -- (staging's grain), so adding up the texts' counts counts distinct runs.
    select
        text_groups.app_group,
        text_groups.function_name,
        text_groups.instance_name,
        coalesce(extend_info_messages.error_message, '(no error message)') as error_message,
        cast(sum(text_groups.failed_tasks) as bigint) as failed_tasks,
        min(text_groups.first_seen) as first_seen,
        max(text_groups.last_seen) as last_seen,
        arg_max(text_groups.example_run_id, text_groups.example_order) as example_run_id
    from text_groups
    left join extend_info_messages
        on extend_info_messages.extend_info = text_groups.extend_info
        and extend_info_messages.is_extend_info_malformed = text_groups.is_extend_info_malformed
    group by
        text_groups.app_group,
        text_groups.function_name,
        text_groups.instance_name,
        coalesce(extend_info_messages.error_message, '(no error message)')

),

final as (

    select
        app_group,
        function_name,
        instance_name,
        error_message,
        failed_tasks,
        first_seen,
        last_seen,
        example_run_id
    from messages

)

select * from final
