"""Entry point: ``python -m benchmarks <suite> [suite options]``."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "overlap": "benchmarks.overlap",
    "scaling": "benchmarks.memory_scaling",
    "convergence": "benchmarks.convergence",
    "curvature": "benchmarks.curvature",
    "stability": "benchmarks.stability",
    "defaults_search": "benchmarks.defaults_search",
    "subspace": "benchmarks.subspace",
    "zero3_memory": "benchmarks.memory_zero3",
    "regimes": "benchmarks.regimes",
    "map_stability": "benchmarks.map_stability",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(f"usage: python -m benchmarks {{{','.join(SUITES)}}} [--quick] [suite options]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUITES[argv[0]])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
