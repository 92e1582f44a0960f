"""`otel-kzt demo`: a simulated multi-zone cluster on this machine, and the end-to-end test bed.

cluster (values) -> workloads (the story) -> topology (namespaces) + metadata (the List file) -> runner
(enricher, agents, traffic) -> view (the terminal table) <- command (flags).
"""
