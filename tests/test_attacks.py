"""PGD ranking attacks: they work, stay in the threat model, and never beat a certificate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcert import attacks, certification, distance, ranks
from jaxcert.interval import ibp, input_box


@pytest.fixture
def setup(cnn):
  apply = lambda p, x: cnn(x)
  rng = np.random.default_rng(0)
  q = rng.uniform(0, 1, (8, 8, 8, 1)).astype(np.float32)
  c = rng.uniform(0, 1, (40, 8, 8, 1)).astype(np.float32)
  ql, cl = rng.integers(0, 4, 8), rng.integers(0, 4, 40)
  return apply, q, c, ql, cl


def _rank_of(qf, cf, idx):
  _, rank = ranks.clean_ranks(distance.pairwise_distances(qf, cf))
  return np.take_along_axis(np.asarray(rank), idx[:, None], 1)[:, 0]


def test_query_attack_raises_its_target(setup):
  apply, q, c, ql, cl = setup
  cf = apply(None, c)
  adv, targets = attacks.query_attack(apply, None, q, ql, cf, cl, 0.1, steps=30)
  assert np.all(np.abs(adv - q) <= 0.1 + 1e-6) and adv.min() >= 0 and adv.max() <= 1
  assert np.all(cl[targets] != ql)
  before = _rank_of(apply(None, q), cf, targets)
  after = _rank_of(apply(None, adv), cf, targets)
  assert np.mean(after < before) >= 0.75, (before, after)
  assert after.mean() < 0.5 * before.mean()


def test_candidate_attack_raises_its_sources(setup):
  apply, q, c, ql, cl = setup
  qf, cf = apply(None, q), apply(None, c)
  src, feats = attacks.candidate_attack(apply, None, qf, ql, c, cf, cl, 0.1, num_sources=5,
                                        steps=30)
  assert src.shape == (8, 5) and feats.shape == (8, 5, cf.shape[1])
  assert np.all(cl[src] != ql[:, None])
  d_before = np.linalg.norm(np.asarray(qf)[:, None] - np.asarray(cf)[src], axis=-1)
  d_after = np.linalg.norm(np.asarray(qf)[:, None] - feats, axis=-1)
  assert np.mean(d_after < d_before) >= 0.9
  er = attacks.er_recall_ca(qf, cf, src, feats, ql, cl, (1, 5, 40))
  clean = attacks.er_recall_ca(qf, cf, src, np.asarray(cf)[src], ql, cl, (1, 5, 40))
  assert all(er[k] <= clean[k] for k in er) and er[40] == clean[40]


@pytest.mark.parametrize("eps", [0.002, 0.01])
def test_empirical_recall_never_below_certified(setup, eps):
  apply, q, c, ql, cl = setup
  qf, cf = apply(None, q), apply(None, c)
  qb, cb = ibp(lambda x: apply(None, x))(input_box(q, eps)), ibp(
      lambda x: apply(None, x))(input_box(c, eps))
  ks = (1, 3, 10)
  cr = certification.certify_features(qf, qb, ql, cf, cb, cl, ks)
  adv, _ = attacks.query_attack(apply, None, q, ql, cf, cl, eps, steps=20)
  er_qa = attacks.er_recall_qa(apply(None, adv), cf, ql, cl, ks)
  src, feats = attacks.candidate_attack(apply, None, qf, ql, c, cf, cl, eps, num_sources=10,
                                        steps=20)
  er_ca = attacks.er_recall_ca(qf, cf, src, feats, ql, cl, ks)
  for k in ks:
    assert cr["cr_recall_qa"][k] <= er_qa[k]  # (an attack may also help: no ER <= Recall)
    assert cr["cr_recall_ca"][k] <= er_ca[k]
  if eps == 0.002:  # the comparison is not vacuous
    assert cr["cr_recall_qa"][10] > 0 and cr["cr_recall_ca"][10] > 0


def test_attack_argument_errors(setup):
  apply, q, c, ql, cl = setup
  with pytest.raises(ValueError, match="eps=-1"):
    attacks.query_attack(apply, None, q, ql, apply(None, c), cl, -1)
  with pytest.raises(ValueError, match="fewer than the 100"):
    attacks.candidate_attack(apply, None, apply(None, q), ql, c, apply(None, c), cl, 0.1)


def test_audit_finds_planted_unsound_certificate_and_passes_real_ones(setup):
  apply, q, c, ql, cl = setup
  qf, cf = apply(None, q), apply(None, c)
  _, rank = ranks.clean_ranks(distance.pairwise_distances(qf, cf))
  ks = (3, 10)
  # planted: claims that no rank can move at eps = 0.1 (false for this network)
  planted = ranks.RankBounds(lower=rank, upper=rank)
  res = attacks.audit_qa(apply, None, q, cf, planted, rank, ql, cl, ks, 0.1, steps=20)
  assert res["claims"] > 0 and res["broken"] > 0
  # real IBP certificates at a small eps: every claim survives the same attack
  eps = 0.002
  qb = ibp(lambda x: apply(None, x))(input_box(q, eps))
  real = ranks.qa_rank_bounds(qb, cf)
  res = attacks.audit_qa(apply, None, q, cf, real, rank, ql, cl, ks, eps, steps=20)
  assert res["claims"] > 0 and res["broken"] == 0


def test_pgd_restarts_never_worse_and_stay_in_ball(cnn):
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1), minval=0.2, maxval=0.8)
  w = jax.random.normal(jax.random.key(2), (6,))
  loss = lambda z: jnp.sin(3.0 * cnn(z)) @ w
  one = attacks.pgd(loss, x, 0.1, steps=10, step_size=0.01)
  many = attacks.pgd(loss, x, 0.1, steps=10, step_size=0.01, restarts=4,
                     key=jax.random.key(3))
  assert bool(jnp.all(loss(many) <= loss(one) + 1e-6))
  assert float(jnp.max(jnp.abs(many - x))) <= 0.1 + 1e-6
  assert float(many.min()) >= 0.0 and float(many.max()) <= 1.0
  # a start at a stationary point (zero gradient) is stuck; random restarts are not
  bowl = lambda z: -jnp.sum((z - x) ** 2, axis=(1, 2, 3))
  stuck = attacks.pgd(bowl, x, 0.1, steps=10, step_size=0.01)
  np.testing.assert_allclose(bowl(stuck), 0.0)
  freed = attacks.pgd(bowl, x, 0.1, steps=10, step_size=0.01, restarts=2,
                      key=jax.random.key(4))
  assert bool(jnp.all(bowl(freed) < -0.1))
  with pytest.raises(ValueError, match="PRNG key"):
    attacks.pgd(bowl, x, 0.1, steps=2, step_size=0.01, restarts=2)


def test_ca_audit_finds_planted_unsound_certificate_and_passes_real_ones(setup):
  apply, q, c, ql, cl = setup
  qf, cf = apply(None, q), apply(None, c)
  _, rank = ranks.clean_ranks(distance.pairwise_distances(qf, cf))
  ks = (3, 10)
  planted = ranks.RankBounds(lower=rank, upper=rank)   # "no candidate attack moves ranks"
  res = attacks.audit_ca(apply, None, qf, c, cf, planted, rank, ql, cl, ks, 0.1, steps=20,
                         pool=20)
  assert res["claims"] > 0 and res["broken"] > 0
  assert res["max_rank_increase"] > 0 and res["max_rank_decrease"] > 0
  eps = 0.002
  cb = ibp(lambda x: apply(None, x))(input_box(c, eps))
  real = ranks.ca_rank_bounds(cb, qf)
  res = attacks.audit_ca(apply, None, qf, c, cf, real, rank, ql, cl, ks, eps, steps=20,
                         pool=40)
  assert res["claims"] > 0 and res["broken"] == 0


def test_query_attack_lowers_recall_of_an_undefended_model(setup):
  apply, q, c, ql, cl = setup
  qf, cf = apply(None, q), apply(None, c)
  _, rank = ranks.clean_ranks(distance.pairwise_distances(qf, cf))
  nearest = np.argmin(np.asarray(rank), axis=1)
  ql = cl[nearest]                      # every query's nearest candidate is relevant
  clean = attacks.er_recall_qa(qf, cf, ql, cl, (1,))[1]
  adv, _ = attacks.query_attack(apply, None, q, ql, cf, cl, 0.1, steps=30)
  attacked = attacks.er_recall_qa(apply(None, adv), cf, ql, cl, (1,))[1]
  assert clean == 1.0 and attacked <= 0.5, attacked
