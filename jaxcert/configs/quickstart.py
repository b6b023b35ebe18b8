"""Quickstart: Small CNN on Fashion-MNIST, a few minutes on 2 CPU cores.

``--config=quickstart`` (the entry points' default; ``configs/quickstart.py`` in a
checkout) trains with TBT; ``--config=quickstart:triplet`` trains the Triplet baseline on
the same schedule for comparison.
"""

from jaxcert.config import base_config


def get_config(method: str = "tbt"):
  c = base_config()
  c.model.arch = "small"
  c.train.method = method
  c.train.num_steps = 3_000
  c.train.lr_decay_steps = (2_500,)
  c.train.eps = 0.1
  c.train.kappa = 0.5
  c.train.ramp_start = 500
  c.train.ramp_end = 2_000
  c.train.log_every = 250
  c.train.checkpoint_every = 500
  c.certify.eps = 0.1
  c.certify.attack_steps = 10            # paper: 100 (10 steps of eps/10 span the ball)
  c.certify.ca_sources = 10              # paper: 100
  return c
