"""From numbers to savings (DESIGN §7): which change cuts billed traffic, by how much, and did it.

Pure values and rules (`model`, `recommend`, `history`, `engine`, `version`), the JSON layout of
`/api/v1/savings` (`jsonform`), and `otel-kzt report` (`report`, `command`). The enricher feeds `Engine`;
nothing here imports the enricher.
"""
