"""Retrieval metrics: Recall@K (Eq. 22) and CR-Recall@K (Eq. 25).

Images of the same class are the relevant ones. All functions take the full
[Q, N] matrices and labels, are vectorised over queries and candidates, and
return one number per K.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcert import ranks as ranks_lib
from jaxcert import validate


def _relevant(query_labels, cand_labels):
  return jnp.asarray(query_labels)[:, None] == jnp.asarray(cand_labels)[None, :]


def _check(clean_rank, query_labels, cand_labels, ks):
  q, n = np.shape(clean_rank)
  validate.check_gallery(n)
  validate.check_shape(query_labels, (q,), "query_labels")
  validate.check_shape(cand_labels, (n,), "candidate_labels")
  return validate.check_ks(ks, n, "k")


def recall_at_k(clean_rank, query_labels, cand_labels, ks: Sequence[int]) -> dict[int, float]:
  """Eq. 22: fraction of queries with a same-class candidate in the clean top K."""
  ks = _check(clean_rank, query_labels, cand_labels, ks)
  rel = _relevant(query_labels, cand_labels)
  best = jnp.min(jnp.where(rel, clean_rank, jnp.iinfo(jnp.int32).max), axis=1)
  return {k: float(jnp.mean(best <= k)) for k in ks}


def certified_pairs(bounds: ranks_lib.RankBounds, clean_rank, query_labels, cand_labels,
                    k: int, *, one_sided: bool = False) -> jax.Array:
  """[Q, N]: c is same-class, in the clean top K, and verified with alpha = K - Rank(q, c)."""
  (k,) = _check(clean_rank, query_labels, cand_labels, (k,))
  rel = _relevant(query_labels, cand_labels)
  return ranks_lib.verify_top_k(bounds, clean_rank, k, one_sided=one_sided) & rel


def cr_recall_at_k(bounds: ranks_lib.RankBounds, clean_rank, query_labels, cand_labels,
                   ks: Sequence[int], *, one_sided: bool = False) -> dict[int, float]:
  """Eq. 25: fraction of queries with a same-class candidate c in the clean top K
  that is verified with ``alpha = K - Rank(q, c)`` (Thm 3 for QA bounds, Thm 4 for
  CA bounds). ``one_sided`` drops the lower-rank condition (see ranks.verify_top_k).
  A certified query provably keeps a same-class image in its top K.
  """
  ks = _check(clean_rank, query_labels, cand_labels, ks)
  return {k: float(jnp.mean(certified_queries(bounds, clean_rank, query_labels, cand_labels,
                                              k, one_sided=one_sided))) for k in ks}


def certified_queries(bounds: ranks_lib.RankBounds, clean_rank, query_labels, cand_labels,
                      k: int, *, one_sided: bool = False) -> np.ndarray:
  """Per-query booleans behind ``cr_recall_at_k`` for one K: [Q]."""
  return np.asarray(jnp.any(certified_pairs(bounds, clean_rank, query_labels, cand_labels, k,
                                            one_sided=one_sided), axis=1))
