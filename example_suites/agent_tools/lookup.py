"""The example suite's lookup tool, run as a command: a query as JSON on stdin, the answer
on stdout, from ``corpus.json`` beside this file (``{"population of Lisbon": "545923"}``)."""

import json
import sys
from pathlib import Path

corpus = json.loads((Path(__file__).parent / "corpus.json").read_text(encoding="utf-8"))
query = " ".join(str(json.load(sys.stdin).get("query", "")).lower().split())
entries = {key.lower(): value for key, value in corpus.items()}
sys.stdout.write(entries.get(query, f"no entry for {query!r}") + "\n")
