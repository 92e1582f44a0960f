"""The enrichment core both receivers call: name both ends, count, pair flow logs, re-serialise."""
