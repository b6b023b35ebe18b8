"""Trains a feature extractor (Triplet, ACT, C-IBP, TBT, FCTB, DML or GDML); resumes.

  python train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python train.py --config=configs/cbir.py:fashion_mnist,large,tbt --workdir=runs/fl \
      --config.train.num_steps=20000

The checkout's name for the ``jaxcert-train`` program (``python -m jaxcert.train``): one
implementation, :func:`jaxcert.cli.train_main`; the logic lives in jaxcert.training.
"""

from jaxcert import cli

if __name__ == "__main__":
  cli.train_main()
