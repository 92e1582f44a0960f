"""Where enriched data leaves: OTLP re-export to downstream endpoints, the Prometheus exposition."""
