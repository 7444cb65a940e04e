"""Run wiring, in the pytest process (and each xdist worker): settings, store, engine,
leases and rate limits for one run; what plain tests get through the ``llm`` fixture."""
