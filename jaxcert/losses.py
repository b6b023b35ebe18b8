"""Training losses of the CBIR paper: Triplet, TBT (Eq. 20), FCTB (Eq. 21) and the
baselines ACT (Zhou et al., anti-collapse triplet) and C-IBP (Gowal et al.).

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


def fctb_loss(f1, f1_ref, f2, box1: Interval, kappa):
  """Eq. 21 per candidate pair: ``kappa d(f0(c1), f(c1)) + (1-kappa) Reg(c1, c2)``.

  f1 = f(c1), f1_ref = f0(c1) (the frozen pre-trained extractor), f2 = f(c2),
  box1 = IBP box of f(c1 + delta). Returns (loss [B], aux dict of term means).
  """
  keep = safe_norm(f1 - f1_ref)
  reg = bound_gap(box1, f1, f2)
  loss = kappa * keep + (1.0 - kappa) * reg
  return loss, {"keep": jnp.mean(keep), "reg": jnp.mean(reg)}


def collapse_distance(fp: jax.Array, fn: jax.Array) -> jax.Array:
  """ACT's attack objective: ``d(f(p'), f(n'))``, minimised by PGD on (p', n') -> [B]."""
  return safe_norm(fp - fn)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example: logits [B, C], integer labels [B] -> [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def elided_worst_logits(box: Interval, w: jax.Array, b: jax.Array,
                        labels: jax.Array) -> jax.Array:
  """Worst-case logits of a linear head over an embedding box, with elision.

  For the head ``z = f W + b`` (W [d, C]) and true class y, the specification
  ``z_y - z_j`` is linear in f, so it is folded into the last layer (Gowal et al.):
  its exact minimum over the box is ``c . (w_y - w_j) - r . |w_y - w_j| + b_y - b_j``
  (c, r the box centre and radius). Returns ``-min(z_y - z_j)`` per class [B, C]
  (0 at j = y): the logits of the worst case, fed to the cross-entropy.
  """
  diff = w.T[labels][:, None, :] - w.T[None]              # [B, C, d]: w_y - w_j
  lower = (jnp.einsum("bcd,bd->bc", diff, box.center)
           - jnp.einsum("bcd,bd->bc", jnp.abs(diff), box.radius)
           + (b[labels][:, None] - b[None]))
  return -lower


def naive_worst_logits(box: Interval, w: jax.Array, b: jax.Array,
                       labels: jax.Array) -> jax.Array:
  """Worst-case logits without elision: the head's logit box ``[zl, zu]`` (IBP through
  ``f W + b``), then ``zu_j - zl_y`` per class (0 at j = y). Never below the elided
  values, usually far above: it ignores that z_y and z_j move together. -> [B, C]."""
  zc = box.center @ w + b
  zr = box.radius @ jnp.abs(w)
  lower_y = jnp.take_along_axis(zc - zr, labels[:, None], axis=1)
  worst = zc + zr - lower_y
  return jnp.where(jnp.arange(w.shape[1])[None] == labels[:, None], 0.0, worst)


def cibp_loss(features, box: Interval, w, b, labels, kappa, elision: bool = True):
  """C-IBP: ``kappa CE(f W + b, y) + (1 - kappa) CE(worst-case logits, y)`` -> [B], aux.

  ``elision`` (Gowal et al.'s choice) uses ``elided_worst_logits``; without it the
  looser ``naive_worst_logits``.
  """
  clean = cross_entropy(features @ w + b, labels)
  worst_fn = elided_worst_logits if elision else naive_worst_logits
  robust = cross_entropy(worst_fn(box, w, b, labels), labels)
  loss = kappa * clean + (1.0 - kappa) * robust
  return loss, {"ce_clean": jnp.mean(clean), "ce_robust": jnp.mean(robust)}
