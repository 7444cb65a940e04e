"""Scoring, inside the item process: scorer resolution, the built-in scorers and the code
judge (``codeexec``)."""
