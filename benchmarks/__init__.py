"""Benchmarks: each bench_*.py is runnable as `python -m benchmarks.<name>` or `jaxpeft bench <name>`."""
