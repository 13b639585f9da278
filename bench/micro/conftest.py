"""The micro-benchmarks run with the CLI's threading policy: pytest loads this before the benchmarks load torch."""

from tide import passive_openmp

passive_openmp()
