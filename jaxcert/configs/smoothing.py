"""RetrievalGuard: margin-loss metric learning + randomized-smoothing certificates.

  --config=smoothing                  GDML, sigma 0.25, Fashion-MNIST, Small CNN
  --config=smoothing:dml              plain DML (no noise in training)
  --config=smoothing:gdml,0.5         GDML trained and certified at sigma 0.5
  --config=smoothing:dml,0.5          DML certified at sigma 0.5

(``configs/smoothing.py:...`` in a checkout loads the same file.) Defaults are a CPU
budget (6,000 steps of 10 classes x 10 images, n = 10,000 samples per query, 500
queries against a 1,000-image fixed gallery); the paper's setting is ResNet-50,
100 epochs, n = 100,000 (see docs/SMOOTHING.md).
"""

from jaxcert.config import base_config


def get_config(arg: str = "gdml"):
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  method = parts[0] if parts else "gdml"
  if method not in ("dml", "gdml"):
    raise ValueError(f"smoothing config: METHOD must be dml or gdml, got {method!r} "
                     "(use --config=smoothing:METHOD[,SIGMA])")
  if len(parts) > 2:
    raise ValueError(f"smoothing config takes METHOD[,SIGMA], got {arg!r}")
  try:
    sigma = float(parts[1]) if len(parts) > 1 else 0.25
  except ValueError:
    raise ValueError(f"smoothing config: SIGMA must be a positive number, got "
                     f"{parts[1]!r} (in {arg!r})") from None
  if not sigma > 0:
    raise ValueError(f"smoothing config: SIGMA must be a positive number, got {sigma!r}")
  c = base_config()
  c.model.arch = "small"
  c.model.normalize = True
  c.train.method = method
  c.train.noise_sigma = sigma
  c.train.batch_size = 100
  c.train.classes_per_batch = 10
  c.train.num_steps = 6_000
  c.train.learning_rate = 1e-3
  c.train.lr_decay = 0.3
  c.train.lr_decay_steps = (3_000, 4_500)
  c.train.log_every = 500
  c.train.checkpoint_every = 1_000
  c.certify.method = "smoothing"
  c.data.num_queries = 500
  c.data.num_candidates = 1000
  c.smoothing.sigma = sigma
  return c
