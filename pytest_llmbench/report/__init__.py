"""What a run tells: failure text, JUnit properties, exporters, the summary table, the CLI."""
