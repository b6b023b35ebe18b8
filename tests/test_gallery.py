"""Streaming certification against large galleries (jaxcert/gallery.py) and the chunked
smoothing certificates: same numbers as the dense path, whatever the chunk sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcert import certification, gallery, metrics, smoothing
from jaxcert.interval import Interval


def _random(seed, q, n, d=8, classes=3, width=0.3, ties=True):
  """Float features; with ``ties``, exact duplicates among the candidates (equal
  distances and bounds) and queries that coincide with candidates (distance 0)."""
  rng = np.random.default_rng(seed)
  qf = rng.normal(size=(q, d)).astype(np.float32)
  cf = rng.normal(size=(n, d)).astype(np.float32)
  qw = rng.uniform(0, width, (q, d)).astype(np.float32)
  cw = rng.uniform(0, width, (n, d)).astype(np.float32)
  if ties:
    cf[n - 20:], cw[n - 20:] = cf[:20], cw[:20]
    qf[:10] = cf[30:40]
  return (qf, Interval(qf - qw, qf + qw), rng.integers(0, classes, q),
          cf, Interval(cf - cw, cf + cw), rng.integers(0, classes, n))


def _lattice(seed, q, n, d=3, classes=2):
  """Features and box ends on a coarse grid: every sum is exact in float32, so many
  clean distances and distance bounds are exactly equal (ties everywhere)."""
  rng = np.random.default_rng(seed)
  qf = rng.integers(-2, 3, (q, d)).astype(np.float32)
  cf = rng.integers(-2, 3, (n, d)).astype(np.float32)
  qw = 0.5 * rng.integers(0, 2, (q, d)).astype(np.float32)
  cw = 0.5 * rng.integers(0, 2, (n, d)).astype(np.float32)
  return (qf, Interval(qf - qw, qf + qw), rng.integers(0, classes, q),
          cf, Interval(cf - cw, cf + cw), rng.integers(0, classes, n))


KS = (1, 5, 20, 40)


@functools.lru_cache(maxsize=None)
def _problem(seed=0, ties=True, width=0.3):
  return _random(seed, 160, 130, width=width, ties=ties)


def _dense(problem, ks, fp_sound=False, clean_boxes=None):
  """The dense path's metrics, per-query certified sets and best relevant ranks."""
  qf, qb, ql, cf, cb, cl = problem
  res, qa, ca, rank = certification._certify(qf, qb, ql, cf, cb, cl, ks, fp_sound=fp_sound,
                                             clean_boxes=clean_boxes, dense=True)
  sets = {}
  for name, b in (("qa", qa), ("ca", ca)):
    for one_sided in (False, True):
      kind = name + ("_one_sided" if one_sided else "")
      sets[kind] = np.stack([metrics.certified_queries(b, rank, ql, cl, k,
                                                       one_sided=one_sided) for k in ks], 1)
  rel = np.asarray(ql)[:, None] == np.asarray(cl)[None]
  best = np.min(np.where(rel, np.asarray(rank), max(ks) + 1), axis=1)
  return res, sets, best


def _assert_same(problem, ks, dense, **kw):
  got = gallery.certify_gallery(*problem, ks, **kw)
  res, sets, best = dense
  assert got.metrics() == res
  for kind in gallery.KINDS:
    np.testing.assert_array_equal(got.certified[kind], sets[kind], err_msg=kind)
  np.testing.assert_array_equal(got.best_rank, best)
  return got


@pytest.mark.parametrize("fp_sound", [False, True])
def test_streaming_equals_dense_on_random_features(fp_sound):
  problem = _problem()
  dense = _dense(problem, KS, fp_sound=fp_sound)
  got = _assert_same(problem, KS, dense, fp_sound=fp_sound, query_chunk=32, cand_chunk=48)
  # not a trivial case: some queries certified, some not
  for kind in gallery.KINDS:
    counts = got.certified[kind].sum(axis=0)
    assert counts[-1] > 0 and counts[0] < 160, (kind, counts)
  m = got.metrics()
  assert 0 < m["cr_recall_qa"][40] < m["recall"][40] and m["recall"][1] < 1
  if not fp_sound:
    _assert_same(problem, KS, dense, query_chunk=7, cand_chunk=130)


def test_streaming_equals_dense_with_clean_boxes():
  # boxes around the clean features, as fp-sound IBP at eps = 0 gives them
  qf, qb, ql, cf, cb, cl = problem = _problem()
  pad = lambda x: Interval(x - np.float32(1e-3), x + np.float32(1e-3))
  dense = _dense(problem, KS, fp_sound=True, clean_boxes=(pad(qf), pad(cf)))
  _assert_same(problem, KS, dense, fp_sound=True, clean_boxes=(pad(qf), pad(cf)),
               query_chunk=32, cand_chunk=48)


@pytest.mark.parametrize("ks,chunks", [((1, 2, 7, 40), (1, 1)), ((1, 2, 7, 40), (3, 2)),
                                       ((1, 2, 7, 40), (64, 5)), ((1, 7, 70), (3, 2)),
                                       ((1, 7, 70), (64, 5))])
def test_ties_and_chunk_sizes(ks, chunks):
  # lattice features: equal distances and equal bounds between many pairs; the clean
  # ranking breaks ties by index and the rank bounds count strictly, exactly as dense.
  # K <= 64 counts by comparison, K = 70 = N by sorted search.
  problem = _lattice(2, 40, 70)
  dense = _dense(problem, ks)
  got = _assert_same(problem, ks, dense, query_chunk=chunks[0], cand_chunk=chunks[1])
  assert 0 < got.metrics()["cr_recall_qa_one_sided"][7] < 1


def test_point_boxes_certify_every_clean_hit():
  # eps = 0 and no ties: upper = lower = the clean distance for every pair, so both
  # rank bounds equal the clean rank and every clean hit is certified (two-sided)
  qf, _, ql, cf, _, cl = _problem(3, ties=False, width=0.0)
  problem = (qf, Interval(qf, qf), ql, cf, Interval(cf, cf), cl)
  got = _assert_same(problem, KS, _dense(problem, KS), query_chunk=32, cand_chunk=48)
  m = got.metrics()
  assert m["cr_recall_qa"] == m["cr_recall_ca"] == m["recall"]
  assert m["recall"][1] < 1 and m["recall"][40] == 1.0


def test_large_k_counts_by_search_and_k_above_the_chunk():
  # K = 100 > 64 counts with sorted searches; cand_chunk = 16 < K merges the kept top K
  problem = _problem()
  ks = (3, 100, 130)                                     # K = N included
  got = _assert_same(problem, ks, _dense(problem, ks), query_chunk=8, cand_chunk=16)
  m = got.metrics()   # the counts behind every K come from the searches here
  assert 0 < m["cr_recall_ca"][3] < m["recall"][3] and m["cr_recall_qa"][100] == 1


def test_certify_features_streams_above_the_threshold(monkeypatch):
  qf, qb, ql, cf, cb, cl = problem = _problem()
  dense = certification.certify_features(*problem, KS)
  monkeypatch.setattr(certification, "DENSE_MAX_PAIRS", 160 * 130 - 1)
  res, qa, ca, rank = certification._certify(*problem, KS)
  assert isinstance(qa, gallery.GalleryCertificates) and rank is None
  assert res == dense == certification.certify_features(*problem, KS)
  # the fp-sound cost report reads streamed results as it reads dense ones
  wide = lambda b: Interval(b.lower - np.float32(0.05), b.upper + np.float32(0.05))
  sound = certification._certify(*problem, KS, fp_sound=True)[1]
  wider = certification._certify(qf, wide(qb), ql, cf, wide(cb), cl, KS)[1]
  streamed = certification.fp_sound_cost({"qa": sound, "ca": sound},
                                         {"qa": wider, "ca": wider}, None, ql, cl, KS)
  _, d_qa, d_ca, d_rank = certification._certify(*problem, KS, fp_sound=True, dense=True)
  _, w_qa, w_ca, _ = certification._certify(qf, wide(qb), ql, cf, wide(cb), cl, KS,
                                            dense=True)
  assert streamed == certification.fp_sound_cost({"qa": d_qa, "ca": d_ca},
                                                 {"qa": w_qa, "ca": w_ca}, d_rank, ql, cl, KS)
  assert streamed["qa"]["40"]["plain"] < streamed["qa"]["40"]["sound"]


def test_working_memory_does_not_grow_with_the_gallery():
  # the compiled per-chunk computation for 1e3 and 1e6 candidates: equal scratch memory
  # (the candidates themselves are arguments), far below one [Q, N] array
  d, qc = 128, 32
  temp = []
  for n in (1_000, 1_000_000):
    q = tuple(jax.ShapeDtypeStruct((qc, d), jnp.float32) for _ in range(5))
    c = tuple(jax.ShapeDtypeStruct((n, d), jnp.float32) for _ in range(5))
    lowered = gallery._query_chunk.lower(
        q, jax.ShapeDtypeStruct((qc,), jnp.int32), c, jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((5,), jnp.bool_), n=n, nc=512, ks=(1, 10, 20, 40),
        fp_sound=False, clean_boxes=False)
    temp.append(lowered.compile().memory_analysis().temp_size_in_bytes)
  assert temp[0] == temp[1], temp
  assert temp[1] < 64 * 2 ** 20, temp             # one [32, 1e6] float32 array is 128 MB


def test_bad_arguments_raise_clear_errors():
  problem = _random(6, 10, 20, ties=False)
  for bad in (0, -3, 2.5, True, "8"):
    with pytest.raises(ValueError, match=f"query_chunk must be a positive integer.*"
                                         f"got query_chunk={bad!r}"):
      gallery.certify_gallery(*problem, (1,), query_chunk=bad)
    with pytest.raises(ValueError, match=f"cand_chunk must be a positive integer.*"
                                         f"got cand_chunk={bad!r}"):
      gallery.certify_gallery(*problem, (1,), cand_chunk=bad)
  with pytest.raises(ValueError, match="k=21 is not allowed"):
    gallery.certify_gallery(*problem, (1, 21))
  qf, qb, ql, cf, cb, cl = problem
  nan = cf.copy()
  nan[3, 1] = np.nan
  with pytest.raises(ValueError, match="cand_features holds NaN or infinite"):
    gallery.certify_gallery(qf, qb, ql, nan, cb, cl, (1,))
  with pytest.raises(ValueError, match="cand_labels must have shape"):
    gallery.certify_gallery(qf, qb, ql, cf, cb, cl[:5], (1,))
  with pytest.raises(ValueError, match="clean distances overflow"):
    gallery.certify_gallery(qf * np.float32(1e20), Interval(qf * np.float32(1e20),
                            qf * np.float32(1e20)), ql, cf, cb, cl, (1,))
  got = gallery.certify_gallery(*problem, (1, 5))
  with pytest.raises(ValueError, match="kind must be one of"):
    got.queries("qb", 1)
  with pytest.raises(ValueError, match="k=3 was not certified"):
    got.queries("qa", 3)


# ----------------------------------------------------------- smoothing, fixed gallery


def _ball_problem(seed, q, n, d=6, classes=3):
  rng = np.random.default_rng(seed)
  def ball(k):
    v = rng.normal(size=(k, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(0.3, 1.0, (k, 1))
  return ball(q), rng.integers(0, classes, q), ball(n), rng.integers(0, classes, n)


def test_minimum_margin_chunks_match_the_definition():
  z, ql, gal, gl = _ball_problem(7, 25, 300)
  dist = np.linalg.norm(z[:, None] - gal[None], axis=-1)
  same = ql[:, None] == gl[None]
  want = np.where(same, np.inf, dist).min(1) - np.where(same, dist, np.inf).min(1)
  for qc, gc in ((256, 4096), (4, 7), (1, 1)):
    got = smoothing.minimum_margin(z, ql, gal, gl, query_chunk=qc, gallery_chunk=gc)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="gallery_chunk must be a positive integer"):
    smoothing.minimum_margin(z, ql, gal, gl, gallery_chunk=0)


def _halfspace_reference(z, ql, gal, gl, ks, sigma, t, m):
  """R_ab for every pair, straight from the formula of halfspace_radii (F = 1)."""
  from scipy import special
  f = 1.0 + smoothing._F_SLACK
  slack = smoothing._GEOM_SLACK * f
  out = np.full((len(z), len(ks)), -np.inf)
  for i in range(len(z)):
    d = np.linalg.norm(gal - z[i], axis=1)
    pos = [j for j in np.argsort(d, kind="stable") if gl[j] == ql[i]][:m]
    for a in pos:
      r = np.full(len(gal), np.inf)
      for b in np.flatnonzero(gl != ql[i]):
        v = gal[b] - gal[a]
        u = v / np.linalg.norm(v)
        c = (gal[b] @ gal[b] - gal[a] @ gal[a]) / (2 * np.linalg.norm(v))
        p_lo = np.clip((f - (u @ z[i] + slack) - t) / (2 * f), 0, 1)
        p_th = np.clip((f - (c - slack)) / (2 * f), 0, 1)
        r[b] = (-np.inf if p_lo <= 0 or p_th >= 1 else
                sigma * (special.ndtri(p_lo) - special.ndtri(p_th)))
      r = np.sort(r)
      out[i] = np.maximum(out[i], [r[k - 1] for k in ks])
  return out


def test_halfspace_radii_chunks_match_the_definition():
  z, ql, gal, gl = _ball_problem(8, 12, 90)
  ks, sigma, t, m = (1, 4, 90), 0.4, 0.02, 5
  want = _halfspace_reference(z, ql, gal, gl, ks, sigma, t, m)
  assert np.sum(want > 0) >= 5 and np.sum(want <= 0) >= 5
  for gc, batch in ((4096, 64), (7, 3), (1, 1)):
    got = smoothing.halfspace_radii(z, ql, gal, gl, ks, sigma=sigma, norm_bound=1.0, t=t,
                                    max_positives=m, gallery_chunk=gc, batch=batch)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got > 0, want > 0)


def test_halfspace_eb_radii_do_not_depend_on_the_gallery_chunk():
  z, ql, gal, gl = _ball_problem(9, 10, 120)
  rng = np.random.default_rng(0)
  cov = np.stack([np.cov(rng.normal(size=(40, 6)).T) * 0.02 for _ in range(10)])
  kw = dict(sigma=0.4, norm_bound=1.0, t=0.05, max_positives=6, cov=cov, num_samples=100_000,
            rho_eb=0.01)
  whole = smoothing.halfspace_radii(z, ql, gal, gl, (1, 5), **kw)
  chunked = smoothing.halfspace_radii(z, ql, gal, gl, (1, 5), gallery_chunk=11, batch=4, **kw)
  plain = smoothing.halfspace_radii(z, ql, gal, gl, (1, 5), **{**kw, "cov": None})
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
  assert np.sum(whole > plain + 1e-6) >= 3            # the per-direction bounds matter here
  with pytest.raises(ValueError, match="gallery_chunk must be a positive integer"):
    smoothing.halfspace_radii(z, ql, gal, gl, (1,), gallery_chunk=-1, **kw)
