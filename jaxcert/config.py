"""The configuration schema shared by every file in ``configs/``.

``base_config()`` returns a locked ``ml_collections.ConfigDict`` holding every key
that ``train.py`` and ``certify.py`` read; config files change values, never add
keys, so an unknown ``--config.x=y`` override fails with the key's name.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                             # model init, samplers, training noise

  c.data = ml_collections.ConfigDict()
  # mnist | fashion_mnist | cifar10 (CBIR); stanford_online_products |
  # caltech_birds2011 | cars196 (RetrievalGuard, tfds, split by class);
  # folder (class-per-folder images in data.source_dir)
  c.data.name = "fashion_mnist"
  c.data.data_dir = config_dict.placeholder(str)    # tfds data dir (None: tfds default)
  c.data.source_dir = config_dict.placeholder(str)  # offline original files
  c.data.num_queries = 1000              # |Q|, drawn from the test split
  c.data.num_candidates = 1000           # |C| (gallery), disjoint from Q
  c.data.split_seed = 0                  # draws Q and C from the test split
  c.data.image_size = 224                # retrieval datasets / folder: resize + crop
  c.data.train_classes = config_dict.placeholder(int)  # folder: first classes = train
  c.data.max_per_class = config_dict.placeholder(int)  # retrieval/folder subsampling
  c.data.max_classes = config_dict.placeholder(int)  # retrieval/folder: first classes only

  c.model = ml_collections.ConfigDict()
  c.model.arch = "large"                 # small | large | resnet18 | resnet50
  c.model.embed_dim = 128                # embedding size d
  c.model.normalize = False              # L2-normalise the embedding (dml/gdml, smoothing)
  c.model.pretrained = config_dict.placeholder(str)  # resnet*: torchvision-named .npz
  c.model.freeze_bn = False              # resnet*: also freeze BN scale/bias (stats always)

  c.train = ml_collections.ConfigDict()
  c.train.method = "tbt"                 # triplet | act | cibp | tbt | fctb | dml | gdml
  c.train.num_steps = 60_000             # 100 epochs of 600 steps (FMNIST, batch 100)
  c.train.batch_size = 100               # triplets per step
  c.train.learning_rate = 1e-3           # Adam
  c.train.lr_decay = 0.1                 # lr factor at each of lr_decay_steps
  c.train.lr_decay_steps = (15_000, 25_200)  # epochs 25 and 42
  c.train.margin = 1.0                   # triplet margin
  c.train.eps = 0.2                      # eps_e of the TBT ramp
  c.train.kappa = 0.5                    # kappa_e of the TBT ramp
  c.train.ramp_start = 2_000             # eps/kappa ramps start (step)
  c.train.ramp_end = 10_000              # ... and end (step)
  c.train.act_steps = 10                 # ACT: PGD steps of the anti-collapse attack
  c.train.act_step_size = config_dict.placeholder(float)  # None: 2.5 * eps / act_steps
  c.train.init_from = config_dict.placeholder(str)  # FCTB: workdir of the model f0
  c.train.cibp_elision = True            # C-IBP: fold the margin into the head
  c.train.bound_method = "ibp"           # tbt/fctb/cibp boxes: ibp | crown_ibp (Zhang 2020)
  c.train.crown_beta = 1.0               # crown_ibp: weight of CROWN-IBP at ramp_start
  c.train.crown_beta_end = 1.0           # ... at ramp_end (Zhang et al.: 1 -> 0)
  c.train.crown_depth = config_dict.placeholder(int)  # crown_ibp: layers back-substituted
  c.train.gamma = 0.2                    # dml/gdml: margin of the margin loss
  c.train.beta_init = 1.2                # dml/gdml: initial boundary beta
  c.train.beta_lr = 5e-4                 # dml/gdml: Adam learning rate of beta
  c.train.classes_per_batch = 10         # dml/gdml: classes per class-balanced batch
  c.train.noise_sigma = 0.25             # gdml: std of the Gaussian augmentation
  c.train.log_every = 200                # steps between log lines / metrics rows
  c.train.checkpoint_every = 2_000       # steps between orbax checkpoints
  c.train.max_to_keep = 3                # checkpoints kept

  c.certify = ml_collections.ConfigDict()
  c.certify.eps = 0.2                    # l_inf radius certified (pixels in [0, 1])
  c.certify.ks = (1, 10, 20, 40)         # K of Recall@K / ER / CR-Recall@K
  c.certify.batch_size = 250             # images per forward / bound pass
  c.certify.output_dir = config_dict.placeholder(str)  # None: <workdir>/certify
  c.certify.attack = True                # PGD QA/CA attacks for ER-Recall@K
  c.certify.attack_steps = 100           # paper: 100 steps of size eps / 10
  c.certify.attack_step_size = config_dict.placeholder(float)  # None: eps / 10
  c.certify.ca_sources = 100             # paper: 100 source candidates per query
  c.certify.attack_seed = 0              # PGD starts and attack targets
  c.certify.attack_restarts = 1          # PGD runs per attack; >1 adds random starts
  c.certify.audit = True                 # attack every certified claim (needs attack)
  c.certify.audit_pool = 50              # CA audit: competitors attacked per query
  c.certify.fp_sound = True              # boxes and distance bounds widened for rounding

  c.certify.method = "ibp"               # ibp (l_inf, CBIR) | smoothing (l_2, RetrievalGuard)
  c.certify.bound_method = "ibp"         # l_inf feature boxes: ibp | crown_ibp | crown
  #   (linear_bounds.py; fp_sound covers all three)

  c.smoothing = ml_collections.ConfigDict()  # certify.method = "smoothing"
  c.smoothing.sigma = 0.25               # noise std of the smoothed model
  c.smoothing.num_samples = 10_000       # n per image (paper: 100,000)
  c.smoothing.rho = 0.01                 # failure probability of each certificate
  c.smoothing.norm_bound = 1.0           # F: samples are projected onto ||f|| <= F
  c.smoothing.gallery = "fixed"          # fixed: base f(b) | smoothed: g_hat(b), union bound
  c.smoothing.chunk_size = 1000          # samples per forward pass (memory bound)
  c.smoothing.batch_images = 1           # images smoothed together
  c.smoothing.seed = 0                   # Monte-Carlo noise
  c.smoothing.ks = (1, 5, 10)            # top-K certificates (half-space, fixed gallery)
  c.smoothing.max_positives = 32         # same-class gallery items tried per query
  c.smoothing.empirical_bernstein = True  # fixed gallery: also per-direction bounds
  c.smoothing.num_radii = 61             # points of the certified-recall curve

  c.parallel = ml_collections.ConfigDict()  # several devices / processes (MULTIDEVICE.md)
  c.parallel.num_devices = config_dict.placeholder(int)  # training: None = every device
  c.parallel.distributed = False         # call jax.distributed.initialize (multi-host)
  c.parallel.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0
  c.parallel.num_processes = config_dict.placeholder(int)  # None: detected (Slurm, MPI, TPU)
  c.parallel.process_id = config_dict.placeholder(int)     # None: detected

  c.lock()
  return c


def check_overrides(args, flag: str = "config") -> None:
  """Rejects ``--config.a.b=v`` overrides whose key the schema does not have.

  Raises ValueError naming the key, the argument and the keys allowed there.
  """
  schema = base_config()
  prefix = f"--{flag}."
  for arg in args:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split("=", 1)[0]
    node, walked = schema, []
    for key in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        where = ".".join(walked) or "the top level"
        allowed = ", ".join(sorted(node.keys())) if isinstance(
            node, ml_collections.ConfigDict) else "(none: it is a value)"
        raise ValueError(f"unknown config key {path!r} in {arg!r}: {where} has keys "
                         f"{allowed}")
      node = node[key]
      walked.append(key)


def exit_on_unknown_keys(argv) -> None:
  """For entry points, before ``DEFINE_config_file`` (which applies overrides at once)."""
  try:
    check_overrides(argv[1:])
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
