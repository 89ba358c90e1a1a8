"""Python client for steer-serve (filled in by the client issue)."""
