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


# ------------------------------------------------- RetrievalGuard (MATH.md B)


def margin_loss(d_ap: jax.Array, d_an: jax.Array, beta: jax.Array,
                gamma: float = 0.2) -> jax.Array:
  """Margin loss (Wu et al. 2017): ``[gamma + D_ap - beta]_+ + [gamma - D_an + beta]_+``.

  Unsquared distances; ``beta`` is the learnable boundary between positive and
  negative distances.
  """
  return jax.nn.relu(gamma + d_ap - beta) + jax.nn.relu(gamma - d_an + beta)


def distance_weighted_log_weights(dist: jax.Array, dim: int, *, cutoff: float = 0.5,
                                  nonzero_loss_cutoff: float = 1.4) -> jax.Array:
  """log of Wu et al.'s negative-sampling weights ``1 / q(D)`` for unit embeddings.

  ``q(D) ~ D^{d-2} (1 - D^2/4)^{(d-3)/2}`` is the density of pairwise distances of
  points uniform on the sphere in R^d; D is clipped below at ``cutoff``; pairs with
  ``D >= nonzero_loss_cutoff`` (zero loss) get weight 0 (-inf). dist [...] -> [...].
  """
  d = jnp.clip(dist, cutoff, 2.0 - 1e-4)
  log_q = (dim - 2.0) * jnp.log(d) + 0.5 * (dim - 3.0) * jnp.log1p(-0.25 * d * d)
  return jnp.where(dist < nonzero_loss_cutoff, -log_q, -jnp.inf)


def margin_loss_batch(key: jax.Array, feats: jax.Array, labels: jax.Array,
                      beta: jax.Array, gamma: float = 0.2, *, cutoff: float = 0.5,
                      nonzero_loss_cutoff: float = 1.4):
  """Mean margin loss over every positive pair (i, j) of a class-balanced batch, each
  with one negative for anchor i drawn by distance-weighted sampling (not
  differentiated through); falls back to a uniform negative when every negative of
  the anchor is past ``nonzero_loss_cutoff``.

  feats [B, d] (L2-normalised), labels [B]. Returns (loss, aux).
  """
  b, dim = feats.shape
  dist = safe_norm(feats[:, None, :] - feats[None, :, :])               # [B, B]
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(b, dtype=bool)
  logw = jax.lax.stop_gradient(distance_weighted_log_weights(
      dist, dim, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff))
  logw = jnp.where(same, -jnp.inf, logw)
  any_ok = jnp.any(jnp.isfinite(logw), axis=1, keepdims=True)
  logw = jnp.where(any_ok, logw, jnp.where(same, -jnp.inf, 0.0))
  logw = logw - jnp.max(logw, axis=1, keepdims=True)
  neg = jax.random.categorical(key, jnp.broadcast_to(logw[:, None, :], (b, b, b)))
  d_an = jnp.take_along_axis(dist, neg, axis=1)                         # [B, B]: (i, j)
  per = margin_loss(dist, d_an, beta, gamma)
  npos = jnp.maximum(jnp.sum(pos), 1)
  loss = jnp.sum(jnp.where(pos, per, 0.0)) / npos
  aux = {"d_ap": jnp.sum(jnp.where(pos, dist, 0.0)) / npos,
         "d_an": jnp.sum(jnp.where(pos, d_an, 0.0)) / npos,
         "beta": beta}
  return loss, aux
