"""Helpers shared by the integration and fault tests: a worker process and its driver."""
