"""Cost of CROWN-IBP / CROWN feature boxes vs IBP and a forward pass, and peak memory.

  python bench/linear_bounds_cost.py [--arch=small|large] [--batch=64] [--image_chunk=16]
      [--methods=ibp,crown_ibp,crown] [--repeats=2]
  python bench/linear_bounds_cost.py --train_step [--batch=20] [--crown_depth=2]

Each method runs in its own subprocess (so its peak resident memory is its own) on the
same random-init model and random images at eps = 0.01; prints ms per image, the ratio to
a forward pass and to IBP measured in this run, and peak RSS. Peak memory depends on
``image_chunk`` (images bounded at a time), not on ``batch``: run two batch sizes to see.
``--train_step``: seconds per TBT training step (``batch`` triplets, 28 x 28) with IBP
boxes and with ``train.bound_method=crown_ibp`` at ``--crown_depth`` (0: full depth).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(args) -> dict:
  import jax  # noqa: PLC0415

  from jaxcert import config as config_lib  # noqa: PLC0415
  from jaxcert import models, training  # noqa: PLC0415
  from jaxcert.interval import input_box  # noqa: PLC0415
  from jaxcert.linear_bounds import linear_bounds  # noqa: PLC0415

  c = config_lib.base_config()
  c.model.arch = args.arch
  graphdef, params = training.build_model(c, (28, 28, 1))
  apply = models.apply_fn(graphdef)
  x = jax.random.uniform(jax.random.key(0), (args.batch, 28, 28, 1))
  if args.method == "forward":
    fn = jax.jit(apply)
    run = lambda: fn(params, x)
  else:
    chunk = {} if args.image_chunk is None else {"image_chunk": args.image_chunk}
    fn = jax.jit(lambda p, b: linear_bounds(lambda z: apply(p, z), args.method, **chunk)(b))
    box = input_box(x, 0.01)
    run = lambda: fn(params, box)
  jax.block_until_ready(run())
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t)
  return {"method": args.method, "ms_per_image": 1000 * min(times) / args.batch,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train_steps(args) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from jaxcert import config as config_lib  # noqa: PLC0415
  from jaxcert import models, training  # noqa: PLC0415

  x = np.random.default_rng(0).uniform(size=(3, args.batch, 28, 28, 1)).astype(np.float32)
  batch = {"images": jnp.asarray(x)}
  times = {}
  for bm in ("ibp", "crown_ibp"):
    c = config_lib.base_config()
    c.model.arch = args.arch
    c.train.bound_method = bm
    c.train.crown_depth = args.crown_depth or None
    graphdef, params = models.split(models.make_model(args.arch, (28, 28, 1),
                                                      dataset="fashion_mnist"))
    opt = optax.adam(1e-3)
    state = training.init_state(c, params, opt)
    step = training.make_train_step(models.apply_fn(graphdef), opt, "tbt", c.train)
    state, m = step(state, batch, 0.2, 0.5)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(args.repeats):
      state, m = step(state, batch, 0.2, 0.5)
    jax.block_until_ready(m)
    times[bm] = (time.perf_counter() - t) / args.repeats
    print(f"  {bm}: {times[bm]:.3f} s/step", flush=True)
  print(f"{args.arch} TBT step, batch {args.batch}, crown_depth "
        f"{args.crown_depth or 'full'}: crown_ibp / ibp = x{times['crown_ibp'] / times['ibp']:.0f}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="small", choices=("small", "large"))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image_chunk", type=int, default=None,
                 help="images bounded at a time (default: linear_bounds' default)")
  p.add_argument("--methods", default="ibp,crown_ibp,crown")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--train_step", action="store_true")
  p.add_argument("--crown_depth", type=int, default=2)
  p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child process
  args = p.parse_args()
  if args.train_step:
    train_steps(args)
    return
  if args.method:
    print(json.dumps(child(args)))
    return
  rows = []
  for m in ["forward"] + args.methods.split(","):
    cmd = [sys.executable, __file__, f"--arch={args.arch}", f"--batch={args.batch}",
           f"--repeats={args.repeats}", f"--method={m}"]
    if args.image_chunk is not None:
      cmd.append(f"--image_chunk={args.image_chunk}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"  {m}: {rows[-1]['ms_per_image']:.3f} ms/image, peak RSS "
          f"{rows[-1]['peak_rss_gb']:.2f} GB", flush=True)
  fwd = rows[0]["ms_per_image"]
  ibp = next((r["ms_per_image"] for r in rows if r["method"] == "ibp"), None)
  print(f"{args.arch}, batch {args.batch}, image_chunk {args.image_chunk or 'default'}:")
  for r in rows[1:]:
    extra = f", x{r['ms_per_image'] / ibp:.0f} IBP" if ibp else ""
    print(f"  {r['method']:>9}: {r['ms_per_image']:.2f} ms/image = x{r['ms_per_image'] / fwd:.0f}"
          f" forward{extra}; peak RSS {r['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
  main()
