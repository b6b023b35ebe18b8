"""Distance bounds between a feature box and fixed feature vectors.

For a box ``[lower, upper]`` that contains every feature ``f(x + delta)`` of a
perturbed image and a fixed vector ``t``:

- Thm 5 (upper): ``max_{z in box} ||z - t|| = sqrt(sum_i max(|u_i - t_i|, |t_i - l_i|)^2)``
- Thm 6 (lower): ``min_{z in box} ||z - t|| = sqrt(sum_i max(0, l_i - t_i, t_i - u_i)^2)``

Both are attained by a point of the box (a vertex for the upper bound, the
projection of ``t`` for the lower one), so they are exact for the box and every
bit of slack comes from the box. Pairwise versions never materialise more than
``chunk x N x d`` elements. ``t`` may also be a box ``[t_lo, t_hi]`` (e.g. the
fp-sound box of a clean feature): then ``max(u_i - t_lo_i, t_hi_i - l_i)`` and
``max(0, l_i - t_hi_i, t_lo_i - u_i)`` replace the per-coordinate terms, which is
again exact over both boxes.

``fp_sound=True`` makes the returned numbers bounds despite float rounding
(error model of :mod:`jaxcert.interval`): the upper bound is ``>=`` and the lower
bound ``<=`` both the exact distance of every pair of points of the boxes and the
float distance ``fl(sqrt(sum (z - t)^2))`` that :func:`pairwise_distances` computes
for them (see ``_sound_bounds``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcert.interval import Interval, _add_up, _clean, _format, _mul_up, _next, _sub_down


def upper_sq(lower, upper, t):
  """Squared Thm 5 bound, reduced over the last axis (broadcasting)."""
  return jnp.sum(jnp.maximum(jnp.abs(upper - t), jnp.abs(t - lower)) ** 2, axis=-1)


def lower_sq(lower, upper, t):
  """Squared Thm 6 bound, reduced over the last axis (broadcasting)."""
  gap = jnp.maximum(jnp.maximum(lower - t, t - upper), 0.0)
  return jnp.sum(gap ** 2, axis=-1)


def _sound_bounds(lower, upper, t_lo, t_hi) -> tuple[jax.Array, jax.Array]:
  """Float-sound Thm 5 / 6 (box vs box, broadcasting, reduced over the last axis).

  With ``d`` coordinates, ``g = gamma_{d+1}``, ``A = 4 d tau (1 + g)`` (squares and
  additions of any summation order, FTZ/DAZ as in ``interval._fp_affine``):

  - upper: ``m_i >= max(u_i - t_lo_i, t_hi_i - l_i)`` by one rounding moved up, so
    ``|z_i - t_i| <= m_i`` and, rounding being monotone, ``|fl(z_i - t_i)| <= m_i``
    for all ``z``, ``t`` in the boxes (as read: end points are cleaned of
    subnormals, so a flushed operand stays inside). Both the exact ``sum (z - t)^2
    <= sum m^2`` and the float ``fl(sum fl(z - t)^2) <= (1 + g) sum m^2 + A`` are at
    most ``(1 + g) / (1 - g) (S + A) + A`` with ``S = fl(sum m^2)``; that is
    evaluated rounding up, its (correctly rounded, monotone) square root moved up
    two floats (one to spare for a faithful sqrt).
  - lower: ``g_i <= max(0, l_i - t_hi_i, t_lo_i - u_i)`` rounded down, so
    ``|z_i - t_i| >= g_i`` and ``|fl(z_i - t_i)| >= g_i``; both squared sums are at
    least ``(1 - g) / (1 + g) (S - A) - A`` with ``S = fl(sum g^2)``, evaluated
    rounding down, clipped at 0, its square root moved down two floats.
  """
  fmt = _format(jnp.result_type(lower, upper, t_lo, t_hi), "distance bounds")
  dtype = fmt.dtype
  d = jnp.broadcast_shapes(jnp.shape(lower), jnp.shape(t_lo))[-1]
  g = fmt.gamma(d + 1)
  a = 4 * d * fmt.tau * (1 + g)
  l1, u1 = _clean(jnp.asarray(lower, dtype), False), _clean(jnp.asarray(upper, dtype), True)
  l2, u2 = _clean(jnp.asarray(t_lo, dtype), False), _clean(jnp.asarray(t_hi, dtype), True)
  m = jnp.maximum(_next(u1 - l2, True), _next(u2 - l1, True))
  gap = jnp.maximum(jnp.maximum(_next(l1 - u2, False), _next(l2 - u1, False)), 0)
  c_up, c_lo = (1 + g) / (1 - g), (1 - g) / (1 + g)
  sq_up = _add_up(_mul_up(jnp.sum(m * m, axis=-1), c_up), fmt.up(c_up * a + a))
  s_lo = _clean(jnp.sum(gap * gap, axis=-1), False)
  sq_lo = _sub_down(_next(s_lo * fmt.down(c_lo), False), fmt.up(c_lo * a + a))
  sq_lo = jnp.maximum(sq_lo, 0)
  up = _next(_next(jnp.sqrt(sq_up), True), True)
  lo = jnp.maximum(_next(_next(jnp.sqrt(sq_lo), False), False), 0)
  return up, lo


def _t_ends(t) -> tuple[jax.Array, jax.Array]:
  return (t.lower, t.upper) if isinstance(t, Interval) else (t, t)


def _bounds(lower, upper, t, fp_sound: bool) -> tuple[jax.Array, jax.Array]:
  if fp_sound:
    return _sound_bounds(lower, upper, *_t_ends(t))
  if not isinstance(t, Interval):
    return jnp.sqrt(upper_sq(lower, upper, t)), jnp.sqrt(lower_sq(lower, upper, t))
  far = jnp.maximum(upper - t.lower, t.upper - lower)
  gap = jnp.maximum(jnp.maximum(lower - t.upper, t.lower - upper), 0.0)
  return jnp.sqrt(jnp.sum(far ** 2, axis=-1)), jnp.sqrt(jnp.sum(gap ** 2, axis=-1))


def box_distance_bounds(box: Interval, t: jax.Array | Interval, *,
                        fp_sound: bool = False) -> tuple[jax.Array, jax.Array]:
  """Elementwise (broadcasting) Thm 5 / Thm 6 bounds.

  box: lower/upper [..., d]; t: [..., d] (or an Interval of that shape). Returns
  (upper [...], lower [...]) with ``lower <= ||z - t|| <= upper`` for every z in the
  box (and t in its box); ``fp_sound`` as in the module docstring.
  """
  return _bounds(box.lower, box.upper, t, fp_sound)


@functools.partial(jax.jit, static_argnames=("chunk_size", "fp_sound"))
def pairwise_distance_bounds(box: Interval, points: jax.Array | Interval, *,
                             chunk_size: int = 16,
                             fp_sound: bool = False) -> tuple[jax.Array, jax.Array]:
  """Thm 5 / 6 for every (box row, point) pair.

  box: lower/upper [M, d]; points: [N, d], or an Interval [N, d] of point boxes.
  Returns (upper [M, N], lower [M, N]) where ``upper[m, n] >= max_{z in box_m}
  ||z - points_n||`` and ``lower[m, n] <= min_{z in box_m} ||z - points_n||``
  (over the point's box too). ``fp_sound``: the module docstring. Memory:
  chunk_size*N*d.
  """

  def row(lu):
    lo, up = lu
    return _bounds(lo[None], up[None], points, fp_sound)

  return jax.lax.map(row, (box.lower, box.upper), batch_size=chunk_size)


@jax.jit
def pairwise_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances ``||a_m - b_n||``: a [M, d], b [N, d] -> [M, N].

  Computed from differences (not the ``|a|^2 + |b|^2 - 2ab`` expansion) so that
  the clean ranking is exact to float32 rounding of each difference.
  """
  return jax.lax.map(lambda x: jnp.sqrt(jnp.sum((x[None] - b) ** 2, axis=-1)), a,
                     batch_size=16)
