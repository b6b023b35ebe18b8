"""IBP cost relative to a forward pass, and the cost of certifying |Q| = |C| = 1000.

  python bench/ibp_overhead.py [--arch=large] [--batch=256] [--repeats=5]

Prints, measured in this one run on this machine:
  forward time, IBP-bounds time and their ratio (target <= 2.5) for the model
  at the given batch (jitted, compiled before timing, median of repeats);
  the time to certify |Q| = |C| = 1000 from known features and boxes (distance
  bounds, QA and CA rank bounds, Recall@K and CR-Recall@K for K in 1, 10, 20, 40).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _timing import median_time  # noqa: E402
from jaxcert import certification, models  # noqa: E402
from jaxcert.interval import Interval, ibp, input_box  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="large", choices=models.ARCHS)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--num", type=int, default=1000, help="|Q| = |C|")
  args = p.parse_args()

  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  model = models.make_model(args.arch, (28, 28, 1), dataset="fashion_mnist")
  graphdef, params = models.split(model)
  apply = models.apply_fn(graphdef)
  x = jax.random.uniform(jax.random.key(0), (args.batch, 28, 28, 1))
  fwd = jax.jit(lambda p, x: apply(p, x))
  bnd = jax.jit(lambda p, x: ibp(lambda z: apply(p, z))(input_box(x, 0.1)))
  t_fwd = median_time(lambda: fwd(params, x), args.repeats)
  t_ibp = median_time(lambda: bnd(params, x), args.repeats)
  print(f"{args.arch} model, batch {args.batch}: forward {t_fwd * 1e3:.1f} ms, "
        f"IBP bounds {t_ibp * 1e3:.1f} ms, ratio IBP/forward = {t_ibp / t_fwd:.2f} "
        f"(target <= 2.5)")

  rng = np.random.default_rng(0)
  n, d = args.num, 128
  qf, cf = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  qr, cr = (rng.uniform(0, 0.05, size=(n, d)).astype(np.float32) for _ in range(2))
  ql, cl = rng.integers(0, 10, n), rng.integers(0, 10, n)
  qb, cb = Interval(qf - qr, qf + qr), Interval(cf - cr, cf + cr)
  run = lambda: certification.certify_features(qf, qb, ql, cf, cb, cl, (1, 10, 20, 40))
  print(f"certify |Q| = |C| = {n}, d = {d} (features known; QA + CA, 4 values of K): "
        f"{median_time(run):.2f} s")
  t_all = (2 * n / args.batch) * (t_fwd + t_ibp)
  print(f"estimated features + boxes for {2 * n} images with the {args.arch} model: "
        f"{t_all:.1f} s")


if __name__ == "__main__":
  main()
