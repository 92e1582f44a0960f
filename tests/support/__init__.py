"""Test support shared across areas: the Kubernetes test API server and realistic object builders."""
