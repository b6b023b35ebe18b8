"""PGD ranking attacks and empirical robust Recall@K (CBIR paper Eq. 2, 4, 23, 24).

Both attacks run projected sign-gradient descent inside the l_inf ball of radius
eps intersected with [0, 1] (step ``eps / 10``, 100 steps in the paper), batched
and jitted:

- QA (Eq. 2): each query q gets one target candidate t of another class and
  minimises ``sum_c [d(f(q + delta), f(t)) - d(f(q + delta), f(c))]_+`` (t rises).
- CA (Eq. 4): for each query q, source candidates c_s of other classes are each
  perturbed to minimise ``sum_c [d(f(q), f(c_s + delta)) - d(f(q), f(c))]_+``.

An attack gives an upper bound on robust recall (ER-Recall); a certificate gives
a lower bound (CR-Recall), so ``CR <= ER`` must hold for every model and K.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcert import distance, losses, metrics, models, ranks, validate


def pgd(loss_fn: Callable[[jax.Array], jax.Array], x: jax.Array, eps, *, steps: int,
        step_size, restarts: int = 1, key: jax.Array | None = None,
        random_start: bool = False, unroll: bool = True,
        start: jax.Array | None = None) -> jax.Array:
  """Minimises ``loss_fn(x_adv).sum()`` over ``|x_adv - x|_inf <= eps``, x_adv in [0, 1].

  loss_fn maps a batch [B, ...] to per-example losses [B]; examples are attacked
  independently. The first run starts at x (at a uniform random point of the
  ball if ``random_start``), each further restart at a uniform random point
  (``key`` required for either); per example, the iterate with the lowest final
  loss is returned. ``start`` (a point of the ball, shaped like x) replaces the first
  run's start, e.g. a random start drawn by the caller for a whole batch before it is
  split over devices.

  The step loop is unrolled by default: XLA's CPU backend runs a rolled loop of
  convolutions several times slower (``bench/attack_throughput.py`` measures both),
  and compiling 100 unrolled steps takes a few seconds.
  """
  lo, hi = jnp.clip(x - eps, 0.0, 1.0), jnp.clip(x + eps, 0.0, 1.0)
  grad = jax.grad(lambda z: jnp.sum(loss_fn(z)))

  def body(_, z):
    return jnp.clip(z - step_size * jnp.sign(grad(z)), lo, hi)

  if start is not None and random_start:
    raise ValueError("pgd: pass either start or random_start=True, not both")
  start = x if start is None else start
  if random_start:
    if key is None:
      raise ValueError("pgd: random_start needs a PRNG key")
    key, sub = jax.random.split(key)
    start = jax.random.uniform(sub, x.shape, x.dtype, lo, hi)
  best = jax.lax.fori_loop(0, steps, body, start, unroll=unroll)
  if restarts > 1:
    if key is None:
      raise ValueError("pgd: restarts > 1 needs a PRNG key")
    best_loss = loss_fn(best)
    for k in jax.random.split(key, restarts - 1):
      z = jax.lax.fori_loop(0, steps, body, jax.random.uniform(k, x.shape, x.dtype, lo, hi),
                            unroll=unroll)
      z_loss = loss_fn(z)
      better = (z_loss < best_loss).reshape((-1,) + (1,) * (x.ndim - 1))
      best, best_loss = jnp.where(better, z, best), jnp.minimum(z_loss, best_loss)
  return best


def _rise_loss(f_moving: jax.Array, f_fixed: jax.Array, cand_features: jax.Array,
               sign: float = 1.0):
  """Eq. 2 summand: ``sum_c [d(a, b) - d(a, f(c))]_+`` for rows a = f(q + delta), b = f(t).

  Minimising it raises t; with ``sign = -1`` (``sum_c [d(a, f(c)) - d(a, b)]_+``) it
  lowers t (the paper's maximisation variant of Eq. 1). -> [B].
  """
  d_ab = losses.safe_norm(f_moving - f_fixed)
  d_ac = losses.safe_norm(f_moving[:, None, :] - cand_features[None], axis=-1)
  return jnp.sum(jax.nn.relu(sign * (d_ab[:, None] - d_ac)), axis=1)


@functools.partial(jax.jit, static_argnames=("apply", "steps", "sign", "restarts"))
def _qa_batch(apply, params, q, target_features, cand_features, eps, step_size, steps,
              sign=1.0, restarts=1, key=None):
  loss = lambda z: _rise_loss(apply(params, z), target_features, cand_features, sign)
  return pgd(loss, q, eps, steps=steps, step_size=step_size, restarts=restarts, key=key)


@functools.partial(jax.jit, static_argnames=("apply", "steps", "restarts"))
def _ca_batch(apply, params, sources, query_features, cand_features, eps, step_size, steps,
              restarts=1, key=None):
  d_qc = losses.safe_norm(query_features[:, None, :] - cand_features[None], axis=-1)

  def loss(z):  # Eq. 4; d(f(q), f(c)) does not depend on the perturbation
    d_qs = losses.safe_norm(query_features - apply(params, z))
    return jnp.sum(jax.nn.relu(d_qs[:, None] - d_qc), axis=1)

  return pgd(loss, sources, eps, steps=steps, step_size=step_size, restarts=restarts,
             key=key)


def _batches(n: int, size: int):
  for i in range(0, n, size):
    yield slice(i, min(i + size, n))


def _other_class(rng, query_labels, cand_labels, count: int) -> np.ndarray:
  """[Q, count] candidate indices of another class than each query (no repeats)."""
  out = np.empty((len(query_labels), count), np.int64)
  for i, y in enumerate(query_labels):
    pool = np.flatnonzero(cand_labels != y)
    if len(pool) < count:
      raise ValueError(f"query {i} has {len(pool)} candidates of other classes, "
                       f"fewer than the {count} the attack needs")
    out[i] = rng.choice(pool, count, replace=False)
  return out


def query_attack(apply, params, queries, query_labels, cand_features, cand_labels, eps, *,
                 steps: int = 100, step_size=None, seed: int = 0, restarts: int = 1,
                 batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """Eq. 2 on every query. Returns (attacked queries [Q, ...], target indices [Q])."""
  eps = validate.check_eps(eps)
  step_size = eps / 10 if step_size is None else step_size
  targets = _other_class(np.random.default_rng(seed), np.asarray(query_labels),
                         np.asarray(cand_labels), 1)[:, 0]
  cf = jnp.asarray(cand_features)
  out = np.empty_like(np.asarray(queries))
  for sl in _batches(len(queries), batch_size):
    key = jax.random.fold_in(jax.random.key(seed), sl.start)
    out[sl] = np.asarray(_qa_batch(apply, params, jnp.asarray(queries[sl]), cf[targets[sl]],
                                   cf, eps, step_size, steps, restarts=restarts, key=key))
  return out, targets


def candidate_attack(apply, params, query_features, query_labels, candidates, cand_features,
                     cand_labels, eps, *, num_sources: int = 100, steps: int = 100,
                     step_size=None, seed: int = 0, restarts: int = 1,
                     batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """Eq. 4: for each query, ``num_sources`` other-class candidates rise for it.

  Returns (sources [Q, S] candidate indices, attacked features [Q, S, d]).
  """
  eps = validate.check_eps(eps)
  step_size = eps / 10 if step_size is None else step_size
  sources = _other_class(np.random.default_rng(seed + 1), np.asarray(query_labels),
                         np.asarray(cand_labels), num_sources)
  qf, cf = jnp.asarray(query_features), jnp.asarray(cand_features)
  flat_src = sources.reshape(-1)
  flat_q = np.repeat(np.arange(len(query_features)), num_sources)
  feats = np.empty((len(flat_src), cf.shape[1]), np.float32)
  for sl in _batches(len(flat_src), batch_size):
    key = jax.random.fold_in(jax.random.key(seed + 1), sl.start)
    adv = _ca_batch(apply, params, jnp.asarray(candidates[flat_src[sl]]), qf[flat_q[sl]], cf,
                    eps, step_size, steps, restarts=restarts, key=key)
    feats[sl] = np.asarray(apply(params, adv))
  return sources, feats.reshape(len(query_features), num_sources, -1)


def er_recall_qa(attacked_query_features, cand_features, query_labels, cand_labels, ks):
  """Eq. 23: Recall@K of the attacked queries against the clean gallery."""
  _, rank = ranks.clean_ranks(distance.pairwise_distances(attacked_query_features,
                                                          cand_features))
  return metrics.recall_at_k(rank, query_labels, cand_labels, ks)


def er_recall_ca(query_features, cand_features, sources, attacked_source_features,
                 query_labels, cand_labels, ks):
  """Eq. 24: per query, its sources are replaced by their attacked versions."""
  dist = np.array(distance.pairwise_distances(query_features, cand_features))
  d_src = np.linalg.norm(np.asarray(query_features)[:, None, :] - attacked_source_features,
                         axis=-1)
  np.put_along_axis(dist, sources, d_src, axis=1)
  _, rank = ranks.clean_ranks(jnp.asarray(dist))
  return metrics.recall_at_k(rank, query_labels, cand_labels, ks)


def _claims(bounds, clean_rank, query_labels, cand_labels, ks):
  """The certified claims behind CR-Recall@K: ({K: [Q, N] bool}, (q, c) index arrays of
  the pairs certified at some K)."""
  ks = validate.check_ks(ks, clean_rank.shape[1])
  claims = {k: np.asarray(metrics.certified_pairs(bounds, clean_rank, query_labels,
                                                  cand_labels, k)) for k in ks}
  qi, ci = np.nonzero(np.any(np.stack(list(claims.values())), axis=0))
  return claims, qi, ci


def _score(claims, qi, ci, clean_rank, worst_low, worst_high) -> dict:
  """Counts the claims that the attacked ranks of each pair (qi, ci) break: a claim at K
  for a pair of clean rank j holds while ``2j - K <= rank <= K``."""
  j = clean_rank[qi, ci]
  count = broken = 0
  for k, ok in claims.items():
    mine = ok[qi, ci]
    count += int(mine.sum())
    broken += int(np.sum(mine & ((worst_low > k) | (worst_high < 2 * j - k))))
  return {"claims": count, "broken": broken, "attacked_pairs": int(len(qi)),
          "max_rank_increase": int(np.max(worst_low - j, initial=0)),
          "max_rank_decrease": int(np.max(j - worst_high, initial=0))}


def _before(d_a, i_a, d_b, i_b):
  """Does (distance d_a, index i_a) rank before (d_b, i_b)? Ties go to the lower index,
  as in ``ranks.clean_ranks``."""
  return (d_a < d_b) | ((d_a == d_b) & (i_a < i_b))


def audit_qa(apply, params, queries, cand_features, bounds: ranks.RankBounds, clean_rank,
             query_labels, cand_labels, ks, eps, *, steps: int = 100, step_size=None,
             restarts: int = 1, seed: int = 0, batch_size: int = 128) -> dict:
  """Attacks every certified QA claim behind CR-Recall@K (Eq. 25) and counts broken ones.

  A claim is a same-class candidate c at clean rank j in the top K of query q that
  the verifier certifies with alpha = K - j, i.e. ``2j - K <= Rank <= K`` under
  every query perturbation. Each certified (q, c) pair is attacked twice with PGD
  on the query: c pushed down (Eq. 1 maximised) and pushed up (Eq. 2); the ranks
  reached are checked against the claims of that pair at every K. A claim is
  broken if an attack reaches a rank outside it. Returns counts; ``broken`` must
  be 0 for sound certificates.
  """
  eps = validate.check_eps(eps)
  step_size = eps / 10 if step_size is None else step_size
  clean_rank = np.asarray(clean_rank)
  claims, qi, ci = _claims(bounds, clean_rank, query_labels, cand_labels, ks)
  cf = jnp.asarray(cand_features)
  idx = jnp.arange(cf.shape[0])
  worst_low = np.zeros(len(qi), np.int64)   # largest rank reached (pushed down)
  worst_high = np.zeros(len(qi), np.int64)  # smallest rank reached (pushed up)
  for sl in _batches(len(qi), batch_size):
    x, t = jnp.asarray(queries[qi[sl]]), jnp.asarray(ci[sl])
    for sign, out in ((-1.0, worst_low), (1.0, worst_high)):
      key = jax.random.fold_in(jax.random.key(seed + 2), sl.start)
      adv = _qa_batch(apply, params, x, cf[t], cf, eps, step_size, steps, sign=sign,
                      restarts=restarts, key=key)
      d = distance.pairwise_distances(models.embed(apply, params, np.asarray(adv)), cf)
      d_t = jnp.take_along_axis(d, t[:, None], axis=1)
      ahead = _before(d, idx[None], d_t, t[:, None]) & (idx[None] != t[:, None])
      out[sl] = np.asarray(1 + jnp.sum(ahead, axis=1))
  return _score(claims, qi, ci, clean_rank, worst_low, worst_high)


@functools.partial(jax.jit, static_argnames=("apply", "steps", "restarts"))
def _distance_batch(apply, params, x, target_features, eps, step_size, steps, sign,
                    restarts=1, key=None):
  """PGD on each image x_i: minimises ``sign * ||f(x_i + delta) - t_i||`` (sign +1 pulls
  the image toward its target feature t_i, -1 pushes it away)."""
  loss = lambda z: sign * losses.safe_norm(apply(params, z) - target_features)
  return pgd(loss, x, eps, steps=steps, step_size=step_size, restarts=restarts, key=key)


def audit_ca(apply, params, query_features, candidates, cand_features,
             bounds: ranks.RankBounds, clean_rank, query_labels, cand_labels, ks, eps, *,
             pool: int = 50, steps: int = 100, step_size=None, restarts: int = 1,
             seed: int = 0, batch_size: int = 128) -> dict:
  """Attacks every certified CA claim behind CR-Recall@K (Eq. 25) and counts broken ones.

  Under a candidate attack each candidate has its own perturbation and the query
  is clean, so the worst case for a claim "c_hat keeps a rank in [2j - K, K]"
  decomposes per candidate: push c_hat as far from q as possible and every other
  candidate as near as possible (and the reverse for the lower limit). For each
  query with a claim, PGD pulls toward f(q) and pushes away from it every
  claimed candidate and the ``pool`` candidates of smallest clean rank (the
  ones that can overtake; candidates outside the pool keep their clean
  distance, itself a feasible point). The ranks these realised distances give
  are ranks some concrete perturbation reaches, so a claim outside them is a
  counterexample. Returns counts; ``broken`` must be 0 for sound certificates.
  """
  eps = validate.check_eps(eps)
  step_size = eps / 10 if step_size is None else step_size
  clean_rank = np.asarray(clean_rank)
  n = clean_rank.shape[1]
  claims, qi, ci = _claims(bounds, clean_rank, query_labels, cand_labels, ks)
  qf, cf = np.asarray(query_features), np.asarray(cand_features)
  d_min = np.array(distance.pairwise_distances(qf, cf))   # writable copy
  d_max = d_min.copy()
  attacked = np.zeros_like(clean_rank, bool)
  attacked[qi, ci] = True
  attacked |= (clean_rank <= pool) & np.isin(np.arange(len(qf)), qi)[:, None]
  pq, pc = np.nonzero(attacked)
  for sl in _batches(len(pq), batch_size):
    x, t = jnp.asarray(candidates[pc[sl]]), jnp.asarray(qf[pq[sl]])
    for sign, out, better in ((1.0, d_min, np.minimum), (-1.0, d_max, np.maximum)):
      key = jax.random.fold_in(jax.random.key(seed + 3), sl.start)
      adv = _distance_batch(apply, params, x, t, eps, step_size, steps, sign,
                            restarts=restarts, key=key)
      d = np.linalg.norm(models.embed(apply, params, np.asarray(adv)) - qf[pq[sl]], axis=1)
      out[pq[sl], pc[sl]] = better(out[pq[sl], pc[sl]], d)
  # per certified pair: its farthest reach against everyone else's nearest, and back
  idx = np.arange(n)
  others = idx[None] != ci[:, None]
  worst_low = 1 + np.sum(_before(d_min[qi], idx[None], d_max[qi, ci][:, None], ci[:, None])
                         & others, axis=1)
  worst_high = 1 + np.sum(_before(d_max[qi], idx[None], d_min[qi, ci][:, None], ci[:, None])
                          & others, axis=1)
  result = _score(claims, qi, ci, clean_rank, worst_low, worst_high)
  result["attacked_pairs"] = int(len(pq))
  return result
