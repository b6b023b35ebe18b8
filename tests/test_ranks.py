"""Rank bounds (Thm 1, 2) and verification (Thm 3, 4) against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcert import distance, ranks
from jaxcert.interval import Interval, ibp, input_box


def _mlp(key, din=2, dh=8, dout=2):
  k1, k2, k3 = jax.random.split(key, 3)
  w1 = jax.random.normal(k1, (din, dh)) * 2.0
  b1 = jax.random.normal(k2, (dh,))
  w2 = jax.random.normal(k3, (dh, dout))
  return lambda x: jax.nn.relu(x @ w1 + b1) @ w2


def _grid(box_lo, box_hi, n=41):
  a = jnp.linspace(0, 1, n)
  g = jnp.stack(jnp.meshgrid(a, a, indexing="ij"), -1).reshape(-1, 2)
  return box_lo + g * (box_hi - box_lo)  # [G, 2]


def _true_rank(d):
  """Rank of every candidate given distances d [..., N] (1-based, no ties)."""
  return 1 + jnp.sum(d[..., None, :] < d[..., :, None], axis=-1)


def _tiny_instance(seed, eps):
  f = _mlp(jax.random.key(seed))
  q = jax.random.uniform(jax.random.key(seed + 1), (4, 2))
  c = jax.random.uniform(jax.random.key(seed + 2), (7, 2))
  qbox, cbox = input_box(q, eps), input_box(c, eps)
  return f, q, c, qbox, cbox


def _exhaustive_qa(f, qbox, c):
  """min/max rank of every candidate over a dense grid of each query's box."""
  fc = f(c)
  lo, hi = [], []
  for i in range(qbox.lower.shape[0]):
    fg = f(_grid(qbox.lower[i], qbox.upper[i]))
    r = _true_rank(distance.pairwise_distances(fg, fc))  # [G, N]
    lo.append(r.min(0))
    hi.append(r.max(0))
  return jnp.stack(lo), jnp.stack(hi)


def _exhaustive_ca(f, q, cbox):
  """min/max rank of every candidate when every candidate moves independently."""
  fq = f(q)
  n = cbox.lower.shape[0]
  dists = jnp.stack([distance.pairwise_distances(fq, f(_grid(cbox.lower[j], cbox.upper[j])))
                     for j in range(n)], axis=1)  # [Q, N, G]
  dmin, dmax = dists.min(-1), dists.max(-1)
  others = ~jnp.eye(n, dtype=bool)
  worst = 1 + jnp.sum((dmin[:, None, :] < dmax[:, :, None]) & others, -1)
  best = 1 + jnp.sum((dmax[:, None, :] < dmin[:, :, None]) & others, -1)
  return best, worst


@pytest.mark.parametrize("seed,eps", [(0, 0.02), (1, 0.05), (2, 0.1)])
def test_rank_bounds_contain_exhaustive_ranks(seed, eps):
  f, q, c, qbox, cbox = _tiny_instance(seed, eps)
  qa = ranks.qa_rank_bounds(ibp(f)(qbox), f(c))
  ca = ranks.ca_rank_bounds(ibp(f)(cbox), f(q))
  lo, hi = _exhaustive_qa(f, qbox, c)
  assert bool(jnp.all(qa.lower <= lo)) and bool(jnp.all(hi <= qa.upper))
  lo, hi = _exhaustive_ca(f, q, cbox)
  assert bool(jnp.all(ca.lower <= lo)) and bool(jnp.all(hi <= ca.upper))


def test_verification_never_certifies_a_broken_instance():
  certified = broken = 0
  for seed, eps in [(0, 0.02), (1, 0.05), (2, 0.1), (3, 0.03), (4, 0.08)]:
    f, q, c, qbox, cbox = _tiny_instance(seed, eps)
    _, j = ranks.clean_ranks(distance.pairwise_distances(f(q), f(c)))
    cases = [(ranks.qa_rank_bounds(ibp(f)(qbox), f(c)), _exhaustive_qa(f, qbox, c)),
             (ranks.ca_rank_bounds(ibp(f)(cbox), f(q)), _exhaustive_ca(f, q, cbox))]
    for bounds, (lo, hi) in cases:
      moved = jnp.maximum(hi - j, j - lo)  # largest rank change found by search
      for alpha in range(0, 7):
        ok = ranks.verify(bounds, j, alpha)
        assert not bool(jnp.any(ok & (moved > alpha))), (seed, alpha)
        certified += int(ok.sum())
        broken += int((moved > alpha).sum())
  assert certified > 0 and broken > 0  # the test exercises both outcomes


def test_sampled_perturbations_of_a_cnn(cnn):
  eps = 0.03
  q = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1))
  c = jax.random.uniform(jax.random.key(1), (20, 8, 8, 1))
  qa = ranks.qa_rank_bounds(ibp(cnn)(input_box(q, eps)), cnn(c))
  ca = ranks.ca_rank_bounds(ibp(cnn)(input_box(c, eps)), cnn(q))
  for s in range(30):
    k1, k2 = jax.random.split(jax.random.key(100 + s))
    sign = jnp.sign if s % 2 else (lambda x: x)  # half on the box's vertices
    dq = eps * sign(jax.random.uniform(k1, q.shape, minval=-1, maxval=1))
    dc = eps * sign(jax.random.uniform(k2, c.shape, minval=-1, maxval=1))
    r_qa = _true_rank(distance.pairwise_distances(cnn(jnp.clip(q + dq, 0, 1)), cnn(c)))
    r_ca = _true_rank(distance.pairwise_distances(cnn(q), cnn(jnp.clip(c + dc, 0, 1))))
    for b, r in ((qa, r_qa), (ca, r_ca)):
      assert bool(jnp.all(b.lower <= r)) and bool(jnp.all(r <= b.upper))


def test_rank_bounds_hand_example():
  # one query, three candidates, 1-D features; query box [0, 0.2] (QA)
  box = Interval(jnp.array([[0.0]]), jnp.array([[0.2]]))
  cands = jnp.array([[1.0], [0.5], [3.0]])
  b = ranks.qa_rank_bounds(box, cands)
  # distances: c0 in [0.8, 1.0], c1 in [0.3, 0.5], c2 in [2.8, 3.0]: order fixed
  np.testing.assert_array_equal(b.lower, [[2, 1, 3]])
  np.testing.assert_array_equal(b.upper, [[2, 1, 3]])
  wide = Interval(jnp.array([[0.0]]), jnp.array([[0.9]]))
  b = ranks.qa_rank_bounds(wide, cands)
  # c0 in [0.1, 1.0], c1 in [0.0, 0.5]: they can swap; c2 in [2.1, 3.0] stays last
  np.testing.assert_array_equal(b.lower, [[1, 1, 3]])
  np.testing.assert_array_equal(b.upper, [[2, 2, 3]])


def test_corrected_ca_term_where_the_misread_term_is_unsound():
  """Eq. 11 printed dlow_c(c); reading it as the query-side bound dlow_c(q) is unsound.

  1-D features. Query f(q) = 0 (exact under CA). c_hat = 1.0 with candidate box
  [0.5, 1.5]; c2 = 2.0 with candidate box [0.2, 3.8]. Under CA the attacker moves
  c2 to 0.2, closer than any point of c_hat's box: c_hat drops to rank 2.
  """
  fq = jnp.array([[0.0]])
  fc = jnp.array([[1.0], [2.0]])
  cbox = Interval(jnp.array([[0.5], [0.2]]), jnp.array([[1.5], [3.8]]))
  correct = ranks.ca_rank_bounds(cbox, fq)
  assert int(correct.upper[0, 0]) == 2  # c_hat can be pushed to rank 2
  # the misreading: dbar_q(c_hat) from the candidate box, dlow_c(q) with q exact
  dbar, _ = distance.pairwise_distance_bounds(cbox, fq)
  exact = distance.pairwise_distances(fq, fc)
  misread = ranks.rank_bounds(dbar.T, exact)
  assert int(misread.upper[0, 0]) == 1  # claims c_hat stays first: wrong
  attacked = distance.pairwise_distances(fq, jnp.array([[1.5], [0.2]]))  # a CA instance
  assert int(_true_rank(attacked)[0, 0]) == 2
  # the literal print, dlow_c(c), is 0 for any sound box: vacuous (rank <= N)
  _, dlow_cc = distance.box_distance_bounds(cbox, fc)
  np.testing.assert_allclose(dlow_cc, 0.0)


def test_clean_ranks_and_ties():
  d = jnp.array([[0.3, 0.1, 0.3, 0.2]])
  order, rank = ranks.clean_ranks(d)
  np.testing.assert_array_equal(order, [[1, 3, 0, 2]])
  np.testing.assert_array_equal(rank, [[3, 1, 4, 2]])


def test_verify_and_top_k():
  b = ranks.RankBounds(lower=jnp.array([[1, 2, 3]]), upper=jnp.array([[2, 5, 3]]))
  j = jnp.array([[1, 2, 3]])
  np.testing.assert_array_equal(ranks.verify(b, j, 0), [[False, False, True]])
  np.testing.assert_array_equal(ranks.verify(b, j, 1), [[True, False, True]])
  np.testing.assert_array_equal(ranks.verify(b, j, 3), [[True, True, True]])
  # K = 3: c0 (upper 2 <= 3, lower 1 >= 2*1-3), c1 (upper 5 > 3), c2 (3 <= 3, 3 >= 3)
  np.testing.assert_array_equal(ranks.verify_top_k(b, j, 3), [[True, False, True]])
  # K = 2: c2 not in the clean top 2
  np.testing.assert_array_equal(ranks.verify_top_k(b, j, 2), [[True, False, False]])
  # paper's two-sided condition can fail where the one-sided holds
  b2 = ranks.RankBounds(lower=jnp.array([[1]]), upper=jnp.array([[4]]))
  j2 = jnp.array([[4]])
  assert not bool(ranks.verify_top_k(b2, j2, 4)[0, 0])  # lower 1 < 2*4-4
  assert bool(ranks.verify_top_k(b2, j2, 4, one_sided=True)[0, 0])
  with pytest.raises(ValueError, match="alpha"):
    ranks.verify(b, j, -1)
