"""Trains a feature extractor (Triplet, ACT, C-IBP, TBT or FCTB); resumes from the latest checkpoint.

  python train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python train.py --config=configs/cbir.py:fashion_mnist,large,tbt --workdir=runs/fl \
      --config.train.num_steps=20000

The logic lives in jaxcert.training so it can be imported and tested.
"""

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxcert import config, training
from jaxcert.checkpoint import CheckpointError

config.exit_on_unknown_keys(sys.argv)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "Training configuration.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.",
                               required=True)


def main(argv):
  sys.stdout.reconfigure(line_buffering=True)   # progress lines show up in logs at once
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    training.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, CheckpointError, FloatingPointError) as e:
    raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
  app.run(main)
