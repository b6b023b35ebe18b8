"""Monte-Carlo smoothing throughput vs the same model's plain batched forward pass.

  python bench/smoothing_throughput.py [--arch=small] [--image_size=28] [--chunk=1000]
      [--num_samples=10000] [--images=4] [--repeats=3]
  python bench/smoothing_throughput.py --arch=resnet50 --image_size=224 --chunk=500 \
      --num_samples=100000 --images=1          # the paper's setting (on a GPU)

Prints, measured in this one run:
  forward: images/s of the jitted model on a batch of ``chunk`` images (median);
  smoothing: samples/s of ``smoothing.smoothed_embed`` (noise generation, forward,
  projection, accumulation, host transfer) for ``images`` images x ``num_samples``;
  both are the median of ``repeats`` interleaved runs;
  their ratio (target >= 0.9) and the seconds per image at ``num_samples``
  (RetrievalGuard reports ~180 s per image for ResNet-50, n = 100,000, on a P40).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _timing import median_time  # noqa: E402
from jaxcert import models, smoothing  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="small", choices=models.ARCHS)
  p.add_argument("--image_size", type=int, default=28)
  p.add_argument("--channels", type=int, default=None, help="default: 1 at 28 px, else 3")
  p.add_argument("--chunk", type=int, default=1000, help="samples per forward pass")
  p.add_argument("--num_samples", type=int, default=10_000)
  p.add_argument("--images", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()

  c = args.channels or (1 if args.image_size == 28 else 3)
  shape = (args.image_size, args.image_size, c)
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  model = models.make_model(args.arch, shape, normalize=True)
  graphdef, params = models.split(model)
  apply = models.apply_fn(graphdef)
  x = jax.random.uniform(jax.random.key(0), (args.chunk,) + shape)
  fwd = jax.jit(apply)
  images = np.random.default_rng(0).uniform(size=(args.images,) + shape).astype(np.float32)

  def smooth():
    return smoothing.smoothed_embed(apply, params, images, sigma=0.25,
                                    num_samples=args.num_samples, key=jax.random.key(1),
                                    chunk_size=args.chunk)

  smooth()                                   # compile
  t_fwd, t_sm = [], []
  for _ in range(args.repeats):              # interleaved, so drift hits both alike
    with jax.default_matmul_precision("highest"):
      t_fwd.append(median_time(lambda: fwd(params, x), 1))
    t0 = time.perf_counter()
    smooth()
    t_sm.append(time.perf_counter() - t0)
  t_fwd, t_sm = float(np.median(t_fwd)), float(np.median(t_sm))
  fwd_rate = args.chunk / t_fwd
  sm_rate = args.images * args.num_samples / t_sm
  print(f"{args.arch} {shape}, chunk {args.chunk}: forward {fwd_rate:,.0f} images/s, "
        f"smoothing {sm_rate:,.0f} samples/s, ratio smoothing/forward = "
        f"{sm_rate / fwd_rate:.2f} (target >= 0.9)")
  print(f"seconds per image at n = {args.num_samples:,}: {t_sm / args.images:.2f} s "
        f"(RetrievalGuard, ResNet-50 224 px, n = 100,000, P40: ~180 s)")


if __name__ == "__main__":
  main()
