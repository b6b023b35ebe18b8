"""Embedding scale vs IBP box size of the grid's trained models.

  python scripts/embedding_geometry.py --root=runs/cbir_cpu [--dataset=fashion_mnist]
      [--arch=small] [--budget=cpu] [--eps=0.2] [--num=500]

For the first ``num`` candidates of each trained method: median feature norm, median
distance to the nearest same-class and other-class candidate, median l2 radius of the
IBP feature box at eps, and the median ratio radius / nearest other-class distance
(the scale-free quantity the rank certificates depend on).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxcert import certification, grid, models, reproduce, training  # noqa: E402
from jaxcert import data as data_lib  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="runs/cbir_cpu")
  p.add_argument("--dataset", default="fashion_mnist", choices=grid.DATASETS)
  p.add_argument("--arch", default="small", choices=grid.ARCHS)
  p.add_argument("--budget", default="cpu", choices=grid.BUDGETS)
  p.add_argument("--eps", type=grid.parse_eps, default=0.2)
  p.add_argument("--num", type=int, default=500)
  args = p.parse_args()
  cfg0 = grid.cbir_config(f"{args.dataset},{args.arch},tbt")
  split = data_lib.load(args.dataset, "test")
  _, c_idx = data_lib.query_candidate_split(split.labels, cfg0.data.num_queries,
                                            cfg0.data.num_candidates, cfg0.data.split_seed)
  c_idx = c_idx[:args.num]
  x, y = data_lib.to_float(split.images[c_idx]), split.labels[c_idx]
  same = y[:, None] == y[None]
  print(f"{args.dataset} {args.arch} ({args.budget}), eps {args.eps:g}, {len(x)} candidates")
  print("method    | feature norm | nn same | nn other | box l2 radius | radius / nn other")
  for m in grid.METHODS:
    workdir = reproduce.cell_dir(args.root, args.dataset, args.arch, m, args.budget)
    if not os.path.isdir(workdir):
      continue
    cfg = grid.cbir_config(f"{args.dataset},{args.arch},{m},{args.budget}")
    g, params, _ = training.load_trained(cfg, workdir, x.shape[1:])
    apply = models.apply_fn(g)
    f = certification.embed(apply, params, x)
    box = certification.feature_boxes(apply, params, x, args.eps)
    d = np.linalg.norm(f[:, None] - f[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn_same = np.where(same, d, np.inf).min(1)
    nn_other = np.where(~same, d, np.inf).min(1)
    r = np.linalg.norm((box.upper - box.lower) / 2, axis=1)
    print(f"{m:9s} | {np.median(np.linalg.norm(f, axis=1)):12.4g} | {np.median(nn_same):7.3g} | "
          f"{np.median(nn_other):8.3g} | {np.median(r):13.4g} | {np.median(r / nn_other):.3g}")


if __name__ == "__main__":
  main()
