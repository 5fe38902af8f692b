"""opensearch-tasks: Alibaba Cloud OpenSearch training-task history, loaded with dlt."""
