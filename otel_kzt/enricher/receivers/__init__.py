"""OTLP receivers: thin transports (gRPC, HTTP) that decode one request and hand it to the core."""
