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

parsed_tasks as (

    select
        *,
        case
            when is_extend_info_malformed or not json_valid(extend_info) then null
            when json_type(extend_info) = 'OBJECT' then cast(extend_info as json)
        end as extend_info_json
    from failed_tasks

),

error_lists as (

    select
        *,
        case
            when json_type(extend_info_json, '$.errors') = 'ARRAY'
                then json_extract(extend_info_json, '$.errors')
        end as errors_json
    from parsed_tasks

),

error_elements as (

    select
        error_lists.app_group,
        error_lists.function_name,
        error_lists.instance_name,
        error_lists.run_id,
        error_lists.start_time,
        nullif(
            trim(
                case
                    when element.type = 'VARCHAR' then element.value ->> '$'
                    when element.type = 'OBJECT'
                        then coalesce(element.value ->> 'message', element.value ->> 'code')
                end
            ),
            ''
        ) as error_message
    from error_lists, json_each(error_lists.errors_json) as element
    where error_lists.errors_json is not null

),

task_messages as (

    select distinct
        app_group,
        function_name,
        instance_name,
        run_id,
        start_time,
        error_message
    from error_elements
    where error_message is not null

),

tasks_without_message as (

    select
        failed_tasks.app_group,
        failed_tasks.function_name,
        failed_tasks.instance_name,
        failed_tasks.run_id,
        failed_tasks.start_time,
        '(no error message)' as error_message
    from failed_tasks
    anti join task_messages
        on task_messages.app_group = failed_tasks.app_group
        and task_messages.function_name = failed_tasks.function_name
        and task_messages.instance_name = failed_tasks.instance_name
        and task_messages.run_id = failed_tasks.run_id

),

all_task_messages as (

    select * from task_messages
    union all by name
    select * from tasks_without_message

),

messages as (

    select
        app_group,
        function_name,
        instance_name,
        error_message,
        count(distinct run_id) as failed_tasks,
        min(start_time) as first_seen,
        max(start_time) as last_seen,
        arg_max(run_id, struct_pack(start_time, run_id)) as example_run_id
    from all_task_messages
    group by app_group, function_name, instance_name, error_message

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
