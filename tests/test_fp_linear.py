"""Float-sound CROWN / CROWN-IBP: ``linear_bounds(fp_sound=True)`` and jaxcert.fp_linear.

The float32 fp-sound box must contain the exact network's values (rational arithmetic on
a tiny network; float64 on larger ones) and the float32 forward pass, and lie inside the
fp-sound IBP box; the plain float32 CROWN box must miss exact values at eps = 0 (so the
tests can fail). The two lemmas the proof rests on are checked numerically.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcert import certification, fp_linear, models
from jaxcert import linear_bounds as lb
from jaxcert.interval import Interval, ibp, input_box

F32 = np.float32
DN = ("NHWC", "HWIO", "NHWC")


def _mlp_params(key, sizes, scale):
  ks = jax.random.split(key, 2 * len(sizes))
  return {"mean": jnp.asarray(F32(0.4)), "std": jnp.asarray(F32(0.3)),
          "w": [jax.random.normal(ks[2 * i], (a, b)) * scale / np.sqrt(a)
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))],
          "b": [jax.random.normal(ks[2 * i + 1], (b,)) * scale * 0.3
                for i, b in enumerate(sizes[1:])]}


def _mlp(p, x):
  h = (x.reshape(x.shape[0], -1) - p["mean"]) / p["std"]
  for w, b in zip(p["w"][:-1], p["b"][:-1], strict=True):
    h = jax.nn.relu(h @ w + b)
  return h @ p["w"][-1] + p["b"][-1]


def _conv_params(key):
  k = jax.random.split(key, 5)
  return {"c1": jax.random.normal(k[0], (3, 3, 1, 4)) * 0.5,
          "b1": jax.random.normal(k[1], (4,)) * 0.1,
          "c2": jax.random.normal(k[2], (3, 3, 4, 6)) * 0.3,
          "w3": jax.random.normal(k[3], (4 * 4 * 6, 12)) * 0.2,
          "w4": jax.random.normal(k[4], (12, 7)) * 0.3}


def _convnet(p, x):  # [B, 8, 8, 1] -> [B, 7]; strided conv: lhs-dilated transpose
  h = jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=DN)
  h = jax.nn.relu(h + p["b1"])
  h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["c2"], (2, 2), "SAME",
                                               dimension_numbers=DN))
  h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p["w3"])
  return h @ p["w4"]


def _small_cnn():
  model = models.SmallCNN((16, 16, 1), 8, mean=(float(F32(0.2860)),),
                          std=(float(F32(0.3530)),), rngs=nnx.Rngs(3))
  graphdef, params = models.split(model)
  return params, models.apply_fn(graphdef)


def _case(name):
  """(params, apply, image shape, methods)."""
  if name == "mlp":
    return _mlp_params(jax.random.key(0), (16, 24, 24, 5), 1.0), _mlp, (4, 4, 1), (
        "crown_ibp", "crown")
  if name == "cancel":  # large weights: float32 sums lose many digits
    return _mlp_params(jax.random.key(1), (16, 40, 40, 6), 300.0), _mlp, (4, 4, 1), (
        "crown_ibp", "crown")
  if name == "conv":
    return _conv_params(jax.random.key(2)), _convnet, (8, 8, 1), ("crown_ibp", "crown")
  params, apply = _small_cnn()
  return params, apply, (16, 16, 1), ("crown_ibp",)


def _inside(box, values, slack=0.0) -> bool:
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  return all(bool(np.all((lo - slack <= v) & (v <= hi + slack))) for v in values)


@pytest.mark.parametrize("name", ["mlp", "cancel", "conv", "small_cnn"])
def test_fp_sound_box_contains_float64_and_float32_forward(name):
  params, apply, shape, methods = _case(name)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(2, *shape)).astype(F32))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
    f64 = jax.jit(apply)
  f32 = jax.jit(apply)
  with jax.default_matmul_precision("highest"):
    f32_highest = jax.jit(apply)
  ibp_fn = jax.jit(lambda b: ibp(lambda z: apply(params, z), fp_sound=True)(b))
  bounds = {(m, fp): jax.jit(lambda b, m=m, fp=fp: lb.linear_bounds(
      lambda z: apply(params, z), m, fp_sound=fp)(b)) for m in methods for fp in (False, True)}
  for eps in (0.0, 1e-7, 0.05):
    box = input_box(x, jnp.asarray(F32(eps)), fp_sound=True)
    lo, hi = np.asarray(box.lower), np.asarray(box.upper)
    pts = [lo, hi] + [(lo + rng.uniform(size=lo.shape).astype(F32) * (hi - lo)).astype(F32)
                      for _ in range(4)]
    with jax.enable_x64(True):
      exact = [np.asarray(f64(p64, jnp.asarray(pt, jnp.float64))) for pt in pts]
    floats = [np.asarray(f(params, jnp.asarray(pt))) for pt in pts
              for f in (f32, f32_highest)]
    ibp_box = ibp_fn(box)
    for method in methods:
      sound = bounds[method, True](box)
      assert _inside(sound, exact), (name, method, eps, "float64 forward pass")
      assert _inside(sound, floats), (name, method, eps, "float32 forward pass")
      assert np.all(np.asarray(sound.lower) >= np.asarray(ibp_box.lower))
      assert np.all(np.asarray(sound.upper) <= np.asarray(ibp_box.upper))
      plain = bounds[method, False](box)
      if eps == 0.0 and name == "cancel":
        assert not _inside(plain, exact), (name, method, "plain box should miss")
      if eps == 0.05:   # the widening is small next to a real perturbation
        w_plain = np.asarray(plain.upper - plain.lower, np.float64)
        w_sound = np.asarray(sound.upper - sound.lower, np.float64)
        assert np.all(w_sound >= w_plain)
        assert np.mean(w_sound) / np.mean(w_plain) - 1 < 0.02, (name, method)


def _exact_mlp(ws, bs, mean, std, point):
  h = [(Fraction(float(v)) - mean) / std for v in point]
  for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
    h = [sum((h[a] * Fraction(float(w[a, j])) for a in range(w.shape[0])), Fraction(0))
         + Fraction(float(b[j])) for j in range(w.shape[1])]
    if i < len(ws) - 1:
      h = [max(v, Fraction(0)) for v in h]
  return h


def test_fp_sound_box_contains_exact_rational_values_on_a_grid():
  """Brute force in exact rational arithmetic: a 3-input network with weights that
  cancel, every point of a 5 x 5 x 5 grid of the box (float32 points) inside."""
  p = _mlp_params(jax.random.key(5), (3, 8, 8, 2), 50.0)
  mean, std = Fraction(float(p["mean"])), Fraction(float(p["std"]))
  ws = [np.asarray(w) for w in p["w"]]
  bs = [np.asarray(b) for b in p["b"]]
  x = jnp.asarray([[[[0.3], [0.7], [0.55]]]], jnp.float32).reshape(1, 3, 1, 1)
  sound_fn, plain_fn = (jax.jit(lb.linear_bounds(lambda z: _mlp(p, z), "crown", fp_sound=fp))
                        for fp in (True, False))
  for eps in (0.0, 1e-6, 0.02):
    box = input_box(x, jnp.asarray(F32(eps)), fp_sound=True)
    sound, plain = sound_fn(box), plain_fn(box)
    lo, hi = np.asarray(box.lower).ravel(), np.asarray(box.upper).ravel()
    axes = [np.unique(np.linspace(a, b, 5).astype(F32)) for a, b in zip(lo, hi, strict=True)]
    s_lo = [Fraction(float(v)) for v in np.asarray(sound.lower)[0]]
    s_hi = [Fraction(float(v)) for v in np.asarray(sound.upper)[0]]
    plain_missed = 0
    for a in axes[0]:
      for b in axes[1]:
        for c in axes[2]:
          y = _exact_mlp(ws, bs, mean, std, (a, b, c))
          assert all(s_lo[j] <= y[j] <= s_hi[j] for j in range(2)), (eps, a, b, c)
          plain_missed += sum(not (Fraction(float(np.asarray(plain.lower)[0, j])) <= y[j]
                                   <= Fraction(float(np.asarray(plain.upper)[0, j])))
                              for j in range(2))
    if eps == 0.0:
      assert plain_missed > 0   # the float32 point is not the exact value


def test_relaxation_holds_exactly_for_float_chords():
  """``a v - tau <= relu(v) <= s v + t`` at both end points, in rationals, for random
  and extreme end points (tiny, huge, near-cancelling)."""
  rng = np.random.default_rng(0)
  lo = -np.exp(rng.uniform(-30, 30, 400)).astype(F32)
  up = np.exp(rng.uniform(-30, 30, 400)).astype(F32)
  extra_lo = np.asarray([-2.0 ** -126, -3e38, -1.0, -1e-7, -1.0, -1.0 + 2 ** -23, 0.0, -5.0],
                        F32)
  extra_up = np.asarray([2.0 ** -126, 1.0, 3e38, 1.0, 1e-7, 1.0, 2.0, -1.0], F32)
  lo, up = np.concatenate([lo, extra_lo]), np.concatenate([up, extra_up])
  a, s, t = (np.asarray(v) for v in fp_linear.relaxation(jnp.asarray(lo), jnp.asarray(up)))
  tau = Fraction(2) ** -126
  for i in range(lo.size):
    sf, tf, af = Fraction(float(s[i])), Fraction(float(t[i])), Fraction(float(a[i]))
    assert 0 <= sf <= 1 and af in (0, 1)
    assert sf == 0 or sf >= tau   # never subnormal
    for v in (Fraction(float(lo[i])), Fraction(float(up[i]))):
      relu = max(v, Fraction(0))
      assert sf * v + tf >= relu, (lo[i], up[i], s[i], t[i])
      assert af * v - tau <= relu


def _segments(arch, shape, x64=False):
  model = models.make_model(arch, shape, dataset="fashion_mnist" if shape[-1] == 1 else
                            "cifar10")
  graphdef, params = nnx.split(model)
  apply = models.apply_fn(graphdef)
  dtype = jnp.float64 if x64 else jnp.float32
  if x64:
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype), params)
  net = lb._Network(lambda z: apply(params, z), jax.ShapeDtypeStruct((1, *shape), dtype))
  in_shape = (1, *shape)
  for k in range(len(net.segments)):
    seg = net.segment_fn(k)
    bias, vjp = jax.vjp(seg, jnp.zeros(in_shape, dtype))
    yield k, net.segment_program(k), lb._transpose_program(vjp, bias, k), vjp, bias, seg
    in_shape = bias.shape


@pytest.mark.parametrize("arch,shape", [("small", (28, 28, 1)), ("large", (16, 16, 3))])
def test_transpose_program_matches_vjp_and_transposition_lemma(arch, shape):
  """run() is the transpose (to rounding); sum_i |P|(w)_i m_i = w . |F|(m) (the
  transposition lemma) to float32 rounding; |F| with biases bounds the float64
  IBP of the segment on [-m, m]."""
  rng = np.random.default_rng(1)
  g = Fraction(1, 2 ** 20)
  ms = []
  for k, fwd, bwd, vjp, bias, _ in _segments(arch, shape):
    c = jnp.asarray(rng.normal(size=bias.shape).astype(F32))
    ref = np.asarray(vjp(c)[0])
    got = np.asarray(bwd.run(c))
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()), k
    w = jnp.asarray(rng.uniform(size=bias.shape).astype(F32))
    m = jnp.asarray(rng.uniform(size=ref.shape).astype(F32))
    lhs = float(jnp.sum(bwd.abs_upper(w, bias=False, kappa_gamma=g) * m))
    rhs = float(jnp.sum(w * fwd.abs_upper(m, bias=False, kappa_gamma=g)))
    assert abs(lhs - rhs) <= 1e-4 * rhs, (k, lhs, rhs)
    ms.append((np.asarray(m), np.asarray(fwd.abs_upper(m, bias=True, kappa_gamma=g))))
  with jax.enable_x64(True):
    for k, _, _, _, _, fn in _segments(arch, shape, x64=True):
      m, upper = ms[k]
      m = jnp.asarray(m, jnp.float64)
      seg = ibp(fn)(Interval(-m, m))
      assert np.all(upper >= np.maximum(np.asarray(seg.upper), -np.asarray(seg.lower))), k


def test_rounding_depths_of_the_small_cnn():
  """Roundings per path (module docstring): e.g. the 3200 -> 100 layer in unknown
  order has 3200 products + the accumulator + the bias add; its transpose, computed
  as a dot over 100 outputs, 101."""
  got = [(fwd.depth("any"), bwd.depth("own"))
         for _, fwd, bwd, _, _, _ in _segments("small", (28, 28, 1))]
  # seg 0: sub 1 + div 2 + conv (16 products) 17 + bias 1; transpose: lhs-dilated
  # conv with 16 channels x 16 offsets as windows (1 + 16 + 16) + div 2.
  assert got == [(21, 35), (258, 49), (3202, 101), (102, 129)]


def test_unsupported_transpose_raises_naming_the_primitive():
  idx = jnp.asarray([3, 1, 0, 2])

  def f(x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ jnp.ones((4, 4)))
    return jnp.take(h, idx, axis=1) @ jnp.ones((4, 2))   # gather: scatter-add transpose

  box = Interval(jnp.zeros((1, 4)), jnp.ones((1, 4)))
  lb.linear_bounds(f, "crown_ibp")(box)   # fine without fp_sound
  with pytest.raises(NotImplementedError, match="scatter-add"):
    lb.linear_bounds(f, "crown_ibp", fp_sound=True)(box)
  with pytest.raises(ValueError, match="float32 and float64"):
    lb.linear_bounds(f, "crown_ibp", fp_sound=True)(
        Interval(jnp.zeros((1, 4), jnp.bfloat16), jnp.ones((1, 4), jnp.bfloat16)))


def test_feature_boxes_crown_ibp_fp_sound():
  """certification.feature_boxes(method="crown_ibp", fp_sound=True): inside the
  fp-sound IBP boxes, around the float32 features, and at eps = 0 around the float64
  features, which the plain boxes miss."""
  params, apply = _small_cnn()
  x = np.random.default_rng(3).uniform(size=(5, 16, 16, 1)).astype(F32)
  boxes = lambda eps, fp, m: certification.feature_boxes(apply, params, x, eps,
                                                         fp_sound=fp, method=m, batch_size=4)
  feats = np.asarray(jax.jit(apply)(params, x))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
    f64 = np.asarray(jax.jit(apply)(p64, jnp.asarray(x, jnp.float64)))
  for eps in (0.0, 0.03):
    crown, ibp_box = boxes(eps, True, "crown_ibp"), boxes(eps, True, "ibp")
    assert _inside(crown, [feats, f64])
    assert np.all(np.asarray(crown.lower) >= np.asarray(ibp_box.lower))
    assert np.all(np.asarray(crown.upper) <= np.asarray(ibp_box.upper))
  assert not _inside(boxes(0.0, False, "crown_ibp"), [f64])


def test_subnormal_input_read_differently_by_two_products():
  """Review finding: DAZ is per operation, so two products of one subnormal ReLU output
  may read it as 0 and as itself. Exact (and consistent-read) value 2; the per-read
  float32 pass gives 1 + fl(1 - 1e38 * 5e-39) = 1.5. Both must be in the box."""
  w2 = np.array([[1e38, -1e38]], F32)

  def f(x):
    z = jax.nn.relu(x.reshape(x.shape[0], -1) * F32(1e-38))   # 5e-39: subnormal
    return jax.nn.relu(z @ w2 + F32(1.0)) @ np.ones((2, 1), F32)

  x = jnp.asarray([[0.5]], jnp.float32)
  v = F32(0.5) * F32(1e-38)
  per_read = F32(1.0) + F32(F32(1.0) - F32(w2[0, 0]) * v)   # one product reads 0
  assert per_read == F32(1.5)
  for method in ("crown_ibp", "crown"):
    box = lb.linear_bounds(f, method, fp_sound=True, intersect_ibp=False)(Interval(x, x))
    assert _inside(box, [np.asarray([[2.0]]), np.asarray([[float(per_read)]])]), method


def test_float64_numpy_box_is_rounded_outward():
  """Review finding: a float64 numpy box (x64 disabled) must be rounded outward to
  float32, not to nearest: [0.1, 0.1] in float64 must give a box containing 0.1."""
  assert not jax.config.jax_enable_x64
  lo = hi = np.array([[0.1]], np.float64)
  f = lambda x: jax.nn.relu(x @ jnp.ones((1, 1))) @ jnp.ones((1, 1))
  for bound in (lb.linear_bounds(f, "crown_ibp", fp_sound=True), ibp(f, fp_sound=True)):
    box = bound(Interval(lo, hi))
    assert Fraction(float(box.lower[0, 0])) <= Fraction(0.1) <= Fraction(float(box.upper[0, 0]))


def test_concatenate_and_dead_neurons_with_overflowed_bounds():
  """Review findings: concatenate (transposed as split) is supported in fp mode, and an
  inactive neuron whose IBP lower bound overflows to -inf does not make every bound
  infinite (0 * inf counts as 0; the ReLU-step terms apply to unstable neurons only)."""
  k = jax.random.split(jax.random.key(7), 3)
  w1, w2 = jax.random.normal(k[0], (4, 6)), jax.random.normal(k[1], (8, 5))
  w3 = jax.random.normal(k[2], (5, 3))

  def f(x):
    h = jnp.concatenate([x @ w1, jnp.full((x.shape[0], 2), 0.5, x.dtype)], axis=1)
    return jax.nn.relu(jax.nn.relu(h) @ w2) @ w3

  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4)).astype(F32))
  box = input_box(x, 0.01, fp_sound=True)
  sound = lb.linear_bounds(f, "crown", fp_sound=True)(box)
  plain = lb.linear_bounds(f, "crown")(box)
  with jax.enable_x64(True):
    ref = [np.asarray(f(jnp.asarray(np.asarray(p), jnp.float64)))
           for p in (box.lower, box.upper, box.center)]
  assert _inside(sound, ref)
  assert np.all(np.isfinite(np.asarray(sound.lower)))
  assert np.mean(np.asarray(sound.upper - sound.lower)) < 1.01 * np.mean(
      np.asarray(plain.upper - plain.lower))

  big = F32(3e38)   # the first hidden neuron: always inactive, IBP lower bound -inf

  def g(x):
    h = jax.nn.relu(x @ jnp.asarray([[-big, 1.0]], jnp.float32) - jnp.asarray([big, 0.0]))
    return h @ jnp.asarray([[1.0], [2.0]], jnp.float32) + 0.25

  xb = jnp.asarray([[0.5]], jnp.float32)   # output 2 x + 0.25 in [1.23, 1.27]
  for method in ("crown_ibp", "crown"):
    out = lb.linear_bounds(g, method, fp_sound=True, intersect_ibp=False)(
        input_box(xb, 0.01, fp_sound=True))
    lo, hi = float(out.lower[0, 0]), float(out.upper[0, 0])
    assert 1.229 < lo <= 1.23 and 1.27 <= hi < 1.271, (method, lo, hi)
