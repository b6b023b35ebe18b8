"""Floating-point-sound IBP and distance bounds (MATH.md C, docs/FLOAT_SOUNDNESS.md).

The float32 fp-sound box must contain the float64 IBP box (same weights, cast up) and
the float64 and float32 forward passes of points of the input box; the plain float32
box must fail that on at least one case (so these tests can fail).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxcert import certification, distance, interval, models, ranks, report
from jaxcert.interval import Interval, ibp, input_box

DN = ("NHWC", "HWIO", "NHWC")
F32 = np.float32
TAU = F32(2.0 ** -126)
# fp-sound box width / plain box width - 1 at eps = 0.1 (measured: see _WIDEN_MEASURED).
MAX_WIDENING = 2e-3


def _maxpool(h):
  return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _conv(h, w, stride=1, padding="SAME"):
  return lax.conv_general_dilated(h, w, (stride, stride), padding, dimension_numbers=DN)


def _conv_net(p, x):
  h = (x - p["mean"]) / p["std"]
  h = _maxpool(jax.nn.relu(_conv(h, p["c1"]) + p["cb1"]))
  h = jax.nn.relu(_conv(h, p["c2"], 2, "VALID") + p["cb2"])
  return h.reshape(x.shape[0], -1) @ p["w"] + p["b"]


def _mixed_net(p, x):
  """Residual add of two bounded operands, average pooling (reduce_window_sum and
  div), reduce_sum, cumsum, max of two bounded operands, x * c and x ** 2."""
  h = (x - p["mean"]) / p["std"]
  h = jax.nn.relu(_conv(h, p["c1"]) + p["cb1"])
  h = h + jax.nn.relu(_conv(h, p["c2"]))
  h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
  f = h.reshape(x.shape[0], -1)
  s = jnp.sum(f, axis=-1, keepdims=True) * 0.01 + jnp.cumsum(f, axis=-1)[:, -1:] * 0.01
  g = f @ p["w"] + s
  return jnp.concatenate([g, jnp.maximum(g[:, :2], g[:, 2:4]), (g[:, 4:] * 0.5) ** 2],
                         axis=-1)


def _random_params(kind, key):
  k = jax.random.split(key, 8)
  mean, std = jnp.asarray(F32(0.2860)), jnp.asarray(F32(0.3530))
  if kind == "conv":
    return {"mean": mean, "std": std, "c1": jax.random.normal(k[0], (3, 3, 1, 4)) / 3,
            "cb1": jax.random.normal(k[1], (4,)) * 0.1,
            "c2": jax.random.normal(k[2], (2, 2, 4, 6)) / 4,
            "cb2": jax.random.normal(k[3], (6,)) * 0.1,
            "w": jax.random.normal(k[4], (24, 6)) / 5, "b": jax.random.normal(k[5], (6,))}
  return {"mean": mean, "std": std, "c1": jax.random.normal(k[0], (3, 3, 1, 4)) / 3,
          "cb1": jax.random.normal(k[1], (4,)) * 0.1,
          "c2": jax.random.normal(k[2], (3, 3, 4, 4)) / 6,
          "w": jax.random.normal(k[3], (64, 8)) / 8}


def _small_cnn():
  """jaxcert's SmallCNN (random init) on 16x16 images, with normalisation constants
  that are float32 numbers, so the float64 model is the same model."""
  model = models.SmallCNN((16, 16, 1), 8, mean=(float(F32(0.2860)),),
                          std=(float(F32(0.3530)),), rngs=nnx.Rngs(3))
  graphdef, params = models.split(model)
  return params, models.apply_fn(graphdef)


NETS = {"conv": _conv_net, "mixed": _mixed_net}
CASES = ["conv", "mixed", "small_cnn"]  # small_cnn's fc layer takes the blocked dot path


def _case(name):
  if name == "small_cnn":
    params, apply = _small_cnn()
    return params, apply, (16, 16, 1)
  return _random_params(name, jax.random.key(len(name))), NETS[name], (8, 8, 1)


def _float64_reference(apply, params):
  """``ref(x, eps, pts)``: the plain IBP box in float64 over the real ball of radius
  eps (a float32 number) clipped to [0, 1], and the float64 forward pass at pts."""
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
    box_fn = jax.jit(lambda p, b: ibp(lambda z: apply(p, z))(b))
    fwd_fn = jax.jit(apply)

  def ref(x, eps, pts):
    with jax.enable_x64(True):
      x64 = jnp.asarray(np.asarray(x), jnp.float64)
      box = box_fn(p64, Interval(jnp.clip(x64 - float(eps), 0, 1),
                                 jnp.clip(x64 + float(eps), 0, 1)))
      fwd = [np.asarray(fwd_fn(p64, jnp.asarray(np.asarray(pt), jnp.float64))) for pt in pts]
      return np.asarray(box.lower), np.asarray(box.upper), fwd

  return ref


def _inside(box, values) -> bool:
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  return all(bool(np.all((lo <= v) & (v <= hi))) for v in values)


def _sample_points(in_box, rng, n=4):
  lo, hi = np.asarray(in_box.lower), np.asarray(in_box.upper)
  pts = [lo, hi]
  for _ in range(n):
    u = rng.uniform(size=lo.shape).astype(F32)
    pts.append(np.clip(lo + u * (hi - lo), lo, hi).astype(F32))
  return pts


@pytest.mark.parametrize("name", CASES)
def test_sound_box_contains_float64_box_and_both_forward_passes(name):
  params, apply, shape = _case(name)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(3, *shape)).astype(F32))
  x = x.at[0, :2].set(0.0).at[1, :2].set(1.0)  # pixels at the clipping bounds
  sound = jax.jit(lambda p, x, e: ibp(lambda z: apply(p, z), fp_sound=True)(
      input_box(x, e, fp_sound=True)))
  plain = jax.jit(lambda p, x, e: ibp(lambda z: apply(p, z))(input_box(x, e)))
  with jax.default_matmul_precision("highest"):
    fwd32 = jax.jit(apply)
  ref = _float64_reference(apply, params)
  widening = []
  for eps in (0.0, 1e-7, 0.1):
    e = jnp.asarray(F32(eps))  # an array eps is used as it is: the ball is of radius F32(eps)
    in_box = input_box(x, e, fp_sound=True)
    pts = _sample_points(in_box, rng)
    lo64, hi64, f64 = ref(x, F32(eps), pts)
    f32 = [np.asarray(fwd32(params, jnp.asarray(pt))) for pt in pts]
    box = sound(params, x, e)
    assert _inside(box, [lo64, hi64]), (name, eps, "float64 IBP box")
    assert _inside(box, f64), (name, eps, "float64 forward pass")
    assert _inside(box, f32), (name, eps, "float32 forward pass")
    pbox = plain(params, x, e)
    if eps == 0.0:  # the unwidened float32 box misses the float64 values
      assert not _inside(pbox, f64[2:]), (name, "plain box should fail at eps = 0")
    if eps == 0.1:
      w_plain = np.asarray(pbox.upper - pbox.lower, np.float64)
      w_sound = np.asarray(box.upper - box.lower, np.float64)
      widening.append(np.max(w_sound / w_plain - 1))
      assert np.all(np.asarray(box.lower) <= np.asarray(pbox.lower))
      assert np.all(np.asarray(box.upper) >= np.asarray(pbox.upper))
  assert 0 < max(widening) < MAX_WIDENING, widening


def test_plain_box_fails_on_float64_box_at_eps_zero():
  """The failure the widening fixes: the unwidened float32 box of a point is the
  float32 forward pass, which differs from the float64 value in most outputs."""
  params, apply, _ = _case("conv")
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 8, 8, 1)).astype(F32))
  pbox = jax.jit(lambda x: ibp(lambda z: apply(params, z))(input_box(x, 0.0)))(x)
  lo64, hi64, _ = _float64_reference(apply, params)(x, F32(0), [])
  outside = (np.asarray(pbox.lower, np.float64) > lo64) | (np.asarray(pbox.upper) < hi64)
  assert outside.mean() > 0.2, outside.mean()
  sbox = jax.jit(lambda x: ibp(lambda z: apply(params, z), fp_sound=True)(
      input_box(x, 0.0, fp_sound=True)))(x)
  assert _inside(sbox, [lo64, hi64])


CONV_CASES = [
    dict(x=(2, 9, 8, 4), w=(3, 2, 2, 6), s=(2, 1), p=((1, 2), (0, 1)), ld=None, rd=(2, 1),
         g=2, dn=("NHWC", "HWIO", "NHWC")),
    dict(x=(2, 4, 7, 7), w=(6, 4, 3, 3), s=(1, 2), p=((0, 0), (1, 0)), ld=(2, 1), rd=None,
         g=1, dn=("NCHW", "OIHW", "NCHW")),
    dict(x=(2, 4, 7, 7), w=(8, 1, 3, 3), s=(1, 1), p=((-1, 1), (2, 0)), ld=None, rd=(1, 2),
         g=4, dn=("NCHW", "OIHW", "NHWC")),
    dict(x=(3, 10, 5), w=(3, 5, 2), s=(2,), p="SAME", ld=None, rd=None, g=1,
         dn=("NWC", "WIO", "NWC")),
]


@pytest.mark.parametrize("i", range(len(CONV_CASES)))
def test_conv_as_contraction_matches_lax_conv(i):
  """Convolutions in fp-sound mode are window slices times kernel slices: the centre
  equals lax.conv (to rounding), and the box contains the float64 IBP box of the
  convolution (input bounded) or the float64 convolution (kernel bounded too)."""
  c = CONV_CASES[i]
  k = jax.random.split(jax.random.key(i), 3)
  x, w = jax.random.normal(k[0], c["x"]), jax.random.normal(k[1], c["w"])
  r = jax.random.uniform(k[2], c["x"]) * 0.1

  def conv(x, w):
    return lax.conv_general_dilated(x, w, c["s"], c["p"], lhs_dilation=c["ld"],
                                    rhs_dilation=c["rd"], dimension_numbers=c["dn"],
                                    feature_group_count=c["g"],
                                    precision=lax.Precision.HIGHEST)

  eqn = jax.make_jaxpr(conv)(x, w).jaxpr.eqns[0]
  con = interval._conv_as_contraction(eqn.params, x.shape, w.shape)
  cin_g = c["w"][c["dn"][1].index("I")]
  nk = np.prod([c["w"][c["dn"][1].index(d)] for d in c["dn"][1] if d not in "IO"])
  assert (con.n, con.depth) == (cin_g * nk, 1 + cin_g + nk)
  bilinear = i == 0  # both operands bounded, on one configuration (compile time)

  @jax.jit
  def boxes(x, w, r):
    box = ibp(lambda z: conv(z, w), fp_sound=True)(Interval(x - r, x + r))
    both = ibp(conv, fp_sound=True)(Interval(x, x), Interval(w, w)) if bilinear else box
    return con.fn([(x, w)])[0], box, both

  centre, box, both = boxes(x, w, r)
  np.testing.assert_allclose(centre, conv(x, w), atol=1e-5)
  with jax.enable_x64(True):
    x64, w64, r64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w, r))
    ref = jax.jit(lambda x, w, r: ibp(lambda z: conv(z, w))(Interval(x - r, x + r)))(
        x64, w64, r64)
    exact = np.asarray(jax.jit(conv)(x64, w64))
  assert _inside(box, [np.asarray(ref.lower), np.asarray(ref.upper)])
  if bilinear:
    assert _inside(both, [exact])


def test_library_primitives_within_stated_budget():
  """Transcendental primitives are widened by an ulp budget (an assumption about
  XLA's library, measured on XLA:CPU): the box holds the float64 values here."""
  fns = [jnp.tanh, jnp.exp, jax.nn.sigmoid, lambda v: jnp.log(v + 2.0),
         lambda v: jnp.sqrt(v + 2.0), lambda v: lax.rsqrt(v + 2.0), jax.nn.softplus,
         jax.scipy.special.erf, jnp.expm1, jnp.arctan]
  x = jnp.asarray(np.random.default_rng(2).uniform(-1.5, 1.5, size=(2000,)).astype(F32))
  for f in fns:
    box = ibp(f, fp_sound=True)(Interval(x, x))
    with jax.enable_x64(True):
      exact = np.asarray(f(jnp.asarray(np.asarray(x), jnp.float64)))
    assert _inside(box, [exact, np.asarray(f(x))]), f


def test_products_of_two_bounded_operands():
  """Elementwise x * y takes the exact interval product (end-point products, tighter
  than the centre/radius form of plain IBP); a dot of two boxes uses centre/radius.
  Both contain the float64 products of sampled points and their float32 values."""
  rng = np.random.default_rng(7)
  c1, c2 = rng.normal(size=(2, 200, 16)).astype(F32)
  r1, r2 = rng.uniform(0, 0.3, size=(2, 200, 16)).astype(F32)
  b1, b2 = Interval(c1 - r1, c1 + r1), Interval(c2 - r2, c2 + r2)
  mul = ibp(lambda a, b: a * b, fp_sound=True)(b1, b2)
  dot = ibp(lambda a, b: jnp.einsum("nd,nd->n", a, b), fp_sound=True)(b1, b2)
  ends = [np.asarray(a, np.float64) * np.asarray(b, np.float64)
          for a in (b1.lower, b1.upper) for b in (b2.lower, b2.upper)]
  assert _inside(mul, [np.minimum.reduce(ends), np.maximum.reduce(ends)])
  for _ in range(5):
    u, v = (F32(s) for s in rng.uniform(size=(2,)))
    za = np.asarray(b1.lower + u * (b1.upper - b1.lower))
    zb = np.asarray(b2.lower + v * (b2.upper - b2.lower))
    za, zb = np.clip(za, b1.lower, b1.upper), np.clip(zb, b2.lower, b2.upper)
    assert _inside(mul, [za.astype(np.float64) * zb, za * zb])
    assert _inside(dot, [np.sum(za.astype(np.float64) * zb, -1),
                         np.asarray(jnp.einsum("nd,nd->n", za, zb,
                                               precision=lax.Precision.HIGHEST))])


def test_exact_widened_numbers():
  one, half_ulp = F32(1.0), F32(2.0 ** -24)
  box = ibp(lambda a, b: a + b, fp_sound=True)(Interval(one, one), half_ulp)
  # 1 + 2^-24 is a tie, rounded to 1; the box is one float either side of it.
  assert (box.lower.item(), box.upper.item()) == (1 - 2.0 ** -24, 1 + 2.0 ** -23)
  box = ibp(lambda a: a - half_ulp, fp_sound=True)(Interval(one, one))
  assert (box.lower.item(), box.upper.item()) == (1 - 2.0 ** -23, 1.0)  # exact: 1 - 2^-24
  tenth = F32(0.1)  # 0.100000001490116...; 3 * tenth = 0.300000004470348...
  box = ibp(lambda a: a * F32(3), fp_sound=True)(Interval(tenth, tenth))
  assert box.lower.item() == np.nextafter(F32(0.3), F32(0))  # fl(3 tenth) = F32(0.3)
  assert box.upper.item() == np.nextafter(F32(0.3), F32(1))
  # dot: Yc = fl(3 tenth) = 0.30000001192; n = 1, g = gamma_2 = 2^-23 / (1 - 2^-23);
  # err = R + 2 g / (1 - g) (M + A) + 3A with R = 3 tau, M = fl(3 next(tenth))
  # ~ 7.15e-8, then each step rounded up: [0.29999992, 0.3000001].
  box = ibp(lambda a: a @ jnp.full((1, 1), 3.0, F32), fp_sound=True)(
      Interval(jnp.full((1, 1), tenth), jnp.full((1, 1), tenth)))
  assert box.lower.item() == F32(0.29999992) and box.upper.item() == F32(0.3000001)
  exact = 3 * float(tenth)
  assert box.lower.item() < exact < box.upper.item()


def test_outward_rounding_helpers():
  fmax = np.finfo(F32).max
  x = jnp.asarray([0.0, -0.0, 1.0, -1.0, -TAU, TAU, 1e-40, -1e-40, fmax, -np.inf, np.inf,
                   np.nan], F32)
  up, down = np.asarray(interval._next(x, True)), np.asarray(interval._next(x, False))
  np.testing.assert_array_equal(
      up, [TAU, TAU, np.nextafter(F32(1), F32(2)), np.nextafter(F32(-1), F32(0)), 0.0,
           np.nextafter(TAU, F32(1)), TAU, TAU, np.inf, -fmax, np.inf, np.nan])
  np.testing.assert_array_equal(
      down, [-TAU, -TAU, np.nextafter(F32(1), F32(0)), np.nextafter(F32(-1), F32(-2)),
             np.nextafter(-TAU, F32(-1)), 0.0, -TAU, -TAU, np.nextafter(fmax, F32(0)),
             -np.inf, fmax, np.nan])
  np.testing.assert_array_equal(np.asarray(interval._clean(x, True))[:8],
                                [0, 0, 1, -1, -TAU, TAU, TAU, 0])
  np.testing.assert_array_equal(np.asarray(interval._clean(x, False))[:8],
                                [0, 0, 1, -1, -TAU, TAU, 0, -TAU])


def test_subnormal_weights_and_inputs():
  """DAZ (XLA:CPU reads subnormals as 0): a subnormal weight times a huge input
  still counts; a subnormal input end point is moved outward to 0 or tau."""
  w = jnp.full((1, 1), 1e-40, F32)
  x = jnp.full((1, 1), 1e30, F32)
  box = ibp(lambda a: a @ w, fp_sound=True)(Interval(x, x))
  exact = 1e-40 * 1e30  # float64 arithmetic on the float32 values
  exact = float(np.float64(F32(1e-40))) * float(np.float64(F32(1e30)))
  plain = ibp(lambda a: a @ w)(Interval(x, x))
  assert _inside(box, [exact]) and not _inside(plain, [exact])
  box = ibp(jax.nn.relu, fp_sound=True)(Interval(jnp.asarray([1e-40], F32),
                                                 jnp.asarray([1e-40], F32)))
  assert (box.lower.item(), box.upper.item()) == (0.0, float(TAU))


def test_input_box_rounds_outward():
  x = jnp.asarray([0.0, 0.3, 0.95, 1.0], F32)
  box = input_box(x, 0.1, fp_sound=True)
  xs = np.asarray(x, np.float64)
  assert np.all(np.asarray(box.lower, np.float64) <= np.clip(xs - 0.1, 0, 1))
  assert np.all(np.asarray(box.upper, np.float64) >= np.clip(xs + 0.1, 0, 1))
  np.testing.assert_array_equal(np.asarray(box.lower)[[0, 3]],
                                [0.0, np.nextafter(F32(0.9), F32(0))])
  point = input_box(x, 0.0, fp_sound=True)
  np.testing.assert_array_equal(point.lower[1:3], np.nextafter(np.asarray(x)[1:3], F32(0)))
  np.testing.assert_array_equal(point.upper[1:3], np.nextafter(np.asarray(x)[1:3], F32(1)))
  # a float64 numpy image with x64 disabled is rounded outward to float32 first
  box = input_box(np.asarray([0.1, 0.7]), 0.0, fp_sound=True)
  assert np.all(np.asarray(box.lower, np.float64) <= [0.1, 0.7])
  assert np.all(np.asarray(box.upper, np.float64) >= [0.1, 0.7])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_unsupported_dtype_raises(dtype):
  box = Interval(jnp.zeros((2,), dtype), jnp.ones((2,), dtype))
  with pytest.raises(ValueError, match=f"float32 and float64.*dtype {np.dtype(dtype).name}"):
    ibp(lambda z: z * 2, fp_sound=True)(box)
  with pytest.raises(ValueError, match="dtype"):
    distance.box_distance_bounds(box, jnp.zeros((2,), dtype), fp_sound=True)


def test_unsupported_primitive_names_fp_mode():
  with pytest.raises(NotImplementedError, match="fp_sound=True.*reduce_precision"):
    ibp(lambda z: lax.reduce_precision(z, 5, 10), fp_sound=True)(
        Interval(jnp.zeros(2), jnp.ones(2)))
  assert "reduce_precision" not in interval.supported_primitives(fp_sound=True)
  assert {"dot_general", "conv_general_dilated", "reduce_window_sum", "max"} <= set(
      interval.supported_primitives(fp_sound=True))


# ---------------------------------------------------------------------------- distances


def _near_ties(rng, m=24, n=60, d=128):
  """Candidates at tiny offsets from the queries (large cancellation), some exact
  copies, some far: every distance regime."""
  q = rng.normal(size=(m, d)).astype(F32)
  c = q[rng.integers(0, m, n)] + rng.normal(size=(n, d)).astype(F32) * F32(1e-4)
  c[:5] = q[:5]
  c[5:10] = rng.normal(size=(5, d)).astype(F32) * 10
  return q, c.astype(F32)


def _exact_box_distances(lo, hi, t_lo, t_hi):
  lo, hi, t_lo, t_hi = (np.asarray(a, np.float64) for a in (lo, hi, t_lo, t_hi))
  far = np.maximum(hi[:, None] - t_lo[None], t_hi[None] - lo[:, None])
  gap = np.maximum(np.maximum(lo[:, None] - t_hi[None], t_lo[None] - hi[:, None]), 0)
  return np.sqrt(np.sum(far ** 2, -1)), np.sqrt(np.sum(gap ** 2, -1))


def test_sound_distances_bracket_float64_and_float32_distances():
  rng = np.random.default_rng(3)
  q, c = _near_ties(rng)
  up, lo = distance.pairwise_distance_bounds(Interval(q, q), c, fp_sound=True)
  exact = np.linalg.norm(q[:, None].astype(np.float64) - c[None].astype(np.float64), axis=-1)
  f32 = np.asarray(distance.pairwise_distances(q, c), np.float64)
  up, lo = np.asarray(up, np.float64), np.asarray(lo, np.float64)
  assert np.all(lo <= exact) and np.all(exact <= up)
  assert np.all(lo <= f32) and np.all(f32 <= up)
  assert np.all(lo[np.arange(5), np.arange(5)] == 0)  # identical vectors
  pu, pl = distance.pairwise_distance_bounds(Interval(q, q), c)
  pu, pl = np.asarray(pu, np.float64), np.asarray(pl, np.float64)
  assert np.any(pu < exact) and np.any(pl > exact)  # unwidened float32 fails
  pos = exact > 0
  assert np.max((up - exact)[pos] / exact[pos]) < 2e-5  # about gamma_129 = 7.7e-6, doubled
  assert np.max(up[~pos]) < 1e-17


def test_sound_distances_between_boxes():
  rng = np.random.default_rng(4)
  q, c = _near_ties(rng, m=10, n=30, d=32)
  rq = rng.uniform(0, 1e-4, size=q.shape).astype(F32)
  rc = rng.uniform(0, 1e-5, size=c.shape).astype(F32)
  qb, cb = Interval(q - rq, q + rq), Interval(c - rc, c + rc)
  up, lo = distance.pairwise_distance_bounds(qb, cb, fp_sound=True)
  far, near = _exact_box_distances(qb.lower, qb.upper, cb.lower, cb.upper)
  assert np.all(np.asarray(up, np.float64) >= far)
  assert np.all(np.asarray(lo, np.float64) <= near)
  pu, pl = distance.pairwise_distance_bounds(qb, cb)  # plain mode takes boxes too
  np.testing.assert_allclose(pu, far, rtol=1e-5)
  np.testing.assert_allclose(pl, near, rtol=1e-5, atol=1e-6)
  # corners of the boxes, float32 and float64 distances, inside the sound bounds
  z = np.where(rng.uniform(size=q.shape) < 0.5, qb.lower, qb.upper).astype(F32)
  t = np.where(rng.uniform(size=c.shape) < 0.5, cb.lower, cb.upper).astype(F32)
  d32 = np.asarray(distance.pairwise_distances(z, t), np.float64)
  d64 = np.linalg.norm(z[:, None].astype(np.float64) - t[None].astype(np.float64), axis=-1)
  for d in (d32, d64):
    assert np.all(np.asarray(lo, np.float64) <= d) and np.all(d <= np.asarray(up, np.float64))


def test_sound_rank_bounds_and_cost():
  """fp-sound rank bounds contain the plain ones' claims up to the widening, and
  fp_sound_cost counts certified queries lost (and the report line shows them)."""
  rng = np.random.default_rng(5)
  q = rng.normal(size=(12, 16)).astype(F32)
  c = rng.normal(size=(40, 16)).astype(F32) * 3
  c[:12] = q + rng.normal(size=(12, 16)).astype(F32) * F32(1e-3)  # each query's nearest
  ql, cl = rng.integers(0, 3, 12), rng.integers(0, 3, 40)
  cl[:12] = ql
  qb = Interval(q - F32(1e-4), q + F32(1e-4))
  cb = Interval(c - F32(1e-4), c + F32(1e-4))
  _, rank = ranks.clean_ranks(distance.pairwise_distances(q, c))
  sound = {"qa": ranks.qa_rank_bounds(qb, c, fp_sound=True),
           "ca": ranks.ca_rank_bounds(cb, Interval(q, q), fp_sound=True)}
  plain = {"qa": ranks.qa_rank_bounds(qb, c), "ca": ranks.ca_rank_bounds(cb, q)}
  for kind in ("qa", "ca"):
    assert np.all(sound[kind].upper >= plain[kind].upper)
    assert np.all(sound[kind].lower <= plain[kind].lower)
  cost = certification.fp_sound_cost(sound, plain, rank, ql, cl, (1, 5))
  for kind in ("qa", "ca"):
    for k in ("1", "5"):
      d = cost[kind][k]
      assert d["lost"] == d["plain"] - d["sound"] and d["plain"] > 0
  # plain bounds that certify more than the sound ones: the loss is counted
  tight = {"qa": ranks.RankBounds(lower=jnp.asarray(rank), upper=jnp.asarray(rank)),
           "ca": plain["ca"]}
  cost2 = certification.fp_sound_cost(sound, tight, rank, ql, cl, (1, 5))
  assert cost2["qa"]["1"]["plain"] == 12 and cost2["qa"]["1"]["lost"] == 12 - cost2["qa"][
      "1"]["sound"]
  line = report.fp_sound_line(cost2, (1, 5))
  assert line.startswith("Float-sound bounds") and f"QA {cost2['qa']['1']['lost']}/" in line


def test_feature_boxes_fp_sound_contains_plain_and_forward():
  params, apply = _small_cnn()
  images = np.random.default_rng(6).uniform(size=(5, 16, 16, 1)).astype(F32)
  sound = certification.feature_boxes(apply, params, images, 0.05, batch_size=4,
                                      fp_sound=True)
  plain = certification.feature_boxes(apply, params, images, 0.05, batch_size=4)
  clean = certification.feature_boxes(apply, params, images, 0.0, batch_size=4,
                                      fp_sound=True)
  feats = certification.embed(apply, params, images, batch_size=4)
  assert np.all(sound.lower <= plain.lower) and np.all(sound.upper >= plain.upper)
  assert _inside(clean, [feats]) and _inside(sound, [feats])
  # the eps = 0 box is rounding error only: measured 5.5e-5 of the eps = 0.05 box width
  assert np.max((clean.upper - clean.lower) / (plain.upper - plain.lower)) < 2e-4
