"""Benchmark suites for ds_dho2 (not tests): ``python -m benchmarks <suite> [--quick]``."""
