"""Cost of floating-point-sound bounds relative to plain ones (and to a forward pass).

  python bench/fp_sound_overhead.py [--arch=small] [--batch=256] [--repeats=5] [--eps=0.1]
      [--method=ibp|crown_ibp|crown]

Prints, measured in this one run on this machine, for the model at the given batch
(jitted, compiled before timing, median of repeats, the three timings interleaved):
forward time, plain bound time, fp-sound bound time (``--method``: IBP, or the linear
bounds of jaxcert.linear_bounds) and the ratio fp-sound / plain;
and how much wider the fp-sound boxes are than the plain ones (relative to the
plain width: median and max over outputs).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcert import models  # noqa: E402
from jaxcert.interval import ibp, input_box  # noqa: E402
from jaxcert.linear_bounds import METHODS, linear_bounds  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="small", choices=("small", "large"))
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--eps", type=float, default=0.1)
  p.add_argument("--method", default="ibp", choices=METHODS)
  args = p.parse_args()

  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  model = models.make_model(args.arch, (28, 28, 1), dataset="fashion_mnist")
  graphdef, params = models.split(model)
  apply = models.apply_fn(graphdef)
  x = jax.random.uniform(jax.random.key(0), (args.batch, 28, 28, 1))
  with jax.default_matmul_precision("highest"):
    fwd = jax.jit(apply)
  def bound(fn, fp):
    if args.method == "ibp":
      return ibp(fn, fp_sound=fp)
    return linear_bounds(fn, args.method, fp_sound=fp)

  plain = jax.jit(lambda p, x: bound(lambda z: apply(p, z), False)(input_box(x, args.eps)))
  sound = jax.jit(lambda p, x: bound(lambda z: apply(p, z), True)(
      input_box(x, args.eps, fp_sound=True)))
  fns = {"forward": lambda: fwd(params, x), "plain": lambda: plain(params, x),
         "sound": lambda: sound(params, x)}
  times = {k: [] for k in fns}
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  for _ in range(args.repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  t = {k: statistics.median(v) for k, v in times.items()}
  name = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}[args.method]
  print(f"{args.arch} model, batch {args.batch}, eps {args.eps}: forward "
        f"{t['forward'] * 1e3:.1f} ms, plain {name} {t['plain'] * 1e3:.1f} ms, fp-sound "
        f"{name} {t['sound'] * 1e3:.1f} ms; ratio fp-sound / plain = "
        f"{t['sound'] / t['plain']:.2f}, "
        f"fp-sound / forward = {t['sound'] / t['forward']:.2f}")
  a, b = plain(params, x), sound(params, x)
  w_plain = np.asarray(a.upper - a.lower, np.float64)
  w_sound = np.asarray(b.upper - b.lower, np.float64)
  rel = (w_sound - w_plain) / np.maximum(w_plain, np.finfo(np.float32).tiny)
  contained = bool(np.all(np.asarray(b.lower) <= np.asarray(a.lower))
                   and np.all(np.asarray(b.upper) >= np.asarray(a.upper)))
  print(f"fp-sound box width / plain box width - 1: median {np.median(rel):.2e}, "
        f"max {np.max(rel):.2e}; fp-sound box contains the plain box: {contained}")


if __name__ == "__main__":
  main()
