"""Back-substituted linear bounds (CROWN, CROWN-IBP) as a function transform.

``linear_bounds(fn, method)(box)`` returns per-coordinate boxes on ``fn``'s output, like
:func:`jaxcert.interval.ibp`, but computed by propagating linear bounds backward through
the network (Zhang et al. 2018, CROWN; Zhang et al. 2020, CROWN-IBP) -- usually much
tighter than IBP's. The rank and distance certificates consume the boxes unchanged
(CBIR paper Thm 5/6 hold for any sound box; MATH.md C).

Scope: feed-forward ReLU networks, i.e. ``fn = A_L o relu o A_{L-1} o ... o relu o A_1``
where each ``A_k`` is an affine function built from the primitives in ``_AFFINE``
(convolutions and matrix products with constant weights, bias adds, input
normalisation, reshapes, slicing, padding, sums...). ``fn`` is traced to a jaxpr and cut
at its ReLUs; anything else on the input's path (a residual add across a ReLU, max
pooling, tanh, an l2-normalised output) raises ``NotImplementedError`` naming it -- use
IBP for those networks. The CBIR Small and Large models qualify.

**The bound.** Write ``zhat_k = A_k(z_{k-1}) = W_k z_{k-1} + b_k`` and ``z_k = relu(zhat_k)``
with ``z_0 = x`` in the box ``[l_0, u_0]``. Given pre-activation bounds
``l_k <= zhat_k <= u_k``, each ReLU is relaxed elementwise by two lines that hold on
``[l_k, u_k]``:

- upper: ``relu(v) <= s v + t`` with ``s = u/(u-l)``, ``t = -s l`` when ``l < 0 < u``
  (the chord), ``s = 1, t = 0`` when ``l >= 0``, ``s = t = 0`` when ``u <= 0``;
- lower: ``relu(v) >= a v`` with ``a`` in [0, 1] (``a = 1`` if ``u > -l`` else 0 for an
  unstable neuron: CROWN's adaptive choice), ``a = 1`` if ``l >= 0``, ``a = 0`` if ``u <= 0``.

For a row vector ``lam`` on ``zhat_m`` the lower bound of ``lam . zhat_m`` follows by
back-substitution: ``lam . zhat_k = (lam W_k) . z_{k-1} + lam . b_k``; then with
``lam' = lam W_k``, ``lam' . z_{k-1} >= (lam'^+ a + lam'^- s) . zhat_{k-1} + lam'^- . t``
(each coefficient uses the relaxation that bounds its sign's term from below); at the input
``lam . x >= lam . c_0 - |lam| . r_0`` (box centre ``c_0``, radius ``r_0``). Every step is
an inequality valid for every ``x`` in the box, so the result is a lower bound; an upper
bound of coordinate ``j`` is minus the lower bound of ``-e_j``. ``lam W_k`` is the
transpose of ``A_k``'s linear part, applied with ``jax.vjp`` (``A_k`` is affine, so its
VJP at 0 is exact), and ``b_k = A_k(0)``. Nothing is ever materialised as a matrix.

**Methods.**

- ``crown_ibp``: pre-activation bounds from IBP, one backward pass for the output.
- ``crown``: pre-activation bounds of every layer by back-substitution too (intersected with
  IBP's, both being sound), then the output. Costs one backward pass per pre-activation
  neuron (in row chunks): affordable for the Small model, heavy for Large.

The output box is intersected with the IBP box (``intersect_ibp=True``, the default), so it
is never wider than IBP's; both are sound, so their intersection is. The proof above is
in exact arithmetic; ``fp_sound=True`` repairs every step for float rounding (the
transposes, bias products, chords and sums) and covers the float forward pass as
``ibp(fp_sound=True)`` does -- :mod:`jaxcert.fp_linear` has that proof.

**Cost.** The output pass propagates ``2 d`` rows (``d`` = embedding size) per image.
``row_chunk`` rows of ``image_chunk`` images go through each transposed layer as one batch
(chunks in a ``jax.lax.map`` loop), so memory is about ``image_chunk x row_chunk x
(largest activation)`` floats whatever the batch size; small chunks also stay in cache.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jaxcert import fp_linear
from jaxcert.interval import (
    Interval,
    _add_up,
    _clean,
    _format,
    _fp_input,
    _mid_rad,
    _mul_up,
    _next,
    _sub_down,
    ibp,
    is_library_call,
)

METHODS = ("ibp", "crown_ibp", "crown")

_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat2", "checkpoint")
# Primitives that are affine in their bounded operands whatever the mix of bounded and
# constant operands (with the operand restrictions in _check_affine).
_AFFINE = frozenset((
    "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "concatenate", "pad", "rev", "copy", "copy_p",
    "convert_element_type", "reduce_sum", "reduce_window_sum", "cumsum", "select_n",
    "dynamic_slice", "gather", "sharding_constraint",
    "mul", "dot_general", "conv_general_dilated", "div",
))
_ONE_BOUNDED = frozenset(("mul", "dot_general", "conv_general_dilated"))


@dataclasses.dataclass
class _Eqn:
  prim: Any
  params: dict
  ins: list          # keys (scope, Var) or jex_core.Literal
  outs: list         # keys
  is_relu: bool = False


def _call_jaxpr(eqn) -> jex_core.ClosedJaxpr | None:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      sub = eqn.params[key]
      return sub if isinstance(sub, jex_core.ClosedJaxpr) else jex_core.ClosedJaxpr(sub, ())
  return None


class _Graph:
  """A jaxpr flattened through nested calls (kept whole: ReLU calls)."""

  def __init__(self, closed: jex_core.ClosedJaxpr):
    self.eqns: list[_Eqn] = []
    self.consts: dict = {}
    self.alias: dict = {}
    self._scopes = itertools.count(1)
    top = 0
    for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True):
      self.consts[(top, v)] = c
    self._flatten(closed.jaxpr, top)
    self.invars = [(top, v) for v in closed.jaxpr.invars]
    self.outvars = [self.resolve(self._key(top, v)) for v in closed.jaxpr.outvars]

  @staticmethod
  def _key(scope, v):
    return v if isinstance(v, jex_core.Literal) else (scope, v)

  def resolve(self, k):
    while not isinstance(k, jex_core.Literal) and k in self.alias:
      k = self.alias[k]
    return k

  def _flatten(self, jaxpr, scope):
    for eqn in jaxpr.eqns:
      ins = [self.resolve(self._key(scope, v)) for v in eqn.invars]
      outs = [(scope, v) for v in eqn.outvars]
      name = eqn.params.get("name")
      sub = _call_jaxpr(eqn) if eqn.primitive.name in _CALLS else None
      is_relu = (sub is not None and name == "relu" and len(eqn.invars) == 1
                 and is_library_call("relu", sub))
      if sub is not None and not is_relu:
        inner = next(self._scopes)
        for v, c in zip(sub.jaxpr.constvars, sub.consts, strict=True):
          self.consts[(inner, v)] = c
        for v, k in zip(sub.jaxpr.invars, ins, strict=True):
          self.alias[(inner, v)] = k
        self._flatten(sub.jaxpr, inner)
        for v, w in zip(eqn.outvars, sub.jaxpr.outvars, strict=True):
          if not isinstance(v, jex_core.DropVar):
            self.alias[(scope, v)] = self.resolve(self._key(inner, w))
        continue
      self.eqns.append(_Eqn(eqn.primitive, eqn.params, ins, outs, is_relu=is_relu))


_bind = fp_linear.bind_eqn


def _bind_fast(eqn: _Eqn, invals):
  """:func:`_bind`, with a convolution's operands moved to the layouts XLA:CPU is fast on.

  The transpose of a convolution (what ``jax.vjp`` gives) reads its kernel as ``01oi``;
  inside a loop body XLA:CPU runs that layout with a naive kernel, 10-20x slower than
  ``01io`` (jax-ml/jax#12868). Transposing the operands first computes the same sums.
  """
  if eqn.prim.name != "conv_general_dilated":
    return _bind(eqn, invals)
  lhs, rhs = invals
  dn = eqn.params["dimension_numbers"]
  n = len(dn.rhs_spec) - 2
  lhs_perm = (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)
  rhs_perm = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
  out_perm = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
  canon = lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + tuple(range(1, n + 1)),
                                   rhs_spec=(n + 1, n) + tuple(range(n)),
                                   out_spec=(0, n + 1) + tuple(range(1, n + 1)))
  eqn = dataclasses.replace(eqn, params={**eqn.params, "dimension_numbers": canon})
  out, = _bind(eqn, [jnp.transpose(lhs, lhs_perm), jnp.transpose(rhs, rhs_perm)])
  return [jnp.transpose(out, np.argsort(out_perm))]


def _is_zero(v) -> bool:
  """True iff ``v`` is a concrete array of zeros (a traced value is never known zero)."""
  try:
    return bool(np.all(np.asarray(v) == 0))
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return False


@dataclasses.dataclass
class _Segment:
  """``A_k``: eqns mapping key ``inp`` to key ``out``; affine by construction."""
  inp: Any
  out: Any
  eqns: list


class _Network:
  """``fn`` cut at its ReLUs into affine segments; see the module docstring."""

  def __init__(self, fn: Callable, spec: jax.ShapeDtypeStruct):
    closed = jax.make_jaxpr(fn)(spec)
    g = _Graph(closed)
    if len(g.invars) != 1 or len(g.outvars) != 1:
      raise NotImplementedError("linear_bounds: fn must map one array to one array")
    # Constants: every value that does not depend on the input, evaluated once.
    env = dict(g.consts)
    data = {g.invars[0]}
    val = lambda k: k.val if isinstance(k, jex_core.Literal) else env[k]
    with jax.ensure_compile_time_eval():  # concrete where possible, even under jit
      for e in g.eqns:
        if any(not isinstance(k, jex_core.Literal) and k in data for k in e.ins):
          for k in e.outs:
            data.add(k)
          continue
        for k, v in zip(e.outs, _bind(e, [val(k) for k in e.ins]), strict=True):
          env[k] = v
    self._consts = env
    self._data = data
    # Cut the input's path at ReLUs.
    self.segments: list[_Segment] = []
    cur = _Segment(g.invars[0], None, [])
    produced = {g.invars[0]}
    for e in g.eqns:
      dins = [k for k in e.ins if not isinstance(k, jex_core.Literal) and k in data]
      if not dins:
        continue
      for k in dins:
        if k not in produced:
          raise NotImplementedError(
              f"linear_bounds: '{e.prim.name}' reads a value from before the previous "
              "ReLU (a residual/skip connection); only feed-forward ReLU chains are "
              "supported -- use IBP (method='ibp') for this network")
      relu_like = e.is_relu or (e.prim.name == "max" and len(e.ins) == 2 and any(
          (isinstance(k, jex_core.Literal) or k not in data) and _is_zero(val(k))
          for k in e.ins))
      if relu_like:
        cur.out = dins[0]
        self.segments.append(cur)
        cur = _Segment(e.outs[0], None, [])
        produced = {e.outs[0]}
        continue
      self._check_affine(e, data)
      cur.eqns.append(e)
      produced.update(e.outs)
    out = g.outvars[0]
    if isinstance(out, jex_core.Literal) or out not in data:
      raise NotImplementedError("linear_bounds: fn's output does not depend on its input")
    if out not in produced:
      raise NotImplementedError("linear_bounds: fn's output skips the last ReLU layer")
    cur.out = out
    self.segments.append(cur)

  def _check_affine(self, e: _Eqn, data) -> None:
    name = e.prim.name
    bounded = [not isinstance(k, jex_core.Literal) and k in data for k in e.ins]
    ok = name in _AFFINE
    if name in _ONE_BOUNDED:
      ok = sum(bounded) == 1
    elif name == "div":
      ok = bounded == [True, False]
    elif name == "select_n":
      ok = not bounded[0]
    elif name in ("dynamic_slice", "gather"):
      ok = not any(bounded[1:])
    elif name == "pad":
      ok = not bounded[1]
    elif name == "convert_element_type":   # widening float casts only (others round)
      old = e.ins[0][1].aval.dtype if not isinstance(e.ins[0], jex_core.Literal) else None
      new = e.params["new_dtype"]
      ok = (old is not None and jnp.issubdtype(new, jnp.floating)
            and jnp.issubdtype(old, jnp.floating)
            and jnp.finfo(new).bits >= jnp.finfo(old).bits
            and jnp.finfo(new).nmant >= jnp.finfo(old).nmant)
    if not ok:
      raise NotImplementedError(
          f"linear_bounds: primitive '{name}' on the input's path is not affine (or has "
          "an input-dependent operand it needs constant); supported: feed-forward ReLU "
          "networks of affine ops -- use IBP (method='ibp') for this network")

  def segment_program(self, k: int) -> fp_linear.Program:
    """Segment ``k`` as a :class:`jaxcert.fp_linear.Program` (float-sound mode)."""
    seg = self.segments[k]
    return fp_linear.Program(seg.eqns, self._consts, seg.inp, seg.out,
                             f"linear_bounds(fp_sound=True), segment {k}")

  def const_keys(self, k: int) -> list:
    """Keys of the floating-point constants (weights) that segment k reads."""
    seg = self.segments[k]
    keys = []
    for e in seg.eqns:
      for kk in e.ins:
        if (not isinstance(kk, jex_core.Literal) and kk in self._consts and kk not in keys
            and jnp.issubdtype(jnp.result_type(self._consts[kk]), jnp.inexact)):
          keys.append(kk)
    return keys

  def segment_fn(self, k: int) -> Callable[..., jax.Array]:
    """``A_k`` as ``apply(z, consts=None)``; ``consts`` (aligned with ``const_keys(k)``)
    replaces the values of those constants."""
    seg = self.segments[k]
    keys = self.const_keys(k)

    def apply(z, consts=None):
      env = {seg.inp: z}
      if consts is not None:
        env.update(zip(keys, consts, strict=True))
      for e in seg.eqns:
        invals = [k.val if isinstance(k, jex_core.Literal) else
                  env[k] if k in env else self._consts[k] for k in e.ins]
        for kk, v in zip(e.outs, _bind(e, invals), strict=True):
          env[kk] = v
      return env[seg.out]

    return apply


def _call_fast(fn: Callable, *args):
  """``fn(*args)`` (arrays in, a tuple of arrays out), re-bound with _bind_fast."""
  g = _Graph(jax.make_jaxpr(fn)(*args))
  env = dict(g.consts)
  env.update(zip(g.invars, jax.tree.leaves(args), strict=True))
  val = lambda k: k.val if isinstance(k, jex_core.Literal) else env[k]
  for e in g.eqns:
    for k, v in zip(e.outs, _bind_fast(e, [val(k) for k in e.ins]), strict=True):
      env[k] = v
  return tuple(val(k) for k in g.outvars)


def _affine(net: _Network, k: int, in_shape: tuple, dtype):
  """``(b, vjp)`` for segment ``A_k(z) = W z + b``: ``b = A_k(0)`` [1, *out] and
  ``vjp(lam) = lam W``, lam [B, R, *out] -> [B, R, *in] (examples and rows at once).

  ``vjp`` is exactly the transpose of A_k's linear part (what ``jax.vjp`` gives), with
  convolutions in XLA:CPU's fast layout. Its own derivative uses the adjoint identity
  ``<G, lam W> = <W G, lam>``: the cotangent of ``lam`` is ``W G`` (A_k's forward linear
  map) and that of the weights is the weight gradient of ``<lam, W G>`` -- a forward
  convolution's, which XLA:CPU computes ~8x faster than a transposed one's.
  """
  f = net.segment_fn(k)
  consts = [net._consts[key] for key in net.const_keys(k)]
  zero = np.zeros(in_shape, dtype)   # concrete: the custom-VJP functions close over no tracer
  bias = f(zero)
  out_shape = bias.shape
  flat = lambda x, shape: x.reshape((-1,) + shape)            # [B, R, ...] -> [B R, 1, ...]

  def linear(c, x):                                           # W x, x [1, *in]
    return jax.jvp(lambda z: f(z, c), (zero,), (x,))[1]

  def transposed(lam, c):                                     # lam W
    _, pull = jax.vjp(lambda z: f(z, c), zero)
    return jax.vmap(lambda r: pull(r)[0])(flat(lam, out_shape))

  def adjoint(lam, cot, c):                                   # (W cot, d<lam, W cot>/dc)
    y, pull = jax.vjp(lambda c: jax.vmap(lambda x: linear(c, x))(flat(cot, in_shape)), c)
    return y, pull(flat(lam, out_shape))[0]

  @jax.custom_vjp
  def vjp(lam, c):
    y, = _call_fast(transposed, lam, c)
    return y.reshape(lam.shape[:2] + in_shape[1:])

  def vjp_fwd(lam, c):
    return vjp(lam, c), (lam, c)

  def vjp_bwd(res, cot):
    lam, c = res
    y, *dc = _call_fast(adjoint, lam, cot, c)
    return y.reshape(lam.shape), dc

  vjp.defvjp(vjp_fwd, vjp_bwd)
  return bias, lambda lam: vjp(lam, consts)


def _relaxation(pre: Interval):
  """(a, s, t): ``a v <= relu(v) <= s v + t`` for every v in ``pre``."""
  lo, up = pre.lower, pre.upper
  active, inactive = lo >= 0, up <= 0
  unstable = ~active & ~inactive
  width = jnp.where(unstable, up - lo, 1.0)
  s = jnp.where(active, 1.0, jnp.where(unstable, up / width, 0.0))
  t = jnp.where(unstable, s * (-lo), 0.0)   # = -lo up / (up - lo); never underflows to 0
                                            # while s up does not (review finding)
  a = jnp.where(active, 1.0, jnp.where(unstable, (up > -lo).astype(lo.dtype), 0.0))
  return a, s, t


def _sum_tail(x, keep: int = 2):
  return jnp.sum(x, axis=tuple(range(keep, x.ndim)))


def _dot_tail(lam: jax.Array, x: jax.Array) -> jax.Array:
  """``sum(lam * x[:, None])`` over all but the first two axes -> [B, R]: lam [B, R, ...],
  x [B, ...]; a batch axis of size 1 on either broadcasts.

  A dot_general, not a multiply and reduce: its gradient then sums over the rows R by a
  matrix product (XLA:CPU's fused reduction over a non-minor axis is ~50x slower).
  """
  n = lam.ndim - 2
  tail = (tuple(range(2, n + 2)), tuple(range(1, n + 1)))
  hi = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
  if lam.shape[0] == x.shape[0]:
    return lax.dot_general(lam, x, (tail, ((0,), (0,))), precision=hi)
  if x.shape[0] == 1:
    return lax.dot_general(lam, x[0], ((tail[0], tuple(range(n))), ((), ())), precision=hi)
  return lax.dot_general(x, lam[0], ((tail[1], tuple(range(1, n + 1))), ((), ())),
                         precision=hi)


def _backward_lower(affine, pre, box0: Interval, m: int, lam: jax.Array,
                    stop: int = 0, fp=None) -> jax.Array:
  """Lower bounds of ``lam[b, r] . zhat_m`` (example b) over the input box.

  affine: list of (bias b_k, vjp_k) per segment; pre: pre-activation boxes
  (``pre[k]`` bounds the output of segment k); lam [B, R, *shape of zhat_m] (B examples,
  or 1 for rows shared by all, R rows).
  Back-substitutes through segments m, m-1, ..., stop; with ``stop > 0`` the linear
  bound is then minimised over the IBP box of segment ``stop``'s input
  ``relu(pre[stop - 1])`` instead of the input box (cheaper, sound, looser).
  ``fp``: per-segment :func:`jaxcert.fp_linear.segment_terms` -- the float-sound
  variant (:func:`_backward_lower_fp`). Returns [B, R].
  """
  if fp is not None:
    return _backward_lower_fp(affine, pre, box0, m, lam, stop, fp)
  const = jnp.zeros(lam.shape[:2], lam.dtype)
  for k in range(m, stop - 1, -1):
    bias, vjp = affine[k]
    const = const + _dot_tail(lam, bias)
    lam = vjp(lam)
    if k == stop:
      break
    a, s, t = _relaxation(pre[k - 1])
    pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
    const = const + _dot_tail(neg, t)
    lam = pos * a[:, None] + neg * s[:, None]
  z = box0 if stop == 0 else _relu(pre[stop - 1])
  return const + _dot_tail(lam, z.center) - _dot_tail(jnp.abs(lam), z.radius)


def _abs_times(lam: jax.Array, v: jax.Array) -> jax.Array:
  """``|lam| v`` with ``0 * inf`` taken as 0 (``v >= 0``)."""
  return jnp.where(lam == 0, 0.0, jnp.abs(lam) * v)


def _backward_lower_fp(affine, pre, box0: Interval, m: int, lam: jax.Array, stop: int,
                       fp) -> jax.Array:
  """:func:`_backward_lower` with every rounding paid for (``jaxcert.fp_linear``'s
  module docstring has the inequalities). ``c`` is the float bound before the
  error, ``e`` a float upper bound on the accumulated error; returns ``c - e``
  rounded down."""
  fmt = _format(lam.dtype)
  tau = float(fmt.tau)
  two_u = 2 * fmt.u
  c = jnp.zeros(lam.shape[:2], lam.dtype)
  e = jnp.zeros(lam.shape[:2], lam.dtype)

  def accumulate(c, e, s):
    c2 = c + s
    return c2, _add_up(e, _add_up(_mul_up(jnp.abs(c2), two_u), 2 * tau))

  def add_error(e, x):
    return _add_up(e, _clean(x, True))

  lam = fp_linear.flush(lam)
  for k in range(m, stop - 1, -1):
    bias, transpose = affine[k]
    terms = fp[k]
    # k < m: lam came from the ReLU step at zhat_k, whose rounding V_relu, c_relu add.
    v, cst = (terms["V_relu"], terms["c_relu"]) if k < m else (terms["V"], terms["c"])
    n = terms["n_out"]
    _, under = fp_linear.dot_error(fmt, n)
    c, e = accumulate(c, e, _sum_tail(lam * terms["bias"][:, None]))
    e = add_error(e, fp_linear.sum_upper(fmt, _sum_tail(_abs_times(lam, v[:, None])), n))
    e = _add_up(_add_up(e, jnp.asarray(fmt.up(under), lam.dtype)), cst[:, None])
    lam = fp_linear.flush(jax.vmap(transpose, in_axes=1, out_axes=1)(lam))
    if k == stop:
      break
    a, s, t = fp_linear.relaxation(pre[k - 1].lower, pre[k - 1].upper)
    pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
    n = terms["n_in"]
    g, under = fp_linear.dot_error(fmt, n)
    neg_t = _abs_times(neg, t[:, None])   # t = 0 unless unstable; 0 * inf counts as 0
    c, e = accumulate(c, e, -_sum_tail(neg_t))
    e = add_error(e, _mul_up(fp_linear.sum_upper(fmt, _sum_tail(neg_t), n), g))
    e = add_error(e, _mul_up(fp_linear.sum_upper(fmt, _sum_tail(pos), n), fmt.tau))
    e = _add_up(e, jnp.asarray(fmt.up(under), lam.dtype))
    lam = fp_linear.flush(pos * a[:, None] + neg * s[:, None])
  z = box0 if stop == 0 else _relu(pre[stop - 1])
  zc, zr = _mid_rad(z)
  n = math.prod(zc.shape[1:])
  g, under = fp_linear.dot_error(fmt, n)
  terms = jnp.where(lam == 0, 0.0, lam * zc[:, None]) - _abs_times(lam, zr[:, None])
  c, e = accumulate(c, e, _sum_tail(terms))
  zmag = _next(jnp.abs(zc) + zr, True)
  e = add_error(e, _mul_up(fp_linear.sum_upper(fmt, _sum_tail(_abs_times(lam, zmag[:, None])),
                                               n), g))
  e = _add_up(e, jnp.asarray(fmt.up(under), lam.dtype))
  return _sub_down(c, e)


def _chunked(f: Callable, xs, n: int, chunk: int):
  """``concatenate([f(xs[i:i + chunk]) for i in range(0, n, chunk)])`` along the leading
  axis of every leaf of ``xs`` and of f's outputs, as a loop over the chunks
  (``lax.map``); straight-line code when one chunk holds all (XLA:CPU optimises a loop
  body less)."""
  if n <= chunk:
    return f(xs)
  full = n - n % chunk
  split = lambda x: x[:full].reshape((full // chunk, chunk) + x.shape[1:])
  out = lax.map(f, jax.tree.map(split, xs))
  out = jax.tree.map(lambda y: y.reshape((full,) + y.shape[2:]), out)
  if n > full:
    rest = f(jax.tree.map(lambda x: x[full:], xs))
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
  return out


def _box_by_backsubstitution(affine, pre, box0, m, shape, row_chunk, stop=0, fp=None):
  """Box on ``zhat_m`` (shape [B, *shape]): 2 n rows (+e_j, -e_j), in chunks."""
  n = 1
  for s in shape[1:]:
    n *= s
  b = shape[0]
  rows = 2 * n
  chunk = min(row_chunk, rows)
  num_chunks = -(-rows // chunk)
  dtype = box0.lower.dtype

  def block(i):
    r = i * chunk + jnp.arange(chunk)
    coord, sign = r % n, jnp.where(r < n, 1.0, -1.0).astype(dtype)
    lam = jax.nn.one_hot(coord, n, dtype=dtype) * sign[:, None]        # [chunk, n]
    # Batch axis 1: the rows are the same for every example until the first relaxation.
    lam = lam.reshape((1, chunk) + tuple(shape[1:]))
    return _backward_lower(affine, pre, box0, m, lam, stop, fp)         # [B, chunk]

  if num_chunks == 1:   # straight-line code: XLA:CPU optimises a loop body less
    low = block(0)
  else:
    low = lax.map(block, jnp.arange(num_chunks))                        # [chunks, B, chunk]
    low = jnp.moveaxis(low, 0, 1).reshape(b, num_chunks * chunk)
  lower = low[:, :n].reshape(shape)
  upper = -low[:, n:rows].reshape(shape)
  # Overflow (inf / inf in a relaxation) gives NaN: replace it by the trivial bound.
  return Interval(jnp.where(jnp.isnan(lower), -jnp.inf, lower),
                  jnp.where(jnp.isnan(upper), jnp.inf, upper))


def _intersect(a: Interval, b: Interval) -> Interval:
  return Interval(jnp.maximum(a.lower, b.lower), jnp.minimum(a.upper, b.upper))


def _relu(box: Interval) -> Interval:
  return Interval(jnp.maximum(box.lower, 0), jnp.maximum(box.upper, 0))


def _transpose_program(vjp, out_like: jax.Array, k: int) -> fp_linear.Program:
  """The transpose ``c -> c W_k`` of segment ``k`` (its ``jax.vjp``) as a Program."""
  g = _Graph(jax.make_jaxpr(lambda c: vjp(c)[0])(jnp.zeros_like(out_like)))
  return fp_linear.Program(g.eqns, g.consts, g.invars[0], g.outvars[0],
                           f"linear_bounds(fp_sound=True), transpose of segment {k}")


def _bounds_one(net: _Network, box0: Interval, method: str, row_chunk: int,
                intersect_ibp: bool, depth: int | None, fp_sound: bool = False) -> Interval:
  """Bounds for a batch box0 [B, ...] of examples (the network is traced at batch 1);
  ``fp_sound``: float-sound, one example (B = 1)."""
  fns = [net.segment_fn(k) for k in range(len(net.segments))]
  affine, pre, fp = [], [], ([] if fp_sound else None)
  fmt = _format(box0.lower.dtype) if fp_sound else None
  z = box0
  for k, f in enumerate(fns):
    if fp_sound:
      zero = jnp.zeros(z.lower.shape, z.lower.dtype)
      bias, vjp = jax.vjp(f, zero)
      fwd, bwd = net.segment_program(k), _transpose_program(vjp, bias, k)
      mag = _clean(jnp.maximum(jnp.abs(z.lower), jnp.abs(z.upper)), True)
      # The bias by fwd.run: convolutions as windows (no backend Winograd/FFT).
      fp.append(fp_linear.segment_terms(fwd, bwd, mag, fwd.run(zero), fmt))
      affine.append((fp[-1]["bias"], bwd.run))
      box = ibp(f, fp_sound=True)(z)
    else:
      affine.append(_affine(net, k, (1,) + z.lower.shape[1:], z.lower.dtype))
      box = jax.vmap(lambda lo, up, f=f: ibp(f)(Interval(lo[None], up[None])))(z.lower,
                                                                                 z.upper)
      box = Interval(box.lower[:, 0], box.upper[:, 0])
    if method == "crown" and 0 < k < len(fns) - 1:
      box = _intersect(box, _box_by_backsubstitution(affine, pre, box0, k,
                                                     box.lower.shape, row_chunk, fp=fp))
    if k < len(fns) - 1:
      pre.append(box)
      z = _relu(box)
      if fp_sound:
        fp[k].update(fp_linear.relu_step_terms(fp[k], box.lower, box.upper, fmt))
  out_ibp = box
  if method == "ibp":
    return out_ibp
  last = len(fns) - 1
  stop = 0 if depth is None else max(0, last + 1 - depth)
  out = _box_by_backsubstitution(affine, pre, box0, last, out_ibp.lower.shape, row_chunk,
                                 stop, fp=fp)
  return _intersect(out, out_ibp) if intersect_ibp else out


def check_batch_independent(fn: Callable[[jax.Array], jax.Array], x) -> bool | None:
  """Raises ValueError if ``fn`` mixes the examples of a batch (e.g. a batch mean).

  Linear bounds are computed one example at a time, which bounds ``fn`` on a batch of
  one; a function whose output for example 1 depends on example 0 is then not what
  the box describes. Checked with one JVP at a random batch of two examples shaped like
  ``x`` (pixels in [0, 1]; a tangent on example 0 only
  must leave example 1's output unchanged). Returns True when checked, None when it
  cannot be decided here (fewer than 2 examples, or ``fn`` closes over traced values).
  """
  try:
    x = np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None   # traced: cannot be decided here
  if x.ndim < 1 or x.shape[0] < 2:
    return None
  x = jnp.asarray(x)
  # A random point (not x itself: identical examples or kinks could hide a dependence).
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(k1, (2,) + x.shape[1:], x.dtype)
  tangent = jnp.zeros_like(x).at[0].set(jax.random.normal(k2, x.shape[1:], x.dtype))
  try:
    with jax.ensure_compile_time_eval():
      _, out = jax.jvp(fn, (x,), (tangent,))
      leak = float(jnp.max(jnp.abs(out[1])))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          TypeError):
    return None
  if leak != 0.0:
    raise ValueError(
        "fn mixes the examples of a batch (its output for one example changes with "
        f"another example's input, by {leak:.3g} per unit tangent): linear bounds bound "
        "each example on its own, so they do not describe this function -- make the "
        "model per-example (e.g. BatchNorm in inference mode) or use IBP")
  return True


def linear_bounds(fn: Callable[[jax.Array], jax.Array], method: str = "crown_ibp", *,
                  image_chunk: int = 4, row_chunk: int = 128,
                  intersect_ibp: bool = True, depth: int | None = None,
                  fp_sound: bool = False) -> Callable[[Interval], Interval]:
  """Bound transform: ``linear_bounds(fn, method)(box)`` bounds ``fn(x)`` for x in box.

  fn: maps a batch ``[B, ...]`` to ``[B, ...]`` with each example independent of the
  others (as a feature extractor in inference mode is; checked by
  :func:`check_batch_independent` whenever ``fn`` and the box are concrete). method: ``"ibp"``,
  ``"crown_ibp"`` or ``"crown"`` (module docstring). box: Interval ``[B, ...]``.
  ``image_chunk`` examples are bounded at a time and ``row_chunk`` backward rows per
  pass, which bounds memory (the defaults were the fastest on a 2-core CPU for the CBIR
  Small and Large models). ``depth``: back-substitute the output's
  bounds through the last ``depth`` affine layers only and bound the rest by IBP's box
  there (``None``: down to the input) -- a cheaper, looser bound for training.
  Returns an Interval with ``fn``'s output shape. Works under ``jax.jit`` and is
  differentiable (for training with CROWN-IBP bounds).

  ``fp_sound=True`` (float32/float64 boxes): the box also holds despite the float
  rounding of the bound computation and contains the float forward pass of ``fn`` in
  any summation order, as ``ibp(fp_sound=True)`` does (:mod:`jaxcert.fp_linear` has the
  proof). Intermediate boxes come from ``ibp(fp_sound=True)``; convolutions in the
  transposed layers are computed as sums of exact windows, one example at a time.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
  if depth is not None and (not isinstance(depth, int) or depth < 1):
    raise ValueError(f"depth must be None or an integer >= 1, got depth={depth!r}")
  for name, v in (("image_chunk", image_chunk), ("row_chunk", row_chunk)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {name}={v!r}")
  if method == "ibp":
    return ibp(fn, fp_sound=fp_sound)

  @functools.wraps(fn)
  def bounded(box: Interval) -> Interval:
    if not isinstance(box, Interval):
      raise TypeError(f"box must be a jaxcert.interval.Interval, got {type(box).__name__}")
    if jnp.ndim(box.lower) < 1:
      raise ValueError(f"box must have a batch axis, got shape {jnp.shape(box.lower)}")
    if fp_sound:   # non-subnormal end points, float64 numpy rounded outward
      box = _fp_input(box)
    one = jax.ShapeDtypeStruct((1,) + tuple(jnp.shape(box.lower)[1:]),
                               jnp.result_type(box.lower))
    net = _Network(fn, one)
    check_batch_independent(fn, box.center)
    if fp_sound:
      def per_example(lu):
        lo, up = lu
        b = _bounds_one(net, Interval(lo[None], up[None]), method, row_chunk,
                        intersect_ibp, depth, fp_sound=True)
        return b.lower[0], b.upper[0]

      lo, up = lax.map(per_example, (box.lower, box.upper),
                       batch_size=min(image_chunk, jnp.shape(box.lower)[0]))
      return Interval(lo, up)

    def per_chunk(lu):
      b = _bounds_one(net, Interval(*lu), method, row_chunk, intersect_ibp, depth)
      return b.lower, b.upper

    lo, up = _chunked(per_chunk, (box.lower, box.upper), jnp.shape(box.lower)[0],
                      image_chunk)
    return Interval(lo, up)

  return bounded
