"""What the enricher remembers: the series table, the counting rule, and the --state-file checkpoint."""
