"""The CBIR paper's settings (Sec. 5.1): ``--config=configs/cbir.py:DATASET,ARCH,METHOD``.

DATASET: mnist | fashion_mnist | cifar10; ARCH: small | large; METHOD: triplet | tbt.
Adam, batch 100, lr 1e-3; MNIST/FMNIST: 100 epochs, lr x0.1 at epochs 25 and 42,
eps_e = 0.2; CIFAR-10: 200 epochs, lr x0.5 every 10 epochs from 130, eps_e = 2/255.
eps and kappa ramp between steps 2K and 10K; kappa_e = 0.5.
"""

from jaxcert.config import base_config

_TRAIN_SIZE = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}


def get_config(arg: str = "fashion_mnist,large,tbt"):
  parts = arg.split(",")
  if len(parts) != 3:
    raise ValueError(f"configs/cbir.py takes 'DATASET,ARCH,METHOD', got {arg!r}")
  dataset, arch, method = parts
  if dataset not in _TRAIN_SIZE:
    raise ValueError(f"DATASET must be one of {sorted(_TRAIN_SIZE)}, got {dataset!r}")
  c = base_config()
  c.data.name = dataset
  c.model.arch = arch
  c.train.method = method
  steps_per_epoch = _TRAIN_SIZE[dataset] // c.train.batch_size
  if dataset == "cifar10":
    c.train.num_steps = 200 * steps_per_epoch
    c.train.lr_decay = 0.5
    c.train.lr_decay_steps = tuple(e * steps_per_epoch for e in range(130, 200, 10))
    c.train.eps = 2 / 255
    c.certify.eps = 2 / 255
  else:
    c.train.num_steps = 100 * steps_per_epoch
    c.train.lr_decay = 0.1
    c.train.lr_decay_steps = (25 * steps_per_epoch, 42 * steps_per_epoch)
    c.train.eps = 0.2
    c.certify.eps = 0.2
  c.train.checkpoint_every = steps_per_epoch
  return c
