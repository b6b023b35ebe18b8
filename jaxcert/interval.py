"""Interval bound propagation (IBP) as a function transform.

``ibp(fn)`` traces ``fn`` to a jaxpr and evaluates it on intervals, one rule per
primitive (CBIR paper Eq. 15-16; Gowal et al. 2018). The guarantee: for every
input ``x`` with ``lower <= x <= upper`` elementwise, ``fn(x)`` lies inside the
returned ``Interval`` -- in exact real arithmetic. Float32 rounding of the bound
computation itself is not accounted for here.

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
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
              valid_max: float = 1.0) -> Interval:
  """The l_inf ball ``[x - eps, x + eps]`` clipped to ``[valid_min, valid_max]``.

  Clipping only removes inputs that are not images, so every bound computed
  from the clipped box is sound for the threat model (pixels in [0, 1]).
  ``eps`` is a Python number or a scalar/broadcastable array (may be traced).
  """
  if isinstance(eps, (int, float)) and not eps >= 0:
    raise ValueError(f"eps must be a finite number >= 0, got eps={eps!r}")
  x = jnp.asarray(x)
  return Interval(jnp.clip(x - eps, valid_min, valid_max),
                  jnp.clip(x + eps, valid_min, valid_max))


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
    return [Interval(a, b) for a, b in zip(lo, hi)]
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


def _const_index(num_data: int):
  """Indexing ops: the first ``num_data`` operands may be bounded, indices not."""
  def rule(prim, invals, params):
    if any(_is_iv(v) for v in invals[num_data:]):
      raise NotImplementedError(
          f"ibp: '{prim.name}' with input-dependent indices is not supported")
    return _each_endpoint(prim, invals, params)
  return rule


# Named jit / custom_jvp functions that are non-decreasing in every argument; their
# jaxprs can contain NaN guards (select_n on input-dependent predicates), so they
# are evaluated at the two end points instead of rule by rule.
# (Functions with a user-set slope, e.g. elu or leaky_relu, are not listed: a
# negative parameter would make them non-monotone.)
_MONOTONE_CALLS = frozenset({"relu", "relu6", "softplus", "logaddexp", "sigmoid",
                             "log_sigmoid", "hard_tanh", "selu", "hard_sigmoid"})


def _call(prim, invals, params):
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
  if params.get("name") in _MONOTONE_CALLS:
    fn = jex_core.jaxpr_as_fun(closed)
    lo, hi = fn(*[_lo(v) for v in invals]), fn(*[_hi(v) for v in invals])
    return [Interval(a, b) for a, b in zip(lo, hi)]
  return _eval_jaxpr(closed.jaxpr, closed.consts, invals)


def _register(names, rule):
  for name in names:
    prim = _PRIMS.get(name)
    if prim is not None:
      _RULES[prim] = functools.partial(rule, prim)


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


def supported_primitives() -> list[str]:
  """Names of the primitives that have an interval rule."""
  return sorted(p.name for p in _RULES)


# --------------------------------------------------------------------------
# Interpreter.


def _eval_jaxpr(jaxpr, consts, args):
  env: dict[Any, Any] = {}

  def read(v):
    if isinstance(v, jex_core.Literal):
      return v.val
    return env[v]

  def write(v, val):
    if not isinstance(v, jex_core.DropVar):
      env[v] = val

  for v, val in zip(jaxpr.constvars, consts):
    write(v, val)
  for v, val in zip(jaxpr.invars, args):
    write(v, val)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(_is_iv(v) for v in invals):
      rule = _RULES.get(eqn.primitive)
      if rule is None:
        raise NotImplementedError(
            f"ibp: no interval rule for primitive '{eqn.primitive.name}'. "
            f"Supported: {', '.join(supported_primitives())}")
      outvals = rule(invals, eqn.params)
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = ()
      if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
      outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    if eqn.primitive.multiple_results:
      for v, val in zip(eqn.outvars, outvals):
        write(v, val)
    else:
      write(eqn.outvars[0], outvals)
  return [read(v) for v in jaxpr.outvars]


def ibp(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Interval transform: ``ibp(fn)(*args)`` bounds ``fn(*args)``.

  Every argument leaf that is an ``Interval`` is a bounded input; all other
  leaves are constants. Returns ``fn``'s output pytree with an ``Interval`` at
  every leaf, such that for all inputs inside the argument intervals
  ``out.lower <= fn(x) <= out.upper`` (exact arithmetic).

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

    def flat_fn(*flat):
      a, k = jax.tree.unflatten(treedef, flat)
      return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    out = _eval_jaxpr(closed.jaxpr, closed.consts, leaves)
    out = [v if _is_iv(v) else Interval(v, v) for v in out]
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return bounded


def interval_bounds(fn: Callable[[jax.Array], Any], lower: jax.typing.ArrayLike,
                    upper: jax.typing.ArrayLike) -> Any:
  """``ibp(fn)(Interval(lower, upper))``: bounds of ``fn`` over the box."""
  return ibp(fn)(Interval(jnp.asarray(lower), jnp.asarray(upper)))
