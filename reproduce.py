"""Reproduces the CBIR paper's Tables 1 and 2 over any part of its grid.

  python reproduce.py --datasets=fashion_mnist --archs=small --budget=cpu
  python reproduce.py --datasets=mnist,fashion_mnist,cifar10 --archs=large   # the paper

Trains (resuming from checkpoints: rerun the same command after an interruption),
certifies at each eps with PGD attacks and the certificate audit, and writes
<root>/tables.md, tables.json and PNG plots, our numbers beside the paper's.
"""

import sys

from absl import app, flags, logging

from jaxcert import grid, reproduce
from jaxcert.checkpoint import CheckpointError

_DATASETS = flags.DEFINE_list("datasets", ["fashion_mnist"], f"subset of {grid.DATASETS}")
_ARCHS = flags.DEFINE_list("archs", ["small"], f"subset of {grid.ARCHS}")
_METHODS = flags.DEFINE_list("methods", list(grid.METHODS), f"subset of {grid.METHODS}")
_EPS = flags.DEFINE_list("eps", None, "certification radii, e.g. 0.1,0.2 or 2/255 "
                         "(default: the paper's two per dataset)")
_BUDGET = flags.DEFINE_enum("budget", "paper", list(grid.BUDGETS),
                            "paper: the paper's schedules; cpu: a 10-epoch schedule")
_ROOT = flags.DEFINE_string("root", "runs/cbir", "where runs and tables go")
_STAGES = flags.DEFINE_list("stages", ["train", "certify", "tables"],
                            "any of train, certify, tables")


def main(argv):
  sys.stdout.reconfigure(line_buffering=True)   # progress lines show up in logs at once
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    eps = None if _EPS.value is None else [grid.parse_eps(e) for e in _EPS.value]
    reproduce.run(datasets=_DATASETS.value, archs=_ARCHS.value, methods=_METHODS.value,
                  eps_values=eps, budget=_BUDGET.value, root=_ROOT.value,
                  stages=_STAGES.value)
  except (ValueError, CheckpointError, FloatingPointError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
