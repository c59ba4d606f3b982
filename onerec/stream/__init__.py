"""Streaming: dataset replay onto Kafka, ingestion into Feast, the DLQ, the reward joiner."""
