"""The result store: per-item records, claims (exactly-once), the shard index."""
