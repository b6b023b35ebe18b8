"""Interval bound propagation (IBP) as a function transform.

``ibp(fn)`` traces ``fn`` to a jaxpr and evaluates it on intervals, one rule per
primitive (CBIR paper Eq. 15-16; Gowal et al. 2018). The guarantee: for every
input ``x`` with ``lower <= x <= upper`` elementwise, ``fn(x)`` lies inside the
returned ``Interval`` -- in exact real arithmetic. By default float32 rounding of
the bound computation itself is not accounted for; ``ibp(fn, fp_sound=True)``
accounts for it (see "Floating-point-sound mode" below and docs/FLOAT_SOUNDNESS.md).

Rules:
- affine ops with one bounded operand (``dot_general``, ``conv_general_dilated``,
  ``mul``, ``div`` by a constant) use centre/radius form: ``W c`` and ``|W| r``;
- bilinear ops with two bounded operands use ``c1 c2 +- (|c1| r2 + r1 |c2| + r1 r2)``;
- monotone elementwise ops map the two end points (decreasing ones swap them);
- structural ops (reshape, transpose, broadcast, slicing, padding, gather, ...) and
  monotone reductions (sums, max/min pooling) apply to each end point;
- nested ``jit``, ``custom_jvp`` and ``custom_vjp`` calls are interpreted recursively.

Anything else raises ``NotImplementedError`` naming the primitive: there is no
silent fallback. Equations whose inputs carry no interval are evaluated normally,
so constant sub-computations (e.g. BatchNorm statistics) cost nothing extra.
The transform works under ``jax.jit`` and ``jax.vmap``. Matrix products and
convolutions in the bounds always run at ``Precision.HIGHEST``: accelerators
otherwise default to reduced-precision passes (TF32 on recent NVIDIA GPUs, bf16
on TPUs) whose error would dwarf the bound's own float32 rounding.

Floating-point-sound mode (``fp_sound=True``, MATH.md C). Every rule's result is
widened so that the returned box contains, for every input in the input box, both
(a) the exact real-arithmetic value of ``fn`` (the model's float weights taken as
exact real numbers) and (b) the value the float computation of ``fn`` itself returns
(the deployed forward pass), despite the rounding of the bound computation. The
error model (IEEE 754 binary32/binary64, ``u = 2^-24`` / ``2^-53``, smallest normal
``tau = 2^-126`` / ``2^-1022``): every add, sub, mul, div and sqrt returns a
faithfully rounded result (correctly rounded, FMA contraction allowed), except that
a result of magnitude below ``tau`` may be flushed to zero (FTZ) and a subnormal
operand may be read as zero (DAZ) -- XLA on x86 CPUs does both. Matrix products and
convolutions may sum in any order (blocked GEMM, split-K, FMA; not Winograd/FFT,
which compute other numbers). In this mode the bound computes convolutions itself, as
exact input windows (pad + strided slices) times kernel slices (``dot_general``)
summed over the kernel offsets, never by a Winograd/FFT algorithm, so it holds on any
backend with IEEE float32 matmuls (not on TPUs, whose float32 matmuls are bf16
passes, nor with TF32). Per primitive (``gamma_k = k u / (1 - k u)``, ``n`` products per output):

- exact ops (structural ops, max/min, relu, max pooling, abs, neg, floor, select with
  a constant predicate): no widening;
- one correctly rounded op (add, sub, elementwise mul): the end points are computed
  from the operands' end points and moved one float outward;
- ``dot_general`` / convolution: two products per bounded operand, the centre
  ``Yc = fl(W c)`` and ``D = fl(|W| v)`` with ``v >= r + (g1 + g) |c| + g r``, widened by
  ``(D + A1) / (1 - g1) + A1 + A``: ``g = gamma_{n+1}`` bounds the float forward pass
  (any summation order), ``g1 = gamma_{1 + b + nb}`` the bound's own products, which
  sum ``nb`` blocks of ``b`` products in a loop (``b ~ sqrt(n)`` for long dense
  contractions; for convolutions ``b`` = input channels, ``nb`` = kernel offsets);
  ``A``, ``A1`` are the underflow terms; see ``_fp_affine``;
- sums (``reduce_sum``, ``reduce_window_sum``, ``cumsum``): ``gamma_{n+1}`` times the
  sum of ``max(|l|, |u|)``, ``n`` the number of summed terms;
- ``div`` (possibly rewritten by XLA as ``x * (1/c)``) and ``integer_pow``:
  ``gamma_k`` for the ``k`` roundings of any evaluation;
- transcendental primitives (exp, log, tanh, logistic, erf, sqrt, rsqrt, ...): widened
  by a stated ulp budget per primitive (``_LIBRARY_ULPS``). XLA's implementations are
  not correctly rounded; the budgets are about 4x the largest error measured on
  XLA:CPU. That is an assumption about the math library, not a proof. The CBIR models
  (Small/Large CNN: affine ops, relu, max, (x - mean) / std) use none of them, so for
  them the box is a proof under the error model above.

Every end point is finally moved outward to the next float with bit arithmetic,
which also replaces subnormal end points by ``0`` or ``+-tau``; so end points are
never subnormal, a flushed operand stays inside its box, and the float forward
pass is covered under FTZ/DAZ as well. Sub-computations that do not depend on a
bounded input (e.g. BatchNorm scale from its statistics) are evaluated in float and
their results are the model's constants, for (a) as for (b).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Interval:
  """Elementwise bounds ``lower <= x <= upper`` (both arrays of one shape)."""

  lower: jax.Array
  upper: jax.Array

  @property
  def center(self) -> jax.Array:
    return (self.upper + self.lower) / 2

  @property
  def radius(self) -> jax.Array:
    return (self.upper - self.lower) / 2

  @property
  def width(self) -> jax.Array:
    return self.upper - self.lower

  @property
  def shape(self) -> tuple[int, ...]:
    return jnp.shape(self.lower)

  @classmethod
  def from_center_radius(cls, center, radius) -> "Interval":
    return cls(center - radius, center + radius)

  def contains(self, x, atol: float = 0.0) -> jax.Array:
    """Boolean array: ``lower - atol <= x <= upper + atol``."""
    return (x >= self.lower - atol) & (x <= self.upper + atol)


def input_box(x: jax.typing.ArrayLike, eps: float, *, valid_min: float = 0.0,
              valid_max: float = 1.0, fp_sound: bool = False) -> Interval:
  """The l_inf ball ``[x - eps, x + eps]`` clipped to ``[valid_min, valid_max]``.

  Clipping only removes inputs that are not images, so every bound computed
  from the clipped box is sound for the threat model (pixels in [0, 1]).
  ``eps`` is a Python number or a scalar/broadcastable array (may be traced).

  ``fp_sound=True``: the box contains every real point of the ball. ``x - eps`` and
  ``x + eps`` are rounded outward (a Python ``eps`` is first rounded up to ``x``'s
  dtype; an array ``eps`` is taken as it is), subnormal pixels are replaced by ``0``
  or ``+-tau``, and ``valid_min`` / ``valid_max`` are rounded outward; a float64
  numpy ``x`` with x64 disabled is rounded outward to float32 first.
  """
  if isinstance(eps, (int, float)) and not eps >= 0:
    raise ValueError(f"eps must be a finite number >= 0, got eps={eps!r}")
  if not fp_sound:
    x = jnp.asarray(x)
    return Interval(jnp.clip(x - eps, valid_min, valid_max),
                    jnp.clip(x + eps, valid_min, valid_max))
  x_lo, x_hi = _outward_array(x)
  fmt = _format(x_lo.dtype, "input_box(x)")
  if isinstance(eps, (int, float)):
    eps = jnp.asarray(fmt.up(Fraction(eps)), x_lo.dtype)
  else:
    eps = _clean(jnp.asarray(eps, x_lo.dtype), True)
  vmin = jnp.asarray(fmt.down(Fraction(valid_min)), x_lo.dtype)
  vmax = jnp.asarray(fmt.up(Fraction(valid_max)), x_lo.dtype)
  return Interval(jnp.clip(_next(_clean(x_lo, False) - eps, False), vmin, vmax),
                  jnp.clip(_next(_clean(x_hi, True) + eps, True), vmin, vmax))


def _outward_array(x) -> tuple[jax.Array, jax.Array]:
  """(lower, upper) JAX arrays enclosing ``x``: exact unless a float64 numpy array
  must become float32 (x64 disabled), in which case it is rounded outward."""
  if isinstance(x, np.ndarray) and x.dtype == np.float64 and not jax.config.jax_enable_x64:
    x32 = x.astype(np.float32)
    lo = np.where(x32 > x, np.nextafter(x32, np.float32(-np.inf)), x32)
    hi = np.where(x32 < x, np.nextafter(x32, np.float32(np.inf)), x32)
    return jnp.asarray(lo), jnp.asarray(hi)
  x = jnp.asarray(x)
  return x, x


# --------------------------------------------------------------------------
# Rules. Each takes (invals, params) where invals are arrays or Intervals with at
# least one Interval, and returns a value or list of values (multiple results).

_RULES: dict[Any, Callable[..., Any]] = {}


def _is_iv(v) -> bool:
  return isinstance(v, Interval)


def _lo(v):
  return v.lower if _is_iv(v) else v


def _hi(v):
  return v.upper if _is_iv(v) else v


def _each_endpoint(prim, invals, params):
  """Apply ``prim`` to lower ends and to upper ends: exact for ops that are
  non-decreasing in every operand (structural ops, sums, max, min, ...)."""
  lo = prim.bind(*[_lo(v) for v in invals], **params)
  hi = prim.bind(*[_hi(v) for v in invals], **params)
  if prim.multiple_results:
    return [Interval(a, b) for a, b in zip(lo, hi, strict=True)]
  return Interval(lo, hi)


def _decreasing(prim, invals, params):
  (x,) = invals
  return Interval(prim.bind(x.upper, **params), prim.bind(x.lower, **params))


def _bilinear(prim, invals, params):
  """Bounds for ops linear in each operand: dot_general, conv, mul."""
  a, b = invals
  if "precision" in params:  # no reduced-precision (e.g. TF32/bf16) passes in bounds
    params = {**params, "precision": (lax.Precision.HIGHEST, lax.Precision.HIGHEST)}
  op = functools.partial(prim.bind, **params)
  if not _is_iv(b):
    return Interval.from_center_radius(op(a.center, b), op(a.radius, jnp.abs(b)))
  if not _is_iv(a):
    return Interval.from_center_radius(op(a, b.center), op(jnp.abs(a), b.radius))
  ca, ra, cb, rb = a.center, a.radius, b.center, b.radius
  rad = op(jnp.abs(ca), rb) + op(ra, jnp.abs(cb)) + op(ra, rb)
  return Interval.from_center_radius(op(ca, cb), rad)


def _add(prim, invals, params):
  return _each_endpoint(prim, invals, params)


def _sub(prim, invals, params):
  a, b = invals
  return Interval(prim.bind(_lo(a), _hi(b)), prim.bind(_hi(a), _lo(b)))


def _reciprocal(x: Interval) -> Interval:
  """1/x for an interval that excludes 0 (else unbounded)."""
  pos = x.lower > 0
  neg = x.upper < 0
  inf = jnp.full_like(x.lower, jnp.inf)
  lo = jnp.where(pos | neg, 1 / x.upper, -inf)
  hi = jnp.where(pos | neg, 1 / x.lower, inf)
  return Interval(lo, hi)


def _div(prim, invals, params):
  a, b = invals
  if not _is_iv(b):
    return Interval.from_center_radius(a.center / b, a.radius / jnp.abs(b))
  return _bilinear(lax.mul_p, [a, _reciprocal(b)], {})


def _integer_pow(prim, invals, params):
  (x,) = invals
  y = params["y"]
  lo = prim.bind(x.lower, **params)
  hi = prim.bind(x.upper, **params)
  if y % 2 == 1:
    return Interval(lo, hi) if y > 0 else _reciprocal_pow(x, y)
  if y < 0:
    return _reciprocal_pow(x, y)
  straddle = (x.lower < 0) & (x.upper > 0)
  return Interval(jnp.where(straddle, 0, jnp.minimum(lo, hi)), jnp.maximum(lo, hi))


def _reciprocal_pow(x: Interval, y: int) -> Interval:
  return _integer_pow(lax.integer_pow_p, [_reciprocal(x)], {"y": -y})


def _square(prim, invals, params):
  return _integer_pow(lax.integer_pow_p, invals, {"y": 2})


def _abs(prim, invals, params):
  (x,) = invals
  lo = jnp.where(x.lower >= 0, x.lower, jnp.where(x.upper <= 0, -x.upper, 0))
  return Interval(lo.astype(x.lower.dtype), jnp.maximum(jnp.abs(x.lower), jnp.abs(x.upper)))


def _select_n(prim, invals, params):
  pred, *cases = invals
  if _is_iv(pred):
    raise NotImplementedError(
        "ibp: select_n with an input-dependent predicate is not supported")
  return _each_endpoint(prim, invals, params)


def _clamp(prim, invals, params):
  # clamp(lo, x, hi) is non-decreasing in all three operands.
  return _each_endpoint(prim, invals, params)


def _const_index(num_data: int, apply=_each_endpoint):
  """Indexing ops: the first ``num_data`` operands may be bounded, indices not."""
  def rule(prim, invals, params):
    if any(_is_iv(v) for v in invals[num_data:]):
      raise NotImplementedError(
          f"ibp: '{prim.name}' with input-dependent indices is not supported")
    return apply(prim, invals, params)
  return rule


# Named jit / custom_jvp functions that are non-decreasing in every argument; their
# jaxprs can contain NaN guards (select_n on input-dependent predicates), so they
# are evaluated at the two end points instead of rule by rule.
# (Functions with a user-set slope, e.g. elu or leaky_relu, are not listed: a
# negative parameter would make them non-monotone.)
_MONOTONE_CALLS = frozenset({"relu", "relu6", "softplus", "logaddexp", "sigmoid",
                             "log_sigmoid", "hard_tanh", "selu", "hard_sigmoid"})


def _library_functions() -> dict[str, Callable[..., Any]]:
  return {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "softplus": jax.nn.softplus,
          "logaddexp": jnp.logaddexp, "sigmoid": jax.nn.sigmoid,
          "log_sigmoid": jax.nn.log_sigmoid, "hard_tanh": jax.nn.hard_tanh,
          "selu": jax.nn.selu, "hard_sigmoid": jax.nn.hard_sigmoid}


@functools.lru_cache(maxsize=512)
def _library_jaxprs(name: str, avals: tuple) -> frozenset[str]:
  """Printed jaxprs (the whole trace and every nested call body) of jax's own ``name``."""
  fn = _library_functions()[name]
  try:
    ref = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(s, d) for s, d in avals])
  except Exception:  # noqa: BLE001 -- any failure: not the library function
    return frozenset()
  out, todo = set(), [ref.jaxpr]
  while todo:
    j = todo.pop()
    out.add(str(j))
    for e in j.eqns:
      for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = e.params.get(key)
        if sub is not None:
          todo.append(sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub)
  return frozenset(out)


def is_library_call(name: str | None, closed: "jex_core.ClosedJaxpr") -> bool:
  """True iff a call named ``name`` has exactly the body of jax's own function of that
  name (``jax.nn.relu``, ...) at these input shapes. A user function that merely has
  the name (``@jax.jit def relu(x, b): ...``) is interpreted rule by rule instead."""
  if name not in _MONOTONE_CALLS or closed.consts:
    return False
  avals = tuple((tuple(v.aval.shape), v.aval.dtype) for v in closed.jaxpr.invars)
  return str(closed.jaxpr) in _library_jaxprs(name, avals)


def _call(prim, invals, params, *, fp_sound: bool = False):
  """Nested jit / custom_jvp / custom_vjp / closed calls: recurse."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in params:
      sub = params[key]
      break
  else:
    raise NotImplementedError(f"ibp: no jaxpr found in call primitive '{prim}'")
  if isinstance(sub, jex_core.ClosedJaxpr):
    closed = sub
  else:
    closed = jex_core.ClosedJaxpr(sub, ())
  name = params.get("name")
  if is_library_call(name, closed):
    fn = jex_core.jaxpr_as_fun(closed)
    if not fp_sound:
      lo, hi = fn(*[_lo(v) for v in invals]), fn(*[_hi(v) for v in invals])
      return [Interval(a, b) for a, b in zip(lo, hi, strict=True)]
    lo, hi = fn(*_endpoints(invals, False)), fn(*_endpoints(invals, True))
    ulps = _CALL_ULPS[name]
    if not ulps:
      return [Interval(a, b) for a, b in zip(lo, hi, strict=True)]
    return [_widen_library(a, b, ulps) for a, b in zip(lo, hi, strict=True)]
  return _eval_jaxpr(closed.jaxpr, closed.consts, invals, fp_sound=fp_sound)


def _register(names, rule, table=_RULES):
  for name in names:
    prim = _PRIMS.get(name)
    if prim is not None:
      table[prim] = functools.partial(rule, prim)


def _collect_primitives() -> dict[str, Any]:
  prims = {}
  for name in dir(lax):
    obj = getattr(lax, name)
    if isinstance(obj, jex_core.Primitive):
      prims[obj.name] = obj
  # Primitives not exported through jax.lax.
  from jax._src import ad_checkpoint, ad_util, core, custom_derivatives, pjit  # noqa: PLC0415
  from jax._src.lax import convolution, windowed_reductions  # noqa: PLC0415
  for mod in (custom_derivatives, pjit, ad_checkpoint, ad_util, core, convolution,
              windowed_reductions):
    for name in dir(mod):
      obj = getattr(mod, name)
      if isinstance(obj, jex_core.Primitive):
        prims.setdefault(obj.name, obj)
  return prims


_PRIMS = _collect_primitives()

_INCREASING = (
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "cbrt",
    "erf", "erf_inv", "atan", "asinh", "sinh", "floor", "ceil", "round", "sign",
)
_STRUCTURAL = (
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
    "slice", "concatenate",
    "pad", "rev", "copy", "copy_p", "convert_element_type", "reduce_precision",
    "sharding_constraint", "reduce_sum", "reduce_max", "reduce_min",
    "reduce_window_sum", "reduce_window_max", "reduce_window_min",
    "cumsum", "cummax", "cummin", "max", "min", "real",
)
_register(_INCREASING, lambda p, v, k: _each_endpoint(p, v, k))
_register(_STRUCTURAL, _each_endpoint)
_register(("dynamic_slice", "gather"), _const_index(1))
_register(("dynamic_update_slice",), _const_index(2))
_register(("neg", "rsqrt"), _decreasing)  # rsqrt: decreasing on its domain x > 0
_register(("dot_general", "conv_general_dilated", "mul"), _bilinear)
_register(("add", "add_any"), _add)
_register(("sub",), _sub)
_register(("div",), _div)
_register(("integer_pow",), _integer_pow)
_register(("square",), _square)
_register(("abs",), _abs)
_register(("select_n",), _select_n)
_register(("clamp",), _clamp)
_register(("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
           "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2"), _call)


# --------------------------------------------------------------------------
# Floating-point-sound mode (``fp_sound=True``): the error model, outward rounding
# and the widened rules. All proofs assume the error model of the module docstring:
# for an operation whose exact result on its (read) operands is ``a``, the stored
# result is ``fl(a)``, a neighbour of ``a`` among the floats (faithful rounding;
# round-to-nearest is one case) or, when ``|a| < tau``, possibly zero (FTZ); an
# operand stored as a subnormal may be read as zero (DAZ).


@dataclasses.dataclass(frozen=True)
class _Format:
  """An IEEE 754 binary format: unit roundoff ``u = 2^-precision``, smallest
  normal ``tau = 2^min_exp``, and the bit masks of its integer view."""

  dtype: Any
  int_dtype: Any
  precision: int
  min_exp: int
  exp_mask: int
  mag_mask: int

  @property
  def u(self) -> Fraction:
    return Fraction(1, 2 ** self.precision)

  @property
  def tau(self) -> Fraction:
    return Fraction(1, 2 ** -self.min_exp)

  def up(self, q: Fraction):
    """The smallest float of this format ``>= q`` (a numpy scalar)."""
    v = self.dtype(float(q))
    while np.isfinite(v) and Fraction(float(v)) < q:
      v = np.nextafter(v, self.dtype(np.inf))
    return v

  def down(self, q: Fraction):
    """The largest float of this format ``<= q`` (a numpy scalar)."""
    return -self.up(-q)

  def gamma(self, k: int) -> Fraction:
    """``gamma_k = k u / (1 - k u)`` (Higham, Lemma 3.1): ``|prod_{i<=k} (1 + d_i)^(+-1)
    - 1| <= gamma_k`` for ``|d_i| <= u``. Requires ``k u < 1/2``."""
    ku = k * self.u
    if ku >= Fraction(1, 2):
      raise ValueError(f"ibp(fp_sound=True): {k} roundings per output value exceed what "
                       f"the {np.dtype(self.dtype).name} error bound covers (k u < 1/2)")
    return ku / (1 - ku)


_FORMATS = {
    np.dtype(np.float32): _Format(np.float32, np.int32, 24, -126, 0x7F800000, 0x7FFFFFFF),
    np.dtype(np.float64): _Format(np.float64, np.int64, 53, -1022, 0x7FF0000000000000,
                                  0x7FFFFFFFFFFFFFFF),
}


def _format(dtype, what: str = "interval bounds") -> _Format:
  dt = np.dtype(dtype)
  if dt not in _FORMATS:
    raise ValueError(
        f"ibp(fp_sound=True) supports float32 and float64 (IEEE binary32/binary64 "
        f"rounding) only; got {what} of dtype {dt.name}. Cast the inputs and "
        f"parameters to float32, or use fp_sound=False.")
  return _FORMATS[dt]


def _bits(x: jax.Array, fmt: _Format) -> jax.Array:
  return lax.bitcast_convert_type(x, fmt.int_dtype)


def _is_tiny(bits: jax.Array, fmt: _Format) -> jax.Array:
  """Zero or subnormal (exponent field 0), from the bits: immune to DAZ."""
  return (bits & fmt.exp_mask) == 0


def _next(x: jax.Array, up: bool) -> jax.Array:
  """The next float above (``up``) or below ``x``, never a subnormal.

  Guarantee: ``_next(fl(a), True) >= a`` and ``_next(fl(a), False) <= a`` for every
  real ``a`` and every ``fl(a)`` allowed by the error model. Proof: if ``fl(a)`` is
  normal, ``a`` lies strictly between its two float neighbours (faithful rounding),
  and the step goes to the neighbour on the far side (bit pattern +-1, which also
  maps the largest float to inf and -inf to the most negative float). If ``fl(a)``
  is zero or subnormal, ``|a| < tau`` and the result is ``+-tau``. A step from
  ``-+tau`` lands on a subnormal and is replaced by ``0``, still on the far side.
  ``nan`` and an infinity in the direction of the step stay as they are. Bit
  arithmetic only, so FTZ/DAZ cannot change the result.
  """
  fmt = _format(x.dtype)
  b = _bits(x, fmt)
  grow = (b >= 0) if up else (b < 0)  # moving away from zero
  nb = jnp.where(grow, b + 1, b - 1)
  y = lax.bitcast_convert_type(nb, x.dtype)
  tau = jnp.asarray(float(fmt.tau) if up else -float(fmt.tau), x.dtype)
  out = jnp.where(_is_tiny(b, fmt), tau, jnp.where(_is_tiny(nb, fmt), jnp.zeros_like(x), y))
  keep = jnp.isnan(x) | (x == (jnp.inf if up else -jnp.inf))
  return jnp.where(keep, x, out)


def _clean(x: jax.Array, up: bool) -> jax.Array:
  """Subnormals replaced by the outward neighbour ``0`` or ``+-tau`` (an exact
  widening: ``_clean(x, False) <= x <= _clean(x, True)``); other values unchanged.
  The result is read exactly under DAZ."""
  fmt = _format(x.dtype)
  b = _bits(x, fmt)
  sub = _is_tiny(b, fmt) & ((b & fmt.mag_mask) != 0)
  tau = jnp.asarray(float(fmt.tau), x.dtype)
  zero = jnp.zeros_like(x)
  repl = jnp.where(b > 0, tau, zero) if up else jnp.where(b > 0, zero, -tau)
  return jnp.where(sub, repl, x)


def _add_up(x: jax.Array, e) -> jax.Array:
  """A float ``>= x + e``; ``e`` must be a non-subnormal float (array or scalar)."""
  return _next(_clean(x, True) + e, True)


def _sub_down(x: jax.Array, e) -> jax.Array:
  """A float ``<= x - e``; ``e`` must be a non-subnormal float (array or scalar)."""
  return _next(_clean(x, False) - e, False)


def _mul_up(x: jax.Array, s: Fraction) -> jax.Array:
  """A float ``>= s x`` for ``x >= 0`` and a real constant ``s >= 0``."""
  fmt = _format(x.dtype)
  return _next(_clean(x, True) * jnp.asarray(fmt.up(s), x.dtype), True)


def _widen(lo: jax.Array, hi: jax.Array, rho: Fraction, alpha: Fraction) -> Interval:
  """Widening for a monotone map ``f`` evaluated by a routine ``f_hat`` with
  ``|f_hat(t) - f(t)| <= rho |f(t)| + alpha`` for every ``t`` (``rho < 1``).

  Given ``lo = f_hat(t_lo)`` and ``hi = f_hat(t_hi)`` where ``f(t_lo) <= f(t) <=
  f(t_hi)`` on the operand box, returns a box containing ``f(t)`` and ``f_hat(t)`` for
  every ``t`` in it. Proof (lower end; the upper one is symmetric): ``v -> v - rho |v|``
  is increasing, so ``f(t)`` and ``f_hat(t) >= f(t) - rho |f(t)| - alpha`` are both
  ``>= f(t_lo) - rho |f(t_lo)| - alpha``; with ``f(t_lo) >= lo - rho |f(t_lo)| - alpha``
  and ``|f(t_lo)| <= (|lo| + alpha) / (1 - rho)`` this is ``>= lo - s |lo| - a`` for
  ``s = 2 rho / (1 - rho)``, ``a = s alpha + 2 alpha``; each step below rounds down.
  """
  fmt = _format(lo.dtype)
  s = 2 * rho / (1 - rho)
  a = jnp.asarray(fmt.up(s * alpha + 2 * alpha), lo.dtype)
  lower = _sub_down(_sub_down(lo, _mul_up(jnp.abs(lo), s)), a)
  upper = _add_up(_add_up(hi, _mul_up(jnp.abs(hi), s)), a)
  # f_hat = +inf (-inf) at the lower (upper) end: f there is huge and positive (negative)
  zero = jnp.zeros_like(lower)
  return Interval(jnp.where(lo == jnp.inf, zero, lower), jnp.where(hi == -jnp.inf, zero, upper))


def _roundings(fmt: _Format, k: int) -> tuple[Fraction, Fraction]:
  """(rho, alpha) for a chain of ``k`` multiplications/divisions: ``rho = gamma_k`` and
  ``alpha = 2 k tau (1 + gamma_k)`` (each operation may flush a result below ``tau`` and
  a subnormal may be read as zero; a flushed value only meets factors of magnitude
  below 1 afterwards in the chains used here: powers of one value, one quotient)."""
  g = fmt.gamma(k)
  return g, 2 * k * fmt.tau * (1 + g)


# Transcendental primitives: assumed error bound of XLA's implementation, in ulps of
# the result (plus 2 tau absolute for flushed results). Max errors measured on
# XLA:CPU (jax 0.10.2, float32, 400k points per range): exp 0.97, exp2 67, log 1.07,
# log1p 2.4, expm1 4.7, tanh 4.6, logistic 2.3, erf 5.2, erf_inv 64, atan 0.66,
# asinh 2.2, sinh 24, sqrt 0.5, rsqrt 1.7, cbrt 0.93; the budgets are about 4x that.
# An assumption about the math library, not a proof (docs/FLOAT_SOUNDNESS.md).
_LIBRARY_ULPS = {
    "exp": 4, "exp2": 256, "log": 4, "log1p": 8, "expm1": 16, "tanh": 16,
    "logistic": 8, "erf": 16, "erf_inv": 256, "atan": 4, "asinh": 8, "sinh": 128,
    "sqrt": 2, "cbrt": 4, "rsqrt": 8,
}
# Monotone named calls evaluated at the end points (see _MONOTONE_CALLS): 0 = exact
# (max/min/select only), else an ulp budget as above.
_CALL_ULPS = {"relu": 0, "relu6": 0, "hard_tanh": 0, "hard_sigmoid": 4, "softplus": 32,
              "logaddexp": 32, "sigmoid": 16, "log_sigmoid": 32, "selu": 32}


def _widen_library(lo: jax.Array, hi: jax.Array, ulps: int) -> Interval:
  """``_widen`` for a routine within ``ulps`` ulps (+ 2 tau): 1 ulp <= 2 u |f|."""
  fmt = _format(lo.dtype)
  return _widen(lo, hi, 2 * ulps * fmt.u, 2 * fmt.tau)


def _endpoints(invals, up: bool) -> list:
  """Operands at their lower (upper) end; float constants outward-cleaned so that
  DAZ reads them exactly, other constants (indices, predicates) unchanged."""
  dtype = next(v.lower.dtype for v in invals if _is_iv(v))
  out = []
  for v in invals:
    if _is_iv(v):
      out.append(v.upper if up else v.lower)
    elif isinstance(v, float):
      out.append(_clean(jnp.asarray(v, dtype), up))
    elif hasattr(v, "dtype") and np.dtype(v.dtype) in _FORMATS:
      out.append(_clean(jnp.asarray(v), up))
    else:
      out.append(v)
  return out


def _fp_exact(prim, invals, params):
  """Ops that are exact and non-decreasing in every float operand (structural ops,
  max/min, pooling by max, floor, ...): each end point, constants cleaned outward."""
  lo = prim.bind(*_endpoints(invals, False), **params)
  hi = prim.bind(*_endpoints(invals, True), **params)
  if prim.multiple_results:
    return [Interval(a, b) for a, b in zip(lo, hi, strict=True)]
  return Interval(lo, hi)


def _fp_select_n(prim, invals, params):
  if _is_iv(invals[0]):
    raise NotImplementedError(
        "ibp: select_n with an input-dependent predicate is not supported")
  return _fp_exact(prim, invals, params)


def _fp_add(prim, invals, params):
  """One rounding, monotone: ``_next(fl(l1 + l2), down) <= l1 + l2 <= z1 + z2`` and
  ``<= fl(z1 + z2)`` (rounding is monotone) for all ``z`` in the boxes."""
  (al, bl), (au, bu) = _endpoints(invals, False), _endpoints(invals, True)
  return Interval(_next(prim.bind(al, bl, **params), False),
                  _next(prim.bind(au, bu, **params), True))


def _fp_sub(prim, invals, params):
  (al, bl), (au, bu) = _endpoints(invals, False), _endpoints(invals, True)
  return Interval(_next(prim.bind(al, bu, **params), False),
                  _next(prim.bind(au, bl, **params), True))


def _fp_mul(prim, invals, params):
  """Elementwise product: over a box its extremes are end-point products, so
  ``min_i fl(p_i) = fl(min_i p_i)`` moved one float outward bounds the exact product
  and (rounding being monotone) its float value. Constants are degenerate boxes."""
  (al, bl), (au, bu) = _endpoints(invals, False), _endpoints(invals, True)
  p = [prim.bind(a, b, **params) for a in (al, au) for b in (bl, bu)]
  lo = jnp.minimum(jnp.minimum(p[0], p[1]), jnp.minimum(p[2], p[3]))
  hi = jnp.maximum(jnp.maximum(p[0], p[1]), jnp.maximum(p[2], p[3]))
  return Interval(_next(lo, False), _next(hi, True))


def _fp_div(prim, invals, params):
  """Quotient over boxes, the divisor's box excluding 0 (else unbounded): extremes
  at end-point quotients, each evaluated with <= 2 roundings (XLA may rewrite
  ``x / c`` as ``x * (1 / c)``), hence ``_widen`` with ``gamma_2``. Divisors of
  magnitude >= 2^(-min_exp - 1) (whose reciprocal could be flushed) give an
  unbounded box."""
  (al, bl), (au, bu) = _endpoints(invals, False), _endpoints(invals, True)
  fmt = _format(jnp.result_type(al))
  q = [prim.bind(a, b, **params) for a in (al, au) for b in (bl, bu)]
  lo = jnp.minimum(jnp.minimum(q[0], q[1]), jnp.minimum(q[2], q[3]))
  hi = jnp.maximum(jnp.maximum(q[0], q[1]), jnp.maximum(q[2], q[3]))
  box = _widen(lo, hi, *_roundings(fmt, 2))
  big = float(2 ** (-fmt.min_exp - 1))
  ok = (((bl > 0) | (bu < 0)) & (jnp.maximum(jnp.abs(bl), jnp.abs(bu)) < big))
  return Interval(jnp.where(ok, box.lower, -jnp.inf), jnp.where(ok, box.upper, jnp.inf))


def _fp_integer_pow(prim, invals, params):
  """``x^y`` by any multiplication chain: ``y - 1`` roundings for ``y > 0``; for
  ``y < 0`` a rounded reciprocal raised to ``|y|`` (its error counts ``|y|`` times):
  ``2 |y| + 1`` covers both orders. The end points come from the exact rule."""
  (x,) = invals
  y = params["y"]
  plain = _integer_pow(prim, [x], params)
  k = max(y - 1, 1) if y > 0 else 2 * abs(y) + 1
  return _widen(plain.lower, plain.upper, *_roundings(_format(x.lower.dtype), k))


def _fp_square(prim, invals, params):
  return _fp_integer_pow(lax.integer_pow_p, invals, {"y": 2})


def _fp_library(ulps: int, decreasing: bool = False):
  def rule(prim, invals, params):
    (x,) = invals
    lo, hi = prim.bind(x.lower, **params), prim.bind(x.upper, **params)
    if decreasing:
      lo, hi = hi, lo
    return _widen_library(lo, hi, ulps)
  return rule


def _fp_convert(prim, invals, params):
  """Same or wider float format: exact. Narrower supported float: one rounding."""
  (x,) = invals
  old, new = np.dtype(x.lower.dtype), np.dtype(params["new_dtype"])
  _format(old)
  _format(new, "a convert_element_type result")
  lo, hi = prim.bind(x.lower, **params), prim.bind(x.upper, **params)
  if new.itemsize >= old.itemsize:
    return Interval(lo, hi)
  return Interval(_next(lo, False), _next(hi, True))


def _mid_rad(x: Interval) -> tuple[jax.Array, jax.Array]:
  """Non-subnormal floats ``c``, ``r`` with ``[l, u]`` inside ``[c - r, c + r]``
  exactly: ``c`` is any float (here about the midpoint) and ``r`` is
  ``fl(max(u - c, c - l)) = max(fl(u - c), fl(c - l))`` moved up one float."""
  half = jnp.asarray(0.5, x.lower.dtype)
  c = _clean(x.lower * half + x.upper * half, True)
  return c, _next(jnp.maximum(x.upper - c, c - x.lower), True)


def _mag_plus(c: jax.Array, r: jax.Array, g_c: Fraction, g_r: Fraction) -> jax.Array:
  """A non-subnormal float ``>= r + g_c |c| + g_r r`` (``r >= 0``)."""
  return _next(_mul_up(r, 1 + g_r) + _mul_up(jnp.abs(c), g_c), True)


def _kappa(w: jax.Array, g: Fraction) -> jax.Array:
  """``|w|``, with subnormal entries (which DAZ reads as 0) replaced by
  ``tau (1 + 1/g)`` so that ``g`` times it pays for reading them as zero."""
  fmt = _format(w.dtype, "a constant operand")
  b = _bits(w, fmt)
  sub = _is_tiny(b, fmt) & ((b & fmt.mag_mask) != 0)
  return jnp.where(sub, jnp.asarray(fmt.up(fmt.tau * (1 + 1 / g)), w.dtype), jnp.abs(w))


@dataclasses.dataclass(frozen=True)
class _Contraction:
  """How the bound computation evaluates a dot product / convolution.

  ``fn(pairs)`` computes it for each (lhs, rhs) pair; ``n`` products are summed per
  output; along the way each product meets at most ``depth`` roundings (itself and
  the additions above it), and at most ``ops`` operations may each add an underflow
  error. The float forward pass, whose summation order is unknown, is bounded with
  ``depth = n + 1`` and ``ops = 2 n`` instead.
  """

  fn: Callable[[list], list]
  n: int
  depth: int
  ops: int


# Contractions of at least _BLOCK_MIN products are summed in blocks (_dot_as_contraction).
_BLOCK_MIN = 256


def _dot_as_contraction(params, lhs_shape) -> _Contraction:
  """``dot_general`` at HIGHEST precision. A single contracting dimension of size
  ``n >= _BLOCK_MIN`` is split into ``nb`` blocks of ``b = ceil(sqrt(n))`` products
  (zero-padded), summed in a loop: a product then meets at most ``1 + b + nb``
  roundings (``b`` additions inside its block's ``dot_general``, in any order, and
  ``nb`` accumulations) instead of ``1 + n``. The loop also makes each operand a
  buffer, computed once."""
  (lc, rc), _ = params["dimension_numbers"]
  p = {**params, "precision": (lax.Precision.HIGHEST, lax.Precision.HIGHEST)}
  bind = functools.partial(lax.dot_general_p.bind, **p)
  n = math.prod(lhs_shape[i] for i in lc)
  if len(lc) != 1 or n < _BLOCK_MIN:
    return _Contraction(lambda pairs: [bind(a, b) for a, b in pairs], n, n + 1, 2 * n)
  (li,), (ri,) = lc, rc
  b = math.isqrt(n - 1) + 1
  nb = -(-n // b)

  def contract(pairs):
    ops = []
    for x, w in pairs:
      xcfg = [(0, 0, 0)] * jnp.ndim(x)
      wcfg = [(0, 0, 0)] * jnp.ndim(w)
      xcfg[li], wcfg[ri] = (0, nb * b - n, 0), (0, nb * b - n, 0)
      ops.append((lax.pad(x, jnp.zeros((), jnp.result_type(x)), xcfg),
                  lax.pad(w, jnp.zeros((), jnp.result_type(w)), wcfg)))
    shapes = jax.eval_shape(lambda: [bind(x, w) for x, w in pairs])
    init = [jnp.zeros(s.shape, s.dtype) for s in shapes]

    def body(k, accs):
      return [acc + bind(lax.dynamic_slice_in_dim(x, k * b, b, li),
                         lax.dynamic_slice_in_dim(w, k * b, b, ri))
              for acc, (x, w) in zip(accs, ops, strict=True)]

    return lax.fori_loop(0, nb, body, init)

  return _Contraction(contract, n, 1 + b + nb, 2 * nb * b + nb)


def _conv_as_contraction(params, lhs_shape, rhs_shape) -> _Contraction:
  """``conv_general_dilated`` of each (lhs, rhs) pair, as a sum over kernel offsets
  of exactly extracted input windows (``lax.pad`` with interior padding for
  ``lhs_dilation``, then a dynamic and a strided slice) times that offset's kernel
  slice (``dot_general`` over the ``in_channels / groups`` input channels): the same
  sums of the same products as the convolution, ``n = in_channels / groups *
  prod(kernel)`` per output, in an order the ``gamma`` bound covers on every backend
  (no Winograd/FFT). The offsets are accumulated in a loop, so a product meets at
  most ``1 + in_channels / groups + prod(kernel)`` roundings, and each operand is
  computed once and read from memory (XLA would otherwise recompute an elementwise
  producer inside every window's slice)."""
  if params.get("batch_group_count", 1) != 1:
    raise NotImplementedError(
        "ibp(fp_sound=True): conv_general_dilated with batch_group_count > 1 is not "
        "supported")
  nsp = len(lhs_shape) - 2
  dn = params["dimension_numbers"]
  if dn is None:
    lhs_spec = rhs_spec = out_spec = tuple(range(nsp + 2))
  else:
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  strides = tuple(params["window_strides"])
  pads = tuple(tuple(p) for p in params["padding"])
  lhs_dil = tuple(params.get("lhs_dilation") or (1,) * nsp)
  rhs_dil = tuple(params.get("rhs_dilation") or (1,) * nsp)
  groups = params.get("feature_group_count", 1)
  batch, cin = lhs_shape[lhs_spec[0]], lhs_shape[lhs_spec[1]]
  cout, cin_g = rhs_shape[rhs_spec[0]], rhs_shape[rhs_spec[1]]
  ksize = tuple(rhs_shape[d] for d in rhs_spec[2:])
  insize = [lhs_shape[d] for d in lhs_spec[2:]]
  padded = [(s - 1) * ld + 1 + lo + hi if s else lo + hi
            for s, ld, (lo, hi) in zip(insize, lhs_dil, pads, strict=True)]
  outsize = [max(0, (p - (k - 1) * rd - 1) // st + 1)
             for p, k, rd, st in zip(padded, ksize, rhs_dil, strides, strict=True)]
  span = [st * (n - 1) + 1 if n else 0 for st, n in zip(strides, outsize, strict=True)]
  nk, npos = math.prod(ksize), math.prod(outsize)
  precision = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
  pet = params.get("preferred_element_type")

  def prepare(x, w):
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, spatial..., C]
    cfg = [(0, 0, 0)] + [(lo, hi, ld - 1) for (lo, hi), ld in
                         zip(pads, lhs_dil, strict=True)] + [(0, 0, 0)]
    x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    w = jnp.transpose(w, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # [kernel..., I, O]
    return x, w.reshape(nk, cin_g, cout)

  def window_dot(x, w, k):
    offs = jnp.unravel_index(k, ksize) if nsp else ()
    start = [0] + [o * rd for o, rd in zip(offs, rhs_dil, strict=True)] + [0]
    win = lax.dynamic_slice(x, start, [batch, *span, cin])
    win = lax.slice(win, [0] * (nsp + 2), win.shape, (1, *strides, 1))  # [N, out..., C]
    wk = lax.dynamic_index_in_dim(w, k, 0, keepdims=False)  # [I, O]
    if groups == 1:
      return lax.dot(win.reshape(batch * npos, cin), wk, precision=precision,
                     preferred_element_type=pet)
    win = win.reshape(batch * npos, groups, cin_g).transpose(1, 0, 2)
    wk = wk.reshape(cin_g, groups, cout // groups).transpose(1, 0, 2)
    y = lax.dot_general(win, wk, (((2,), (1,)), ((0,), (0,))), precision=precision,
                        preferred_element_type=pet)  # [G, N * P, O / G]
    return y.transpose(1, 0, 2).reshape(batch * npos, cout)

  def contract(pairs):
    ops = [prepare(x, w) for x, w in pairs]
    init = [jnp.zeros((batch * npos, cout), pet or jnp.result_type(x, w)) for x, w in ops]
    body = lambda k, accs: [acc + window_dot(x, w, k)
                            for acc, (x, w) in zip(accs, ops, strict=True)]
    out = lax.fori_loop(0, nk, body, init)
    out = [jnp.moveaxis(y.reshape(batch, *outsize, cout), -1, 1) for y in out]
    return [jnp.transpose(y, tuple(np.argsort(out_spec))) for y in out]

  return _Contraction(contract, cin_g * nk, 1 + cin_g + nk, 2 * cin_g * nk + nk)


def _fp_affine(prim, invals, params):
  """``dot_general`` / ``conv_general_dilated`` with one or two bounded operands.

  Dot-product lemma: if each product meets at most ``d`` roundings on its way to
  the output and at most ``o`` operations round, ``g = gamma_d`` and
  ``A = 2 o tau (1 + g)``, then ``|fl(sum p_i q_i) - sum p'_i q'_i| <= g sum |p'_i q'_i| + A``
  with ``p'``, ``q'`` the operands as read (DAZ zeroes subnormals): each product is
  multiplied by at most ``d`` factors ``(1 + delta)``, and each operation adds an
  ``|eta| <= 2 tau`` (a flushed result, or a subnormal partial sum read as zero)
  amplified by at most ``1 + g``. The bound's own products (``_Contraction``) use the
  ``d``, ``o`` of their evaluation order: ``g1``, ``A1``; the float forward pass, whose
  order is unknown, ``d = n + 1``, ``o = 2 n`` (any binary tree of the ``n`` products,
  plus an accumulator initialised to zero): ``g``, ``A``. Either may be the larger
  (``g1 > g`` for a 1 x 1 or depthwise convolution); ``gm = min(g1, g)``.

  One bounded operand ``x`` in ``[l, u]``, constant ``W``: with ``c, r`` from
  ``_mid_rad`` (``x in [c - r, c + r]``, so ``|x| <= m = |c| + r``),
  ``v >= r + g1 |c| + g m`` (``_mag_plus``) and ``K = _kappa(W)`` (``|W|``, with
  subnormal entries raised to ``tau (1 + 1/gm)``), two products ``Yc = fl(W c)`` and
  ``D = fl(K v)`` give

    ``|y - Yc| <= E = (D + A1) / (1 - g1) + A1 + A``

  for ``y`` the exact ``W x`` and for ``y`` the float ``fl(W z)``, in any summation
  order, of every ``z`` in the box. Proof: DAZ reads ``W`` as ``W'`` (``|W - W'| < tau``
  on subnormal entries, equal elsewhere); ``c, r, v`` are never subnormal, and since
  box end points are not subnormal either, a float ``z`` read as ``z' = 0`` is still in
  the box. ``W x - Yc = (W - W') c + (W' c - Yc) + W (x - c)``, so
  ``|W x - Yc| <= sum_sub tau |c| + g1 sum |W'| |c| + A1 + sum K r``; and
  ``|fl(W' z') - W z'| <= g sum |W'| m + A + sum_sub tau m``. As ``g1 K >= g1 |W'| + tau``
  and ``g K >= g |W'| + tau`` on subnormal entries and ``K = |W| = |W'|`` elsewhere, all
  of it is at most ``sum K (r + g1 |c| + g m) + A1 + A <= sum K v + A1 + A``, and
  ``sum K v <= (D + A1) / (1 - g1)`` by the lemma. (To first order
  ``E = |W| r + (g1 + g) |W| |c| + g |W| r``: the radius, the centre's rounding here,
  the forward pass's rounding.) ``E`` is evaluated rounding up, ``Yc -+ E`` rounding
  outward.

  Two bounded operands ``x in [ca +- ra]``, ``w in [cb +- rb]`` (``ma >= |ca| + ra``,
  ``mb >= |cb| + rb``, ``vb >= rb + (g1 + g) mb``): ``|x w - ca cb| <= ra mb + ma rb`` per
  term, and the centre's and the forward pass's rounding add ``(g1 + g) sum ma mb +
  A1 + A``, so ``E = (D1 + D2 + 2 A1) / (1 - g1) + A1 + A`` with ``D1 = fl(ra mb)``,
  ``D2 = fl(ma vb)``.
  """
  a, b = invals
  for v in invals:
    _format(jnp.result_type(_lo(v)), f"an operand of {prim.name}")
  dtype = jnp.result_type(_lo(a if _is_iv(a) else b))
  fmt = _format(dtype)
  if prim.name == "conv_general_dilated":
    con = _conv_as_contraction(params, jnp.shape(_lo(a)), jnp.shape(_lo(b)))
  else:
    con = _dot_as_contraction(params, jnp.shape(_lo(a)))
  g1, g = fmt.gamma(con.depth), fmt.gamma(con.n + 1)
  a1 = 2 * con.ops * fmt.tau * (1 + g1)
  a_fwd = 4 * con.n * fmt.tau * (1 + g)
  if _is_iv(a) and _is_iv(b):
    ca, ra = _mid_rad(a)
    cb, rb = _mid_rad(b)
    ma, mb = _next(jnp.abs(ca) + ra, True), _next(jnp.abs(cb) + rb, True)
    vb = _next(rb + _mul_up(mb, g1 + g), True)
    yc, d1, d2 = con.fn([(ca, cb), (ra, mb), (ma, vb)])
    dots, k = _add_up(d1, _clean(d2, True)), 2
  elif _is_iv(a):
    c, r = _mid_rad(a)
    yc, dots = con.fn([(c, b), (_mag_plus(c, r, g1 + g, g), _kappa(b, min(g1, g)))])
    k = 1
  else:
    c, r = _mid_rad(b)
    yc, dots = con.fn([(a, c), (_kappa(a, min(g1, g)), _mag_plus(c, r, g1 + g, g))])
    k = 1
  inv = 1 / (1 - g1)
  tail = jnp.asarray(fmt.up(k * a1 * inv + a1 + a_fwd), dtype)
  err = _add_up(_mul_up(dots, inv), tail)
  return Interval(_sub_down(yc, err), _add_up(yc, err))


def _fp_sum(count: Callable[[dict, tuple], int]):
  """Sums (``reduce_sum``, ``reduce_window_sum``, ``cumsum``) of ``n = count(...)``
  terms per output, in any order: ``|fl(sum v) - sum v| <= g sum |v| + A`` with
  ``g = gamma_{n+1}``, ``A = 4 n tau (1 + g)`` (see ``_fp_affine``). For ``z`` in the
  box, the exact ``sum z`` and the float ``fl(sum z)`` are ``>= sum l - g sum m - A``
  with ``m = max(|l|, |u|)``, which is ``>= fl(sum l) - 2 g sum m - 2A``, and
  ``sum m <= (fl(sum m) + A) / (1 - g)``; symmetrically for the upper end."""
  def rule(prim, invals, params):
    (x,) = invals
    fmt = _format(x.lower.dtype)
    n = count(params, jnp.shape(x.lower))
    g = fmt.gamma(n + 1)
    big_a = 4 * n * fmt.tau * (1 + g)
    s = 2 * g / (1 - g)
    m = jnp.maximum(jnp.abs(x.lower), jnp.abs(x.upper))
    tail = jnp.asarray(fmt.up(s * big_a + 2 * big_a), x.lower.dtype)
    err = _add_up(_mul_up(prim.bind(m, **params), s), tail)
    return Interval(_sub_down(prim.bind(x.lower, **params), err),
                    _add_up(prim.bind(x.upper, **params), err))
  return rule


_FP_RULES: dict[Any, Callable[..., Any]] = {}
_register(("reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
           "concatenate", "pad", "rev", "copy", "copy_p", "sharding_constraint",
           "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax",
           "cummin", "max", "min", "real", "floor", "ceil", "round", "sign", "clamp"),
          _fp_exact, _FP_RULES)
_register(("dynamic_slice", "gather"), _const_index(1, _fp_exact), _FP_RULES)
_register(("dynamic_update_slice",), _const_index(2, _fp_exact), _FP_RULES)
_register(("select_n",), _fp_select_n, _FP_RULES)
_register(("neg",), _decreasing, _FP_RULES)
_register(("abs",), _abs, _FP_RULES)
for _name, _ulps in _LIBRARY_ULPS.items():
  _register((_name,), _fp_library(_ulps, decreasing=_name == "rsqrt"), _FP_RULES)
_register(("dot_general", "conv_general_dilated"), _fp_affine, _FP_RULES)
_register(("add", "add_any"), _fp_add, _FP_RULES)
_register(("sub",), _fp_sub, _FP_RULES)
_register(("mul",), _fp_mul, _FP_RULES)
_register(("div",), _fp_div, _FP_RULES)
_register(("integer_pow",), _fp_integer_pow, _FP_RULES)
_register(("square",), _fp_square, _FP_RULES)
_register(("reduce_sum",), _fp_sum(lambda p, s: math.prod(s[a] for a in p["axes"])),
          _FP_RULES)
_register(("reduce_window_sum",), _fp_sum(lambda p, s: math.prod(p["window_dimensions"])),
          _FP_RULES)
_register(("cumsum",), _fp_sum(lambda p, s: s[p["axis"]]), _FP_RULES)
_register(("convert_element_type",), _fp_convert, _FP_RULES)
_register(("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
           "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2"),
          functools.partial(_call, fp_sound=True), _FP_RULES)


del _name, _ulps


def supported_primitives(fp_sound: bool = False) -> list[str]:
  """Names of the primitives that have an interval rule (in ``fp_sound`` mode)."""
  return sorted(p.name for p in (_FP_RULES if fp_sound else _RULES))


# --------------------------------------------------------------------------
# Interpreter.


def _eval_jaxpr(jaxpr, consts, args, *, fp_sound: bool = False):
  env: dict[Any, Any] = {}
  rules = _FP_RULES if fp_sound else _RULES

  def read(v):
    if isinstance(v, jex_core.Literal):
      return v.val
    return env[v]

  def write(v, val):
    if not isinstance(v, jex_core.DropVar):
      env[v] = val

  for v, val in zip(jaxpr.constvars, consts, strict=True):
    write(v, val)
  for v, val in zip(jaxpr.invars, args, strict=True):
    write(v, val)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(_is_iv(v) for v in invals):
      rule = rules.get(eqn.primitive)
      if rule is None:
        mode = " with fp_sound=True" if fp_sound else ""
        raise NotImplementedError(
            f"ibp: no interval rule{mode} for primitive '{eqn.primitive.name}'. "
            f"Supported: {', '.join(supported_primitives(fp_sound))}")
      outvals = rule(invals, eqn.params)
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = ()
      if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
      outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    if eqn.primitive.multiple_results:
      for v, val in zip(eqn.outvars, outvals, strict=True):
        write(v, val)
    else:
      write(eqn.outvars[0], outvals)
  return [read(v) for v in jaxpr.outvars]


def ibp(fn: Callable[..., Any], *, fp_sound: bool = False) -> Callable[..., Any]:
  """Interval transform: ``ibp(fn)(*args)`` bounds ``fn(*args)``.

  Every argument leaf that is an ``Interval`` is a bounded input; all other
  leaves are constants. Returns ``fn``'s output pytree with an ``Interval`` at
  every leaf, such that for all inputs inside the argument intervals
  ``out.lower <= fn(x) <= out.upper`` (exact arithmetic).

  ``fp_sound=True`` (float32 or float64 intervals, else ``ValueError``): the bound
  also holds despite the rounding of the bound computation, and contains the float
  forward pass ``fl(fn(x))`` of every ``x`` in the box (module docstring: the error
  model, the per-primitive widening and the assumptions). Input end points are first
  made non-subnormal (outward). Outputs that do not depend on a bounded input are
  returned as ``Interval(v, v)`` of their float value, as without ``fp_sound``.

  Example::

      graphdef, state = nnx.split(model)
      embed = lambda x: nnx.merge(graphdef, state)(x)
      box = ibp(embed)(input_box(x, eps))      # box.lower, box.upper: [B, D]
  """

  @functools.wraps(fn)
  def bounded(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_iv)
    specs = [jax.ShapeDtypeStruct(jnp.shape(v.lower), jnp.result_type(v.lower))
             if _is_iv(v) else v for v in leaves]
    for v in leaves:
      if _is_iv(v) and jnp.shape(v.lower) != jnp.shape(v.upper):
        raise ValueError(
            f"Interval lower and upper must have the same shape, got "
            f"{jnp.shape(v.lower)} and {jnp.shape(v.upper)}")
    if fp_sound:
      leaves = [_fp_input(v) if _is_iv(v) else v for v in leaves]

    def flat_fn(*flat):
      a, k = jax.tree.unflatten(treedef, flat)
      return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    out = _eval_jaxpr(closed.jaxpr, closed.consts, leaves, fp_sound=fp_sound)
    out = [v if _is_iv(v) else Interval(v, v) for v in out]
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return bounded


def _fp_input(v: Interval) -> Interval:
  lo, hi = _outward_array(v.lower)[0], _outward_array(v.upper)[1]
  for name, x in (("lower", lo), ("upper", hi)):
    _format(x.dtype, f"an input Interval's {name}")
  if lo.dtype != hi.dtype:
    raise ValueError(f"ibp(fp_sound=True): Interval lower and upper must have one dtype, "
                     f"got {lo.dtype} and {hi.dtype}")
  return Interval(_clean(lo, False), _clean(hi, True))


def interval_bounds(fn: Callable[[jax.Array], Any], lower: jax.typing.ArrayLike,
                    upper: jax.typing.ArrayLike, *, fp_sound: bool = False) -> Any:
  """``ibp(fn, fp_sound=fp_sound)(Interval(lower, upper))``: bounds of ``fn`` over the box."""
  return ibp(fn, fp_sound=fp_sound)(Interval(jnp.asarray(lower), jnp.asarray(upper)))
