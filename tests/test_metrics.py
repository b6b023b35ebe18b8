"""Recall@K and CR-Recall@K on hand-built cases, and their argument checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcert import metrics, ranks
from jaxcert.interval import Interval


def _case():
  # 2 queries, 4 candidates; clean ranks per query
  rank = jnp.array([[1, 2, 3, 4], [4, 3, 2, 1]])
  ql = jnp.array([0, 1])
  cl = jnp.array([1, 0, 0, 1])
  return rank, ql, cl


def test_recall_at_k():
  rank, ql, cl = _case()
  # q0 (class 0): same-class candidates c1, c2 at ranks 2, 3
  # q1 (class 1): same-class candidates c0, c3 at ranks 4, 1
  r = metrics.recall_at_k(rank, ql, cl, (1, 2, 3, 4))
  assert r == {1: 0.5, 2: 1.0, 3: 1.0, 4: 1.0}


def test_cr_recall_at_k():
  rank, ql, cl = _case()
  # q0/c1: rank 2, upper bound 2, lower 2 -> verified for K >= 2
  # q1/c3: rank 1, upper bound 3 -> verified for K >= 3 (lower 1 >= 2 - K)
  upper = jnp.array([[4, 2, 4, 4], [4, 4, 4, 3]])
  lower = jnp.array([[1, 2, 1, 1], [1, 1, 1, 1]])
  b = ranks.RankBounds(lower=lower, upper=upper)
  cr = metrics.cr_recall_at_k(b, rank, ql, cl, (1, 2, 3, 4))
  assert cr == {1: 0.0, 2: 0.5, 3: 1.0, 4: 1.0}
  np.testing.assert_array_equal(metrics.certified_queries(b, rank, ql, cl, 2), [True, False])
  # a certified query is also a clean hit: CR-Recall <= Recall for every K
  r = metrics.recall_at_k(rank, ql, cl, (1, 2, 3, 4))
  assert all(cr[k] <= r[k] for k in r)


def test_point_boxes_certify_every_clean_hit():
  rng = np.random.default_rng(0)
  qf, cf = rng.normal(size=(30, 5)), rng.normal(size=(40, 5))
  ql, cl = rng.integers(0, 3, 30), rng.integers(0, 3, 40)
  from jaxcert import certification
  res = certification.certify_features(qf, Interval(qf, qf), ql, cf, Interval(cf, cf), cl,
                                       (1, 5, 40))
  assert res["cr_recall_qa"] == res["recall"] == res["cr_recall_ca"]
  assert res["recall"][40] == 1.0


@pytest.mark.parametrize("ks,msg", [((0,), "k=0"), ((5,), "k=5"), ((1.5,), "integers")])
def test_bad_k(ks, msg):
  rank, ql, cl = _case()
  with pytest.raises(ValueError, match=msg):
    metrics.recall_at_k(rank, ql, cl, ks)


def test_shape_and_gallery_errors():
  rank, ql, cl = _case()
  with pytest.raises(ValueError, match="query_labels"):
    metrics.recall_at_k(rank, ql[:1], cl, (1,))
  with pytest.raises(ValueError, match="candidate_labels"):
    metrics.recall_at_k(rank, ql, cl[:3], (1,))
  with pytest.raises(ValueError, match="empty"):
    metrics.recall_at_k(jnp.zeros((2, 0), jnp.int32), ql, cl[:0], (1,))
  from jaxcert import certification
  f = np.zeros((2, 3))
  with pytest.raises(ValueError, match="empty"):
    certification.certify_features(f, Interval(f, f), ql, f[:0], Interval(f[:0], f[:0]),
                                   cl[:0], (1,))
  with pytest.raises(ValueError, match="query_features and cand_features"):
    g = np.zeros((4, 2))
    certification.certify_features(f, Interval(f, f), ql, g, Interval(g, g), cl, (1,))
