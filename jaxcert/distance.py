"""Distance bounds between a feature box and fixed feature vectors.

For a box ``[lower, upper]`` that contains every feature ``f(x + delta)`` of a
perturbed image and a fixed vector ``t``:

- Thm 5 (upper): ``max_{z in box} ||z - t|| = sqrt(sum_i max(|u_i - t_i|, |t_i - l_i|)^2)``
- Thm 6 (lower): ``min_{z in box} ||z - t|| = sqrt(sum_i max(0, l_i - t_i, t_i - u_i)^2)``

Both are attained by a point of the box (a vertex for the upper bound, the
projection of ``t`` for the lower one), so they are exact for the box and every
bit of slack comes from the box. Pairwise versions never materialise more than
``chunk x N x d`` elements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcert.interval import Interval


def upper_sq(lower, upper, t):
  """Squared Thm 5 bound, reduced over the last axis (broadcasting)."""
  return jnp.sum(jnp.maximum(jnp.abs(upper - t), jnp.abs(t - lower)) ** 2, axis=-1)


def lower_sq(lower, upper, t):
  """Squared Thm 6 bound, reduced over the last axis (broadcasting)."""
  gap = jnp.maximum(jnp.maximum(lower - t, t - upper), 0.0)
  return jnp.sum(gap ** 2, axis=-1)


def box_distance_bounds(box: Interval, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Elementwise (broadcasting) Thm 5 / Thm 6 bounds.

  box: lower/upper [..., d]; t: [..., d]. Returns (upper [...], lower [...]) with
  ``lower <= ||z - t|| <= upper`` for every z in the box.
  """
  return (jnp.sqrt(upper_sq(box.lower, box.upper, t)),
          jnp.sqrt(lower_sq(box.lower, box.upper, t)))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def pairwise_distance_bounds(box: Interval, points: jax.Array, *,
                             chunk_size: int = 16) -> tuple[jax.Array, jax.Array]:
  """Thm 5 / 6 for every (box row, point) pair.

  box: lower/upper [M, d]; points: [N, d]. Returns (upper [M, N], lower [M, N])
  where ``upper[m, n] >= max_{z in box_m} ||z - points_n||`` and
  ``lower[m, n] <= min_{z in box_m} ||z - points_n||``. Memory: chunk_size*N*d.
  """

  def row(lu):
    lo, up = lu
    return (jnp.sqrt(upper_sq(lo[None], up[None], points)),
            jnp.sqrt(lower_sq(lo[None], up[None], points)))

  return jax.lax.map(row, (box.lower, box.upper), batch_size=chunk_size)


@jax.jit
def pairwise_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances ``||a_m - b_n||``: a [M, d], b [N, d] -> [M, N].

  Computed from differences (not the ``|a|^2 + |b|^2 - 2ab`` expansion) so that
  the clean ranking is exact to float32 rounding of each difference.
  """
  return jax.lax.map(lambda x: jnp.sqrt(jnp.sum((x[None] - b) ** 2, axis=-1)), a,
                     batch_size=16)
