"""xdist workers forked from a template process instead of started from nothing.

Every ``pytest -n W`` worker is a new Python that imports pytest, its plugins and their
dependencies before it can collect a single item: ~0.2 CPU-s each, which on a machine with
fewer cores than workers is most of the run's start-up (32 workers on 2 cores: ~10 s).
The controller starts one *template* process (``template.py``) that imports those modules
once; xdist's ``popen`` gateways then run ``launch.py`` instead of Python, which asks the
template to fork a worker wired to the launcher's pipes. The worker runs execnet's own
bootstrap from there on, exactly as a fresh interpreter would.

``controller.py`` decides (``--llmbench-worker-fork``), starts the template and rewrites
the ``--tx`` specs. Both scripts run by path and import nothing from this package: a
``pytest_llmbench`` module already imported in a worker could not be assertion-rewritten
(pytest warns about it).
"""
