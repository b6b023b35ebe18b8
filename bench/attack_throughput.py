"""PGD ranking-attack cost: time per PGD step per query (QA) / per source (CA).

  python bench/attack_throughput.py [--arch=small] [--batch=128] [--num=1000] [--steps=10]

Measured in one run on this machine (jitted, compiled before timing): the time of a
PGD step on a batch against |C| = num candidates, per image, and the ratio to one
forward+backward pass of the model on the same batch; and the same CA PGD run with
the step loop rolled (``unroll=False``) against unrolled (the default).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _timing import median_time  # noqa: E402
from jaxcert import attacks, models  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="small", choices=models.ARCHS)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--num", type=int, default=1000, help="|C|")
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  g, params = models.split(models.make_model(args.arch, (28, 28, 1), dataset="fashion_mnist"))
  apply = models.apply_fn(g)
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(k1, (args.batch, 28, 28, 1))
  cf = apply(params, jax.random.uniform(k2, (args.num, 28, 28, 1)))
  fq = apply(params, x)
  grad = jax.jit(jax.grad(lambda p, z: jnp.sum(apply(p, z) ** 2), argnums=1))
  t_fb = median_time(lambda: grad(params, x))
  t_qa = median_time(lambda: attacks._qa_batch(apply, params, x, cf[:args.batch], cf, 0.1, 0.01,
                                           args.steps)) / args.steps
  t_ca = median_time(lambda: attacks._ca_batch(apply, params, x, fq, cf, 0.1, 0.01,
                                           args.steps)) / args.steps
  d_qc = jnp.linalg.norm(fq[:, None] - cf[None], axis=-1)
  ca_loss = lambda z: jnp.sum(jax.nn.relu(jnp.linalg.norm(fq - apply(params, z), axis=1)[:, None]
                                          - d_qc), axis=1)
  loops = {u: jax.jit(lambda z, u=u: attacks.pgd(ca_loss, z, 0.1, steps=args.steps,
                                                 step_size=0.01, unroll=u))
           for u in (False, True)}
  t_loop = {u: median_time(lambda u=u: loops[u](x)) / args.steps for u in loops}
  b = args.batch
  print(f"{args.arch} model, batch {b}, |C| = {args.num}: forward+backward {t_fb * 1e3:.1f} ms")
  for name, t in (("QA", t_qa), ("CA", t_ca)):
    print(f"{name}: PGD step {t * 1e3:.1f} ms per batch = {t / b * 1e3:.3f} ms per image "
          f"({b / t:.0f} image-steps/s), {t / t_fb:.2f}x forward+backward")
  print(f"CA PGD step loop rolled {t_loop[False] * 1e3:.1f} ms, unrolled "
        f"{t_loop[True] * 1e3:.1f} ms: unrolled is {t_loop[False] / t_loop[True]:.2f}x faster")
  print(f"paper budget (100 steps): QA for 1000 queries {1000 * 100 * t_qa / b:.0f} s, "
        f"CA for 1000 queries x 100 sources {1000 * 100 * 100 * t_ca / b:.0f} s")


if __name__ == "__main__":
  main()
