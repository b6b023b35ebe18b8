"""Rank bounds under query and candidate attacks, and (alpha, eps)-verification.

Notation (CBIR paper Sec. 3, MATH.md A): ``N = |C|``; for a query ``q`` and the
candidate ``c_hat`` at clean rank ``j``, ``U[q, c]`` and ``L[q, c]`` are upper and
lower bounds on the distance between q and c under the attack:

- QA (Thm 1): ``U[q, c] = dbar_c(q) >= max_delta ||f(q + delta) - f(c)||`` and
  ``L[q, c] = dlow_c(q)`` (box on the query, exact candidate).
- CA (Thm 2, corrected as in MATH.md): ``U[q, c] = dbar_q(c) >= max ||f(c + delta_c) - f(q)||``
  and ``L[q, c] = dlow_q(c)`` (box on each candidate, exact query). The paper's
  Eq. 11/14 print ``dlow_c(c)``; that term is 0 for any sound box, and reading it as
  the query-side bound ``dlow_c(q)`` is unsound (tests/test_ranks.py shows a case).

Both theorems then read, for every admissible perturbation,

  ``rank(c_hat) <= N - #{c : U[q, c_hat] < L[q, c]}``   (c is always farther)
  ``rank(c_hat) >= #{c : U[q, c] < L[q, c_hat]} + 1``   (c is always closer)

Strict inequalities make both bounds hold for any tie-breaking of equal distances.
``c = c_hat`` never counts because ``U >= L``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcert import distance, validate
from jaxcert.interval import Interval


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RankBounds:
  """``lower[q, c] <= Rank(q, c) <= upper[q, c]`` under the attack (1-based ranks)."""

  lower: jax.Array  # int32 [Q, N]
  upper: jax.Array  # int32 [Q, N]


@jax.jit
def rank_bounds(dist_upper: jax.Array, dist_lower: jax.Array) -> RankBounds:
  """Thm 1 / Thm 2 for every (query, candidate) pair at once.

  dist_upper, dist_lower: [Q, N] distance bounds under the attack (see module
  docstring for which bounds make QA and which make CA). Returns RankBounds [Q, N].
  Cost O(Q N log N): per query, the bounds are sorted once and counted by search.
  """
  n = dist_upper.shape[-1]

  def per_query(up, lo):
    lo_sorted = jnp.sort(lo)
    up_sorted = jnp.sort(up)
    # #{c : up[j] < lo[c]} = N - #{c : lo[c] <= up[j]}
    farther = n - jnp.searchsorted(lo_sorted, up, side="right")
    # #{c : up[c] < lo[j]}
    closer = jnp.searchsorted(up_sorted, lo, side="left")
    return RankBounds(lower=(closer + 1).astype(jnp.int32),
                      upper=(n - farther).astype(jnp.int32))

  return jax.vmap(per_query)(dist_upper, dist_lower)


def qa_rank_bounds(query_box: Interval, cand_features: jax.Array | Interval, *,
                   chunk_size: int = 16, fp_sound: bool = False) -> RankBounds:
  """Thm 1: ranks under a query attack.

  query_box: Interval [Q, d] containing f(q + delta) for every admissible delta;
  cand_features: [N, d] clean candidate features (or an Interval [N, d] of boxes
  around them). ``fp_sound``: float-sound distance bounds (:mod:`jaxcert.distance`).
  Returns RankBounds [Q, N].
  """
  validate.check_same_dim(query_box.lower, _lo(cand_features), "query_box", "cand_features")
  upper, lower = distance.pairwise_distance_bounds(query_box, cand_features,
                                                   chunk_size=chunk_size, fp_sound=fp_sound)
  return rank_bounds(upper, lower)


def ca_rank_bounds(cand_box: Interval, query_features: jax.Array | Interval, *,
                   chunk_size: int = 16, fp_sound: bool = False) -> RankBounds:
  """Thm 2 (corrected term ``dlow_q(c)``): ranks under a candidate attack.

  cand_box: Interval [N, d] containing f(c + delta_c) for each candidate;
  query_features: [Q, d] clean query features (or an Interval [Q, d] of boxes around
  them). ``fp_sound`` as in ``qa_rank_bounds``. Returns RankBounds [Q, N].
  """
  validate.check_same_dim(cand_box.lower, _lo(query_features), "cand_box", "query_features")
  upper, lower = distance.pairwise_distance_bounds(cand_box, query_features,
                                                   chunk_size=chunk_size, fp_sound=fp_sound)
  return rank_bounds(upper.T, lower.T)


def _lo(x):
  return x.lower if isinstance(x, Interval) else x


@jax.jit
def clean_ranks(distances: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Clean retrieval: distances [Q, N] -> (order [Q, N], rank [Q, N]).

  ``order[q, j-1]`` is the index of ``IR(q, C)_j``; ``rank[q, c]`` is the 1-based
  rank of candidate c. Ties are broken by candidate index (stable sort).
  """
  order = jnp.argsort(distances, axis=-1, stable=True)
  q = jnp.arange(distances.shape[0])[:, None]
  rank = jnp.zeros_like(order).at[q, order].set(
      jnp.broadcast_to(jnp.arange(1, distances.shape[1] + 1), order.shape))
  return order.astype(jnp.int32), rank.astype(jnp.int32)


def verify(bounds: RankBounds, clean_rank: jax.Array, alpha) -> jax.Array:
  """(alpha, eps)-robustness test of Thm 3 (QA bounds) / Thm 4 (CA bounds).

  True where ``upper - j <= alpha`` and ``lower - j >= -alpha`` with ``j`` the clean
  rank, i.e. the rank provably moves by at most alpha. alpha: int >= 0, scalar or
  broadcastable to [Q, N].
  """
  validate.check_alpha(alpha)
  alpha = jnp.asarray(alpha)
  return (bounds.upper - clean_rank <= alpha) & (bounds.lower - clean_rank >= -alpha)


def verify_top_k(bounds: RankBounds, clean_rank: jax.Array, k: int, *,
                 one_sided: bool = False) -> jax.Array:
  """Eq. 25's test with ``alpha = K - Rank(q, c)``, for pairs already in the top K.

  Paper definition (default): ``upper <= K`` and ``lower >= 2 j - K``.
  ``one_sided=True``: ``upper <= K`` only, which is exactly "c stays in the top K".
  Pairs outside the clean top K are False.
  """
  in_top = clean_rank <= k
  stays = bounds.upper <= k
  if one_sided:
    return in_top & stays
  return in_top & stays & (bounds.lower >= 2 * clean_rank - k)
