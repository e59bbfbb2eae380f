"""clip_data: the data plane. Ingest image-text sources into validated, versioned Parquet shards."""
