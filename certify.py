"""Certifies a trained extractor.

  python certify.py --config=configs/quickstart.py --workdir=runs/quickstart
  python certify.py --config=configs/smoothing.py:gdml,0.25 --workdir=runs/gdml25

``certify.method = "ibp"`` (l_inf, CBIR paper): Recall@K and CR-Recall@K under QA
and CA; writes results.json, results.md and cr_recall.png to <workdir>/certify.
``certify.method = "smoothing"`` (l_2, RetrievalGuard + our half-space and top-K
certificates): Recall@1 of the smoothed model, certified Recall@K curves over the
radius, per-query radii; writes to <workdir>/certify_smoothing. Either directory
can be set with --config.certify.output_dir. The logic lives in jaxcert.certification
and jaxcert.smoothed_certify.
"""

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxcert import certification, config
from jaxcert.checkpoint import CheckpointError

config.exit_on_unknown_keys(sys.argv)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "Configuration (model, data, certify).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding the checkpoints.",
                               required=True)


def main(argv):
  sys.stdout.reconfigure(line_buffering=True)   # progress lines show up in logs at once
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  cfg = _CONFIG.value
  try:
    certification.certify(cfg, _WORKDIR.value, output_dir=cfg.certify.output_dir)
  except (ValueError, CheckpointError) as e:
    raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
  app.run(main)
