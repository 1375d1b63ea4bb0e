"""Real gloo ranks for the tests: see :mod:`ds_dho2.dist.local_ranks`."""

from ds_dho2.dist.local_ranks import _rank_main, free_port, run_ranks  # noqa: F401 - _rank_main: spawn target

__all__ = ["free_port", "run_ranks"]
