"""Load-testing harness for steer-serve (``steer-loadtest``): open/closed-loop runs, latency stats, cross-talk check."""
from steer_loadtest.harness import LoadConfig, run_loadtest

__all__ = ["LoadConfig", "run_loadtest"]
