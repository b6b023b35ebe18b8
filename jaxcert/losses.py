"""Metric-learning losses: Triplet and TBT (CBIR paper Eq. 20).

All distances are unsquared Euclidean. ``safe_norm`` has a finite gradient at 0
(training only; certificates use exact norms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcert import distance
from jaxcert.interval import Interval

_TINY = 1e-12


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.sqrt(jnp.sum(x * x, axis=axis) + _TINY)


def triplet_loss(fa: jax.Array, fp: jax.Array, fn: jax.Array,
                 margin: float = 1.0) -> jax.Array:
  """``[d(a, p) - d(a, n) + margin]_+`` per triplet: fa, fp, fn [B, d] -> [B]."""
  return jax.nn.relu(safe_norm(fa - fp) - safe_norm(fa - fn) + margin)


def bound_gap(anchor_box: Interval, fa: jax.Array, fx: jax.Array) -> jax.Array:
  """Reg(a, x) of Eq. 20: ``max(|d - dbar_x(a)|, |d - dlow_x(a)|)`` -> [B].

  ``d = ||f(a) - f(x)||``; ``dbar_x(a)``, ``dlow_x(a)`` are the Thm 5 / 6 bounds
  from the anchor's feature box to the exact ``f(x)``. Zero iff the box is a point.
  """
  d = safe_norm(fa - fx)
  upper = jnp.sqrt(distance.upper_sq(anchor_box.lower, anchor_box.upper, fx) + _TINY)
  lower = jnp.sqrt(distance.lower_sq(anchor_box.lower, anchor_box.upper, fx) + _TINY)
  return jnp.maximum(jnp.abs(d - upper), jnp.abs(d - lower))


def tbt_loss(fa, fp, fn, anchor_box: Interval, kappa, margin: float = 1.0):
  """Eq. 20 per triplet: ``kappa T(a,p,n) + (1-kappa) (Reg(a,p) + Reg(a,n))``.

  Returns (loss [B], aux dict of per-term means).
  """
  t = triplet_loss(fa, fp, fn, margin)
  reg = bound_gap(anchor_box, fa, fp) + bound_gap(anchor_box, fa, fn)
  loss = kappa * t + (1.0 - kappa) * reg
  return loss, {"triplet": jnp.mean(t), "reg": jnp.mean(reg)}
