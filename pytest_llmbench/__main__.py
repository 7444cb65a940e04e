"""``python -m pytest_llmbench``: the command line is ``report/cli.py``."""
from pytest_llmbench.report.cli import main

raise SystemExit(main())
