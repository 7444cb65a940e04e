"""Running items. ``scheduler``/``inflight`` run in the pytest process (what is in flight,
deadlines, stragglers, claims, lookahead); ``forkserver`` is a separate small interpreter
that forks item hosts; ``child``/``runner`` run inside an item process (render -> model ->
score -> store)."""
