"""Float-sound pieces of back-substituted linear bounds (``linear_bounds(fp_sound=True)``).

CROWN's proof (:mod:`jaxcert.linear_bounds`) is a chain of inequalities between real
numbers. Evaluated in float32 each link can fail: the transposed layer ``lam W`` is
rounded, the bias product ``lam . b`` is rounded, the ReLU chord ``s, t`` is rounded, and
the deployed float forward pass is not the exact network. This module supplies, per
affine segment ``A_k(z) = L_k z + b_k`` of the network, the terms that repair each link,
so that the bound holds for (a) the exact network (float weights taken as exact reals)
and (b) the float forward pass of the network in any summation order, exactly as
``ibp(fp_sound=True)`` promises (same error model: IEEE binary32/64, correctly rounded
operations, FMA allowed, FTZ/DAZ; convolutions as sums of products, not Winograd/FFT).

**Programs.** A segment's forward computation and its transpose (the ``jax.vjp`` jaxpr)
are :class:`Program` s: lists of affine primitives with one data input. For each the
class gives

- ``run(x)``: the float evaluation, with convolutions and matrix products computed by
  :func:`jaxcert.interval._conv_as_contraction` / ``_dot_as_contraction`` (exact
  windows times kernel slices at ``Precision.HIGHEST``, so the sums are sums of the same
  products on every backend);
- ``depth(model)``: the largest number of roundings on any path from the input to an
  output: ``"own"`` for ``run``'s evaluation order, ``"any"`` for the deployed forward
  pass in an unknown order (``n + 1`` for a contraction of ``n`` products);
- ``abs_upper(m, ...)``: a float upper bound on the exact value of the *absolute
  program* at ``m >= 0``: every constant factor replaced by its magnitude (subnormal
  factors raised as in ``interval._kappa``), negations dropped, and constant addends
  either replaced by their magnitude (``bias=True``) or dropped (the linear part). Each
  operation's result is rounded up (``(r + A) / (1 - gamma_k)`` for ``k`` roundings
  and ``A`` the underflow allowance), and an optional *bump* is added after every
  rounding operation.

**Running-error lemma.** For a program ``P`` of sums, differences and products by
constants with at most ``D`` roundings on any path, evaluated on ``v``:
``|fl(P)(v) - P(v)| <= gamma_D |P|(|v|) + U``, where ``|P|`` is the absolute program
and ``U`` the absolute program of the zero input with every operation's output bumped
by its underflow allowance ``2 ops tau (1 + gamma_D)``. Proof: expand the output as a
sum over paths of (product of constants) x input; each path picks up at most ``D``
factors ``(1 + delta)``, ``|delta| <= u``, so it deviates by at most ``gamma_D`` times
its magnitude (Higham, Lemma 3.3); an operation that flushes (or reads as zero) a value
below ``tau`` adds an error of at most ``2 tau`` per operation at that node, carried to
the output by the absolute program of what follows, amplified by at most ``1 + gamma_D``.
Subnormal constants read as zero are paid for by ``_kappa``.

**Transposition lemma.** For the segment's linear part ``F`` (forward, constants
dropped) and its transpose ``P`` (the vjp jaxpr): ``sum_i |P|(w)_i m_i = w . |F|(m)``
for all ``w, m >= 0``. Both sides are sums over the same scalar edges: JAX transposes
every linear primitive used here (matrix products, convolutions, products and
quotients by constants, additions and their fan-out, reshapes, transposes, pads and
slices, broadcasts and sums, selects) into the adjoint primitive, which carries the
same scalar weights along the reversed edges, and the path sums of a reversed graph
are those of the graph. (Checked numerically in ``tests/test_linear_bounds.py``.)

**The repaired back-substitution** (``linear_bounds._backward_lower`` with
``fp_sound=True``). Write ``M`` for the segment input's magnitude bound (``max(|l|,
|u|)`` of its box, which holds both networks' values). Let ``Delta_k = gamma_f
|A_k|(M) + U_f + |F|(tau)`` bound the forward pass's deviation ``fl(A_k)(z) - A_k(z)``
(also at ``z = 0``, so it bounds the float bias's error too; ``|F|(tau)``: every
operation may read a subnormal input entry as zero on its own, so two products of one
entry may disagree), ``gamma_b`` the transpose's rounding. For a stored row ``lam`` on
the segment output (normal or zero entries), ``mu = run(lam)`` flushed to
normal-or-zero, and any ``z`` with ``|z| <= M``:

  ``lam . zhat >= mu . z + lam . b_f - |lam| . V - c``

with ``V = Delta_k + Delta_k^0 + tau + gamma_b |F|(M) + gamma_{n+2} |b_f|`` (the float
forward pass's deviation; the float bias's error ``Delta_k^0 = gamma_f |A_k|(0) + U_f``,
``|A_k|(0)`` being the bias magnitudes; the flush of the bias; the transpose's rounding
by the two lemmas; the rounding of ``lam . b_f``, see ``dot_error``) and ``c = U_b . M +
tau sum M`` (the transpose's underflow, the flush of ``mu``); ``b_f`` is the flushed
float bias, computed by ``run`` (so no backend convolution algorithm is involved),
``zhat`` the exact ``A_k(z)`` or the float ``fl(A_k)(z)``.

ReLU step on the pre-activation box ``[l, u]`` (endpoints never subnormal): slopes
``a in {0, 1}`` (exact), chord slope ``s`` any float in ``[0, 1]`` (cleaned of
subnormals) and ``t >= max(-s l, u - s u)`` computed rounding up, so ``a v - tau <=
z' <= s v + t`` holds on ``[l, u]`` for the value ``z'`` the next segment reads (``-tau``:
a subnormal ``relu(v)`` read as zero). Then ``mu . z' >= lam' . v + sum neg t - tau
sum pos - |lam'| . (2 u |v|max) - 3 tau sum |v|max`` for the stored ``lam' =
flush(fl(pos a + neg s))`` (``pos a`` is exact, ``neg s`` rounds once, the flush adds
``tau``): the ``2 u |v|max`` term is added to the next segment's ``V``. Only unstable
neurons round (``a, s`` are 0 or 1 elsewhere, and ``lam'`` is then ``mu`` or 0, already
flushed), so both terms are restricted to them, and a product ``|lam| V`` with
``lam = 0`` counts as 0 even where ``V`` is infinite (an overflowed box). At the input
box (``c0 +- r0`` from ``_mid_rad``, exact enclosure) ``lam . x >= sum (lam c0 - |lam|
r0)``. Every float sum ``S`` of ``n`` products is paid for by ``gamma_{n+2} sum |terms|
+ 8 n tau (1 + gamma)`` and every accumulation ``c + S`` by ``2 u |fl(c + S)| + 2 tau``,
all error terms being accumulated rounding up; the result is ``c - e`` rounded down.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jaxcert.interval import (
    _add_up,
    _bits,
    _clean,
    _conv_as_contraction,
    _dot_as_contraction,
    _Format,
    _format,
    _is_tiny,
    _kappa,
    _mul_up,
    _next,
)

# Exact structural primitives (the same op applies to magnitudes).
_STRUCT = frozenset((
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
    "concatenate", "pad", "rev", "copy", "copy_p", "sharding_constraint", "select_n",
    "dynamic_slice", "gather", "dynamic_update_slice", "convert_element_type", "split",
))
_ADDS = frozenset(("add", "add_any", "sub"))
_SUMS: dict[str, Callable[[dict, tuple], int]] = {
    "reduce_sum": lambda p, s: math.prod(s[a] for a in p["axes"]),
    "reduce_window_sum": lambda p, s: math.prod(p["window_dimensions"]),
    "cumsum": lambda p, s: s[p["axis"]],
}
_ONE_DATA = frozenset(("mul", "dot_general", "conv_general_dilated"))
SUPPORTED = sorted(_STRUCT | _ADDS | _ONE_DATA | set(_SUMS) | {"neg", "div"})


def _is_lit(k) -> bool:
  return isinstance(k, jex_core.Literal)


def _shape(k):
  return np.shape(k.val) if _is_lit(k) else tuple(k[1].aval.shape)


def flush(x: jax.Array) -> jax.Array:
  """Subnormal entries replaced by 0 (bit test, immune to DAZ): ``|flush(x) - x| < tau``."""
  fmt = _format(x.dtype)
  return jnp.where(_is_tiny(_bits(x, fmt), fmt), jnp.zeros_like(x), x)


def _const(fmt: _Format, q: Fraction, dtype) -> jax.Array:
  return jnp.asarray(fmt.up(q), dtype)


def _upper(fmt: _Format, r: jax.Array, k: int, ops: int) -> jax.Array:
  """A float ``>= v`` for a nonnegative exact value ``v`` whose float evaluation ``r``
  took ``k`` roundings per path and ``ops`` operations: ``r >= v (1 - gamma_k) -
  2 ops tau (1 + gamma_k)``, so ``v <= (r + A) / (1 - gamma_k)``."""
  g = fmt.gamma(k)
  a = _const(fmt, 2 * ops * fmt.tau * (1 + g), r.dtype)
  return _mul_up(_add_up(r, a), 1 / (1 - g))


def sum_upper(fmt: _Format, r: jax.Array, n: int) -> jax.Array:
  """Upper bound on the exact sum of ``n`` nonnegative products whose float sum is ``r``."""
  return _upper(fmt, r, n + 1, 2 * n)


def dot_error(fmt: _Format, n: int) -> tuple[Fraction, jax.Array]:
  """``(g, A)``: a float sum of ``n`` terms, each at most two roundings from its
  operands (a product, or a difference of two products), is within
  ``g sum |terms| + A`` of the exact sum."""
  g = fmt.gamma(n + 2)
  return g, 8 * n * fmt.tau * (1 + g)


class Program:
  """An affine float program with one data input (see the module docstring).

  eqns: objects with ``prim``, ``params``, ``ins`` and ``outs`` (keys ``(scope, Var)``
  or jaxpr Literals), in order; consts: key -> value for the non-data keys; inp, out:
  the data input and output keys; what: a name for error messages. Equations that do
  not depend on ``inp`` are evaluated once here.
  """

  def __init__(self, eqns, consts: dict, inp, out, what: str):
    env = dict(consts)
    data = {inp}
    self.eqns = []
    with jax.ensure_compile_time_eval():
      for e in eqns:
        flags = [not _is_lit(k) and k in data for k in e.ins]
        if not any(flags):
          invals = [k.val if _is_lit(k) else env[k] for k in e.ins]
          for k, v in zip(e.outs, bind_eqn(e, invals), strict=True):
            env[k] = v
          continue
        self._check(e, flags, what)
        self.eqns.append((e, flags))
        data.update(e.outs)
    if _is_lit(out) or out not in data:
      raise NotImplementedError(f"{what}: the output does not depend on the input")
    self.consts, self.inp, self.out, self.what = env, inp, out, what

  @staticmethod
  def _check(e, flags, what):
    name = e.prim.name
    ok = name in _STRUCT or name in _ADDS or name in _SUMS or name == "neg"
    if name in _ONE_DATA:
      ok = sum(flags) == 1 and not (name == "conv_general_dilated" and flags[1])
    elif name == "div":
      ok = flags == [True, False]
    elif name == "select_n":
      ok = not flags[0]
    elif name in ("dynamic_slice", "gather"):
      ok = not any(flags[1:])
    elif name == "dynamic_update_slice":
      ok = not any(flags[2:])
    elif name == "pad":
      ok = not flags[1]
    elif name == "convert_element_type":
      old = np.dtype(e.ins[0][1].aval.dtype)
      new = np.dtype(e.params["new_dtype"])
      ok = (jnp.issubdtype(old, jnp.floating) and jnp.issubdtype(new, jnp.floating)
            and jnp.finfo(new).bits >= jnp.finfo(old).bits
            and jnp.finfo(new).nmant >= jnp.finfo(old).nmant)
    if not ok:
      raise NotImplementedError(
          f"{what}: primitive '{name}' is not supported by the float-sound linear "
          f"bounds (supported affine primitives: {', '.join(SUPPORTED)}); use "
          "fp_sound=False or method='ibp'")

  def _val(self, env, k):
    return k.val if _is_lit(k) else env[k] if k in env else self.consts[k]

  @staticmethod
  def _contraction(e):
    name = e.prim.name
    if name == "conv_general_dilated":
      return _conv_as_contraction(e.params, _shape(e.ins[0]), _shape(e.ins[1]))
    if name == "dot_general":
      return _dot_as_contraction(e.params, _shape(e.ins[0]))
    return None

  def _rounding(self, e, model: str) -> tuple[int, int]:
    """(roundings added on a path, operations per output) of one equation."""
    name = e.prim.name
    if name in ("dot_general", "conv_general_dilated"):
      con = self._contraction(e)
      return (con.depth, con.ops) if model == "own" else (con.n + 1, 2 * con.n)
    if name in _ADDS or name == "mul":
      return 1, 1
    if name == "div":   # possibly rewritten as x * (1 / c)
      return 2, 2
    if name in _SUMS:
      n = _SUMS[name](e.params, _shape(e.ins[0]))
      return n + 1, 2 * n
    return 0, 0

  def depth(self, model: str) -> int:
    """Most roundings on a path from the input to the output (``model``: ``"own"`` for
    :meth:`run`, ``"any"`` for an evaluation in unknown order)."""
    d = {self.inp: 0}
    for e, flags in self.eqns:
      base = max(d[k] for k, f in zip(e.ins, flags, strict=True) if f)
      inc = self._rounding(e, model)[0]
      for k in e.outs:
        d[k] = base + inc
    return d[self.out]

  def run(self, x: jax.Array) -> jax.Array:
    """The float evaluation (contractions as sums of products on every backend)."""
    env = {self.inp: x}
    for e, _ in self.eqns:
      invals = [self._val(env, k) for k in e.ins]
      con = self._contraction(e)
      outs = con.fn([tuple(invals)]) if con is not None else bind_eqn(e, invals)
      for k, v in zip(e.outs, outs, strict=True):
        env[k] = v
    return env[self.out]

  def abs_upper(self, m: jax.Array, *, bias: bool, kappa_gamma: Fraction,
                bump: Fraction | None = None, model: str = "own") -> jax.Array:
    """Float upper bound on the absolute program at ``m >= 0`` (module docstring):
    constant factors ``_kappa(c, kappa_gamma)``, constant addends ``|c|`` (``bias``) or
    dropped; with ``bump``, ``bump * ops`` (``ops`` per ``model``) is added after every
    rounding operation."""
    fmt = _format(m.dtype)
    env = {self.inp: _clean(m, True)}

    def const_addend(v):
      v = jnp.asarray(v)
      if not jnp.issubdtype(v.dtype, jnp.floating):
        return v
      return _clean(jnp.abs(v), True) if bias else jnp.zeros_like(v)

    for e, flags in self.eqns:
      name = e.prim.name
      ins = [self._val(env, k) for k in e.ins]
      if name == "neg":
        (out,) = ins
      elif name in _STRUCT:
        ops = [v if f else const_addend(v) for v, f in zip(ins, flags, strict=True)]
        if name == "select_n":   # the predicate stays as it is
          ops[0] = ins[0]
        elif name in ("dynamic_slice", "gather"):
          ops[1:] = ins[1:]
        elif name == "dynamic_update_slice":
          ops[2:] = ins[2:]
        outs = bind_eqn(e, ops)   # exact: no rounding, no bump
        for k, v in zip(e.outs, outs, strict=True):
          env[k] = v
        continue
      elif name in _ADDS:
        a, b = (v if f else const_addend(v) for v, f in zip(ins, flags, strict=True))
        out = _upper(fmt, a + b, 1, 1)
      elif name == "mul":
        a, b = ins
        x, c = (a, b) if flags[0] else (b, a)
        out = _upper(fmt, x * _kappa(jnp.asarray(c), kappa_gamma), 1, 1)
      elif name == "div":
        a, c = ins
        c = jnp.abs(jnp.asarray(c))
        c = jnp.where(_is_tiny(_bits(c, _format(c.dtype)), _format(c.dtype)),
                      jnp.zeros_like(c), c)   # read as 0 (DAZ): the bound becomes inf
        out = _upper(fmt, a / c, 2, 2)
      elif name in _SUMS:
        n = _SUMS[name](e.params, _shape(e.ins[0]))
        (r,) = bind_eqn(e, ins)
        out = _upper(fmt, r, n + 1, 2 * n)
      else:   # dot_general / conv_general_dilated with one constant operand
        con = self._contraction(e)
        pair = [v if f else _kappa(jnp.asarray(v), kappa_gamma)
                for v, f in zip(ins, flags, strict=True)]
        (r,) = con.fn([tuple(pair)])
        out = _upper(fmt, r, con.depth, con.ops)
      if bump is not None:
        ops_count = self._rounding(e, model)[1]
        if ops_count:
          out = _add_up(out, _const(fmt, bump * ops_count, out.dtype))
      for k in e.outs:
        env[k] = out
    return env[self.out]


def bind_eqn(eqn, invals) -> list:
  """Applies a flattened equation (``prim``, ``params``) to ``invals``; matrix products and
  convolutions at ``Precision.HIGHEST``. Returns the list of outputs."""
  params = eqn.params
  if "precision" in params and eqn.prim.name in ("dot_general", "conv_general_dilated"):
    params = {**params, "precision": (lax.Precision.HIGHEST, lax.Precision.HIGHEST)}
  bind_params = eqn.prim.get_bind_params(params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
  out = eqn.prim.bind(*subfuns, *invals, **bind_params)
  return out if eqn.prim.multiple_results else [out]


def segment_terms(fwd: Program, bwd: Program, m_in: jax.Array, bias: jax.Array,
                  fmt: _Format) -> dict[str, Any]:
  """Per-example repair terms of one segment (module docstring).

  fwd: the segment ``A_k``; bwd: its transpose; m_in: magnitude bound of the segment's
  input (shape of the input, ``>= 0``); bias: the float ``A_k(0)`` (``fwd.run`` of
  zeros). Returns ``bias``
  (flushed), ``V`` (shape of the output) and ``c`` (shape ``[B]``), the transpose
  program and the sizes used by the row sums.
  """
  d_f, d_b = fwd.depth("any"), bwd.depth("own")
  g_f, g_b = fmt.gamma(max(d_f, 1)), fmt.gamma(max(d_b, 1))
  dtype = m_in.dtype
  tau = _const(fmt, fmt.tau, dtype)
  fwd_abs = fwd.abs_upper(m_in, bias=True, kappa_gamma=g_f,
                          bump=2 * fmt.tau * (1 + g_f) / g_f, model="any")
  # DAZ: each operation may read a subnormal input entry as 0 on its own (two products
  # of one entry may disagree), a deviation of at most tau per read: |F|(tau).
  daz = fwd.abs_upper(jnp.full(jnp.shape(m_in), fmt.up(fmt.tau), dtype), bias=False,
                      kappa_gamma=g_f)
  delta = _add_up(_mul_up(fwd_abs, g_f), _clean(daz, True))
  bias_abs = fwd.abs_upper(jnp.zeros(jnp.shape(m_in), dtype), bias=True, kappa_gamma=g_f,
                           bump=2 * fmt.tau * (1 + g_f) / g_f, model="any")
  delta0 = _mul_up(bias_abs, g_f)
  lin_abs = fwd.abs_upper(m_in, bias=False, kappa_gamma=g_b)
  out_shape = jnp.shape(bias)
  under = bwd.abs_upper(jnp.zeros(out_shape, dtype), bias=False, kappa_gamma=g_b,
                        bump=2 * fmt.tau * (1 + g_b), model="own")
  b_f = flush(bias)
  n_out = math.prod(out_shape[1:])
  n_in = math.prod(jnp.shape(m_in)[1:])
  g_n, _ = dot_error(fmt, n_out)
  v = _add_up(_add_up(_add_up(delta, delta0), tau), _mul_up(lin_abs, g_b))
  v = _clean(_add_up(v, _mul_up(jnp.abs(b_f), g_n)), True)
  axes = tuple(range(1, jnp.ndim(m_in)))
  c = _add_up(sum_upper(fmt, jnp.sum(under * m_in, axis=axes), n_in),
              _mul_up(sum_upper(fmt, jnp.sum(m_in, axis=axes), n_in), fmt.tau))
  return {"bias": b_f, "V": v, "c": _clean(c, True), "n_out": n_out, "n_in": n_in}


def relu_step_terms(terms: dict, pre_lower: jax.Array, pre_upper: jax.Array,
                    fmt: _Format) -> dict:
  """``V_relu``, ``c_relu``: a segment's ``V``, ``c`` when its output row came from the
  ReLU step on ``[pre_lower, pre_upper]`` (module docstring): ``+ 2 u |v|max`` and
  ``+ 3 tau sum |v|max`` over the unstable neurons, the only ones where ``neg s``
  rounds. Per example, computed once per segment."""
  unstable = (pre_lower < 0) & (pre_upper > 0)
  mag = jnp.where(unstable, jnp.maximum(-pre_lower, pre_upper), 0.0)
  axes = tuple(range(1, mag.ndim))
  total = sum_upper(fmt, jnp.sum(mag, axis=axes), terms["n_out"])
  return {"V_relu": _add_up(terms["V"], _mul_up(mag, 2 * fmt.u)),
          "c_relu": _add_up(terms["c"], _mul_up(total, 3 * fmt.tau))}


def relaxation(pre_lower: jax.Array, pre_upper: jax.Array):
  """(a, s, t): ``a v - tau <= z' <= s v + t`` on ``[l, u]`` in exact arithmetic for the
  float ``a, s, t`` returned (``z'``: ``relu(v)`` as the next layer reads it), ``a`` in
  {0, 1}, ``s`` in [0, 1] and never subnormal. The chord ``t`` is rounded up from
  both end-point conditions ``t >= -s l`` and ``t >= u - s u``."""
  lo, up = pre_lower, pre_upper
  active, inactive = lo >= 0, up <= 0
  unstable = ~active & ~inactive
  width = jnp.where(unstable, up - lo, 1.0)
  s = _clean(jnp.clip(jnp.where(unstable, up / width, 0.0), 0.0, 1.0), True)
  t1 = _next(s * (-lo), True)
  t2 = _next(up - _next(s * up, False), True)
  t = jnp.where(unstable, jnp.maximum(t1, t2), 0.0)
  s = jnp.where(active, 1.0, jnp.where(unstable, s, 0.0))
  a = jnp.where(active, 1.0, jnp.where(unstable, (up > -lo).astype(lo.dtype), 0.0))
  return a, s, t
