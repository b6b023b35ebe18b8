"""Randomized-smoothing certificates: closed-form models, Monte-Carlo failure rates,
searches for perturbations that break a certified radius."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jaxcert import smoothing

F = 1.0


def sign_model(p, x):
  """f(x) = F sign(x - 1/2) per channel of a [N, 1, 1, C] image, / sqrt(C): ||f|| = F."""
  c = x.shape[-1]
  return F * jnp.sign(x.reshape(x.shape[0], c) - 0.5) / np.sqrt(c)


def sign_model_g(x, sigma):
  """Its smoothed embedding in closed form: F (2 Phi((x - 1/2)/sigma) - 1) / sqrt(C)."""
  x = np.asarray(x, np.float64)
  return F * (2 * special.ndtr((x - 0.5) / sigma) - 1) / np.sqrt(x.shape[-1])


def sign_model_g_jax(x, sigma):
  return F * (2 * jax.scipy.special.ndtr((x - 0.5) / sigma) - 1) / jnp.sqrt(x.shape[-1])


# ----------------------------------------------------------- the paper's lemmas


def test_lipschitz_bound_holds_and_is_attained_by_f_equals_F_sign():
  sigma = 0.3
  rng = np.random.default_rng(0)
  x1, x2 = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000)
  g = lambda x: F * (2 * special.ndtr(x / sigma) - 1)
  gap = np.abs(g(x1) - g(x2))
  bound = smoothing.lipschitz_bound(np.abs(x1 - x2), sigma, F)
  assert np.all(gap <= bound + 1e-12)
  assert np.max(gap / bound) > 0.99                      # close to tight at random
  r = np.array([0.01, 0.2, 1.0, 3.0])
  np.testing.assert_allclose(np.abs(g(r / 2) - g(-r / 2)),
                             smoothing.lipschitz_bound(r, sigma, F), rtol=1e-12)
  # the linear Eq. 2 bound sqrt(2/pi) F/sigma r is looser everywhere
  assert np.all(smoothing.lipschitz_bound(r, sigma, F) <= np.sqrt(2 / np.pi) * F / sigma * r)


def test_mc_error_bound_solves_the_bernstein_tail():
  for n, d, f, rho in [(10_000, 128, 1.0, 0.01), (100, 2, 3.0, 0.3), (10 ** 6, 2048, 1, 1e-6)]:
    t = smoothing.mc_error_bound(n, d, f, rho)
    tail = (d + 1) * np.exp(-3 * n * t * t / (6 * f * f + 4 * f * t))
    np.testing.assert_allclose(tail, rho, rtol=1e-9)
  assert smoothing.mc_error_bound(10_000, 128, 1.0, 0.01) == pytest.approx(0.04414, abs=1e-5)
  for bad, match in [(dict(num_samples=0), "num_samples"), (dict(rho=1.5), "rho"),
                     (dict(norm_bound=-1.0), "norm_bound"), (dict(dim=2.5), "dim")]:
    kw = dict(num_samples=10, dim=4, norm_bound=1.0, rho=0.1) | bad
    with pytest.raises(ValueError, match=match):
      smoothing.mc_error_bound(**kw)


def test_mc_failure_rate_stays_below_rho_and_a_too_small_t_is_caught():
  # 2000 independent estimates of g(1/2) = 0 for f = F sign, n = 100 samples each:
  # every image gets its own key, so copies of one image are independent repeats.
  n, rho, reps, sigma = 100, 0.05, 2000, 0.5
  images = np.full((reps, 1, 1, 1), 0.5, np.float32)
  est = smoothing.smoothed_embed(sign_model, {}, images, sigma=sigma, num_samples=n,
                                 key=jax.random.key(3), chunk_size=100, batch_images=500)
  err = np.linalg.norm(est - sign_model_g(images.reshape(reps, 1), sigma), axis=1)
  t = smoothing.mc_error_bound(n, 1, F, rho)
  assert np.mean(err >= t) <= rho
  # the same check with a t that is too small fails: the test can detect a bad bound
  assert np.mean(err >= t / 4) > rho
  # the estimates are unbiased: mean error of the 2000 means is ~ 1/sqrt(n * reps)
  assert abs(float(np.mean(est))) < 4 / np.sqrt(n * reps)


def test_smoothed_embed_matches_closed_form_and_ignores_chunking():
  sigma = 0.25
  x = np.array([0.1, 0.45, 0.5, 0.62, 0.9], np.float32).reshape(-1, 1, 1, 1)
  x2 = np.concatenate([x, x[::-1]], axis=-1)                     # C = 2 -> d = 2
  n = 20_000
  kw = dict(sigma=sigma, num_samples=n, key=jax.random.key(0))
  a = smoothing.smoothed_embed(sign_model, {}, x2, chunk_size=1000, batch_images=1, **kw)
  b = smoothing.smoothed_embed(sign_model, {}, x2, chunk_size=1536, batch_images=3, **kw)
  c = smoothing.smoothed_embed(sign_model, {}, x2, chunk_size=n, batch_images=5, **kw)
  # same noise per sample; only the float32 summation order differs (different
  # noise would differ by ~1/sqrt(n) = 7e-3)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(a, c, atol=1e-6)
  exact = sign_model_g(x2.reshape(-1, 2), sigma)
  t = smoothing.mc_error_bound(n, 2, F, 1e-3)
  assert np.all(np.linalg.norm(a - exact, axis=1) < t)
  np.testing.assert_allclose(a, exact, atol=0.03)


def test_smoothed_embed_projects_onto_the_norm_ball_and_checks_arguments(cnn):
  x = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
  apply = lambda p, z: 50.0 * cnn(z)                       # norms far above 1
  g = smoothing.smoothed_embed(apply, {}, x, sigma=0.1, num_samples=64,
                               key=jax.random.key(0), norm_bound=1.0, chunk_size=16)
  assert np.all(np.linalg.norm(g, axis=1) <= 1.0 + 1e-6)
  g2 = smoothing.smoothed_embed(apply, {}, x, sigma=0.1, num_samples=64,
                                key=jax.random.key(0), norm_bound=1.0, chunk_size=64,
                                batch_images=2)
  np.testing.assert_allclose(g, g2, atol=1e-6)
  with pytest.raises(ValueError, match="sigma must be a finite number > 0, got sigma=-0.1"):
    smoothing.smoothed_embed(apply, {}, x, sigma=-0.1, num_samples=4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="num_samples must be a positive integer"):
    smoothing.smoothed_embed(apply, {}, x, sigma=0.1, num_samples=0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="pixels must lie in"):
    smoothing.smoothed_embed(apply, {}, x + 2, sigma=0.1, num_samples=4,
                             key=jax.random.key(0))


# ----------------------------------------------------------- certificates


def test_minimum_margin_and_paper_radius_hand_values():
  z = np.array([[0.0, 0.0]])
  gallery = np.array([[0.3, 0.0], [0.0, 0.5], [-0.8, 0.0]])
  m = smoothing.minimum_margin(z, np.array([0]), gallery, np.array([0, 1, 1]))
  np.testing.assert_allclose(m, [0.2])
  sigma = 0.5
  r = smoothing.paper_radius(np.array([0.2, 2.0, 0.0, -0.1]), sigma, 1.0)
  np.testing.assert_allclose(r[:2], [2 * sigma * special.ndtri(0.5 + 0.2 / 8),
                                     2 * sigma * special.ndtri(0.75)], rtol=1e-4)
  assert r[1] == pytest.approx(1.349 * sigma, abs=1e-3)          # the ceiling
  np.testing.assert_array_equal(r[2:], [0.0, 0.0])
  # no same-class item: -inf margin; no other-class item: +inf margin
  m = smoothing.minimum_margin(z, np.array([2, 0]).reshape(2)[:1], gallery,
                               np.array([0, 0, 0]))
  assert m[0] == -np.inf


def test_halfspace_radius_is_exact_in_1d_where_the_paper_is_loose():
  # f = F sign(x - 1/2), gallery a = +0.9 (class 0), b = -0.9 (class 1): the smoothed
  # 1-NN flips exactly at x = 1/2, so the certified radius must be x - 1/2.
  sigma = 0.4
  xs = np.array([0.55, 0.7, 1.0, 1.3])
  z = sign_model_g(xs.reshape(-1, 1), sigma)
  gallery = np.array([[0.9], [-0.9]])
  hs = smoothing.halfspace_radii(z, np.zeros(4, int), gallery, np.array([0, 1]), (1,),
                                 sigma=sigma, norm_bound=F, t=0.0)[:, 0]
  np.testing.assert_allclose(hs, xs - 0.5, rtol=1e-4)
  assert np.all(hs <= xs - 0.5 + 1e-12)                          # never beyond the flip
  m = smoothing.minimum_margin(z, np.zeros(4, int), gallery, np.array([0, 1]))
  paper = smoothing.paper_radius(m, sigma, F)
  assert np.all(paper < hs) and np.all(paper <= 1.3491 * sigma)
  assert hs[-1] > 1.349 * sigma                                    # past the ceiling
  # just past the radius the 1-NN flips: the certificate is tight, not merely sound
  flipped = sign_model_g((xs - 1.002 * hs).reshape(-1, 1), sigma)
  assert np.all(np.abs(flipped - (-0.9)) < np.abs(flipped - 0.9))


def _random_problem(seed, q=40, n=30, d=4, classes=3):
  rng = np.random.default_rng(seed)
  def ball(k):
    v = rng.normal(size=(k, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(0.2, 1.0, (k, 1))
  return ball(q), rng.integers(0, classes, q), ball(n), rng.integers(0, classes, n)


@pytest.mark.parametrize("seed", range(5))
def test_halfspace_radius_is_never_below_the_papers(seed):
  z, ql, gal, gl = _random_problem(seed)
  sigma = 0.3
  t = [0.0, 0.01, 0.05][seed % 3]
  cert = smoothing.certify_smoothed(z, ql, gal, gl, sigma=sigma, norm_bound=F, t_query=t,
                                    ks=(1, 3))
  paper, hs = cert["paper_radius"], cert["halfspace_radius"]
  both = paper > 0
  assert both.sum() >= 3, both.sum()
  assert np.all(hs[both, 0] >= paper[both] - 1e-9)
  assert np.all(hs[:, 1] >= hs[:, 0])                  # top-3 is easier than top-1
  # the fixed-gallery paper radius uses M - 2t; at t = 0 certified iff correct
  if t == 0:
    np.testing.assert_array_equal(hs[:, 0] > 0, cert["score"])


def _search_break(g_fn, x, radius, gallery, gl, label, k, key, steps=60):
  """Random directions and normalised-gradient steps on and inside the l_2 sphere
  of the given radius that try to push every same-class item out of the top k.
  Returns the largest ``excess`` found (> 0 means a counterexample)."""
  gallery = jnp.asarray(gallery)
  same = jnp.asarray(gl == label)

  def excess(delta):       # nearest same-class minus k-th nearest other-class distance
    z = g_fn(x + delta)
    dist = jnp.linalg.norm(z[None] - gallery, axis=1)
    best_pos = jnp.min(jnp.where(same, dist, jnp.inf))
    kth_other = jnp.sort(jnp.where(same, jnp.inf, dist))[k - 1]
    return best_pos - kth_other               # > 0: the top k holds no same-class item

  def project(delta):
    return delta * jnp.minimum(1.0, radius / jnp.maximum(jnp.linalg.norm(delta), 1e-12))

  @jax.jit
  def search(dirs):
    unit = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    scales = jnp.array([0.5, 0.9, 0.999]) * radius
    rand = jax.vmap(lambda u: jax.vmap(lambda s: excess(u * s))(scales))(unit)

    def ascend(u):
      def body(delta, _):
        gvec = jax.grad(excess)(delta)
        delta = project(delta + 0.1 * radius * gvec / (jnp.linalg.norm(gvec) + 1e-12))
        return delta, excess(delta)
      return jax.lax.scan(body, 0.5 * radius * u, None, length=steps)[1]

    return jnp.maximum(jnp.max(rand), jnp.max(jax.vmap(ascend)(unit[:20])))

  return float(search(jax.random.normal(key, (400,) + x.shape)))


@pytest.mark.parametrize("k", [1, 3])
def test_no_perturbation_inside_the_certified_radius_breaks_retrieval(k):
  # closed-form smoothed model in R^2 (f = sign per input coordinate): search for a
  # perturbation within the half-space / paper radius that pushes every same-class
  # gallery item out of the top k.
  sigma = 0.3
  rng = np.random.default_rng(k)
  gallery = rng.uniform(-0.65, 0.65, (24, 2))
  gl = (gallery[:, 0] + 0.3 * gallery[:, 1] > 0).astype(int)
  g_fn = lambda x: sign_model_g_jax(x, sigma)
  xs = rng.uniform(0.0, 1.0, (12, 2))
  z = sign_model_g(xs, sigma)
  ql = (z[:, 0] + 0.3 * z[:, 1] > 0).astype(int)
  # with exact g (t = 0) and with an MC estimate plus its t
  est, cov = smoothing.smoothed_embed(
      sign_model, {}, xs.reshape(-1, 1, 1, 2).astype(np.float32), sigma=sigma,
      num_samples=20_000, key=jax.random.key(5), covariance=True)
  t = smoothing.certified_t(20_000, 2, F, 0.01)
  checked, broken = 0, 0
  for zz, tt, eb in ((z, 0.0, False), (est, t, False), (est, t, True)):
    cert = smoothing.certify_smoothed(zz, ql, gallery, gl, sigma=sigma, norm_bound=F,
                                      t_query=tt, ks=(k,), cov=cov if eb else None,
                                      num_samples=20_000, rho=0.01)
    radii = cert["halfspace_eb_radius" if eb else "halfspace_radius"][:, 0]
    if k == 1:
      assert np.all(radii >= cert["paper_radius"] - 1e-9)
    for i in np.flatnonzero(radii > 0):
      r = min(float(radii[i]), 3.0)
      worst = _search_break(g_fn, jnp.asarray(xs[i]), r, gallery, gl, ql[i], k,
                            jax.random.key(i))
      assert worst <= 1e-9, (i, r, worst)
      checked += 1
      if tt == 0.0:   # the search is strong enough to break retrieval further out
        broken += _search_break(g_fn, jnp.asarray(xs[i]), 2.5 * r, gallery, gl, ql[i], k,
                                jax.random.key(i)) > 0
  assert checked >= 8, checked
  assert broken >= 3, broken


def test_certified_recall_curve_counts_positive_radii():
  radii = np.array([-np.inf, 0.0, 0.1, 0.5, np.inf])
  curve = smoothing.certified_recall_curve(radii, np.array([0.0, 0.1, 0.2, 1.0]))
  chex.assert_trees_all_close(curve, np.array([0.6, 0.4, 0.4, 0.2]))   # strict: R > r


def test_near_duplicate_gallery_pair_is_not_overstated():
  # f = F sign(x_1 - 1/2) e_j, g = F (2 Phi((x_1 - 1/2)/sigma) - 1) e_j exactly. a and b
  # (other class) differ by a few float32 ulps in coordinate j; the expanded
  # ||a||^2 + ||b||^2 - 2 a.b cancels there and once overstated the radius by 1.57x.
  sigma, d = 0.5, 128
  t = smoothing.certified_t(100_000, d, F, 0.01)
  rng = np.random.default_rng(1)
  worst = 0.0
  for _ in range(300):
    a = rng.normal(size=d)
    a = (a / np.linalg.norm(a) * 0.999).astype(np.float32)
    j = int(rng.integers(d))
    b = a.copy()
    for _ in range(int(rng.integers(1, 4))):
      b[j] = np.nextafter(b[j], np.float32(np.inf))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    x1 = 0.5 + sigma * special.ndtri((1 + (a64[j] - 0.15) / F) / 2)
    z = F * (2 * special.ndtr((x1 - 0.5) / sigma) - 1) * np.eye(d)[j]
    r = smoothing.halfspace_radii(z[None], np.array([0]), np.stack([a64, b64]),
                                  np.array([0, 1]), (1,), sigma=sigma, norm_bound=F,
                                  t=t)[0, 0]
    flip = 0.5 + sigma * special.ndtri((1 + (a64[j] + b64[j]) / 2 / F) / 2) - x1
    if np.isfinite(r) and r > 0:
      worst = max(worst, r / flip)
  assert worst <= 1.0, worst


def test_certificates_reject_vectors_outside_the_ball_and_bad_labels():
  z, ql, gal, gl = _random_problem(0)
  with pytest.raises(ValueError, match="norm 1.5 > norm_bound"):
    smoothing.certify_smoothed(np.array([[1.5, 0, 0, 0]]), ql[:1], gal, gl, sigma=0.3,
                               norm_bound=F, t_query=0.0)
  with pytest.raises(ValueError, match="must be integer arrays"):
    smoothing.halfspace_radii(z, ql.astype(str), gal, gl, (1,), sigma=0.3, norm_bound=F,
                              t=0.0)


def test_empirical_bernstein_direction_bound_fails_at_most_rho():
  # 3000 independent estimates (n = 200) of g(x) for f = F sign(x - 1/2) per coordinate
  # (d = 4) at a point where g is known; check u.g <= u.g_hat + e(u) in 6 fixed
  # directions, with the union bound over them, as halfspace_radii uses it.
  n, rho, reps, sigma, d = 200, 0.05, 3000, 0.5, 4
  x0 = np.array([0.5, 0.6, 0.3, 0.9], np.float32)
  images = np.broadcast_to(x0, (reps, 1, 1, d)).copy()
  est, cov = smoothing.smoothed_embed(sign_model, {}, images, sigma=sigma, num_samples=n,
                                      key=jax.random.key(9), chunk_size=200,
                                      batch_images=500, covariance=True)
  g = sign_model_g(x0[None], sigma)[0]
  # the sample covariance is unbiased: its mean matches the exact one
  exact_var = (F * F / d) - g * g
  np.testing.assert_allclose(np.mean(cov[:, range(d), range(d)], axis=0), exact_var,
                             atol=3e-3)
  u = np.random.default_rng(0).normal(size=(6, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  lg = np.log(2 * len(u) / rho)
  var = np.einsum("kd,rde,ke->rk", u, cov, u)
  e = np.sqrt(2 * var * lg / n) + 14 * F * lg / (3 * (n - 1))
  gap = (u @ g)[None] - est @ u.T                        # u.g - u.g_hat  [reps, 6]
  assert np.mean(np.any(gap > e, axis=1)) <= rho
  assert np.mean(np.any(gap > e / 8, axis=1)) > rho      # a bound 8x too small is caught


def test_smoothed_gallery_paper_radius_survives_search_against_the_exact_gallery():
  # the paper's own mode: gallery vectors are Monte-Carlo estimates too (M - 4t, union
  # bound over |B| + 1 estimates); the search uses the exact smoothed gallery g(b).
  sigma, n = 0.3, 20_000
  rng = np.random.default_rng(7)
  gx = rng.uniform(0.0, 1.0, (16, 2))
  gl = (gx[:, 0] > 0.5).astype(int)
  xs = rng.uniform(0.0, 1.0, (10, 2))
  ql = (xs[:, 0] > 0.5).astype(int)
  est = lambda pts, k: smoothing.smoothed_embed(
      sign_model, {}, pts.reshape(-1, 1, 1, 2).astype(np.float32), sigma=sigma,
      num_samples=n, key=jax.random.key(k))
  t = smoothing.certified_t(n, 2, F, 0.01, gallery_size=len(gx))
  cert = smoothing.certify_smoothed(est(xs, 1), ql, est(gx, 2), gl, sigma=sigma,
                                    norm_bound=F, t_query=t, t_gallery=t)
  exact_gallery = sign_model_g(gx, sigma)
  g_fn = lambda x: sign_model_g_jax(x, sigma)
  certified = np.flatnonzero(cert["paper_radius"] > 0)
  assert len(certified) >= 3, cert["paper_radius"]
  for i in certified[:6]:
    worst = _search_break(g_fn, jnp.asarray(xs[i]), float(cert["paper_radius"][i]),
                          exact_gallery, gl, ql[i], 1, jax.random.key(i))
    assert worst <= 1e-9, (i, worst)
