"""Timing helper shared by the benchmarks."""

import statistics
import time

import jax


def median_time(fn, repeats: int = 3) -> float:
  """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up (compile) run.

  Waits for asynchronous JAX results, so device time is included.
  """
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)
