"""Coordination across processes and runs: rate limits, resource leases, process identity
and process-tree control."""
