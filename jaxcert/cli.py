"""The command-line programs: ``jaxcert-train``, ``jaxcert-certify``, ``jaxcert-reproduce``.

Each runs the same way as ``python -m jaxcert.train`` (``.certify``, ``.reproduce``) and,
in a checkout, as ``python train.py`` (``certify.py``, ``reproduce.py``): those are thin
wrappers around the functions here. This module only parses flags; the logic lives in
:mod:`jaxcert.training`, :mod:`jaxcert.certification` and :mod:`jaxcert.reproduce`.

``--config`` takes a config bundled with the package by name, ``NAME[:ARG]``
(:mod:`jaxcert.configs`: ``quickstart``, the default, ``cbir:DATASET,ARCH,METHOD[,EPS]
[,BUDGET]``, ``smoothing:METHOD[,SIGMA]``), or the path of a config file ``FILE.py[:ARG]``
(``configs/cbir.py:...`` in a checkout). ``--config.section.key=value`` overrides any key
of :func:`jaxcert.config.base_config`; an unknown key fails before anything runs and
lists the keys allowed there.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxcert import certification, config, configs, grid, reproduce, training
from jaxcert.checkpoint import CheckpointError

DEFAULT_CONFIG = "quickstart"

_CONFIG_HELP = (f"Config: NAME[:ARG] with NAME one of {', '.join(configs.BUNDLED)} "
                "(bundled with jaxcert, e.g. cbir:fashion_mnist,small,tbt), or FILE.py[:ARG]. "
                "Override any key with --config.section.key=value.")

TRAIN_USAGE = """\
Trains a feature extractor (Triplet, ACT, C-IBP, TBT, FCTB, DML or GDML); rerun the same
command to resume from the latest checkpoint in --workdir.

  jaxcert-train --config=quickstart --workdir=runs/quickstart
  jaxcert-train --config=cbir:fashion_mnist,large,tbt --workdir=runs/fl \\
      --config.train.num_steps=20000
  jaxcert-train --config=smoothing:gdml,0.25 --workdir=runs/gdml25

Also `python -m jaxcert.train` and, in a checkout, `python train.py`
(where --config=configs/cbir.py:... names the same configs).
"""

CERTIFY_USAGE = """\
Certifies the latest checkpoint in --workdir.

  jaxcert-certify --config=quickstart --workdir=runs/quickstart
  jaxcert-certify --config=smoothing:gdml,0.25 --workdir=runs/gdml25

certify.method = "ibp" (l_inf, CBIR paper): Recall@K and CR-Recall@K under QA and CA,
PGD attacks and the certificate audit; writes results.json, results.md and cr_recall.png
to <workdir>/certify. certify.method = "smoothing" (l_2, RetrievalGuard + half-space and
top-K certificates): writes to <workdir>/certify_smoothing. --config.certify.output_dir
sets either directory. Also `python -m jaxcert.certify` and, in a checkout,
`python certify.py`.
"""

REPRODUCE_USAGE = """\
Reproduces the CBIR paper's Tables 1 and 2 over any part of its grid.

  jaxcert-reproduce --datasets=fashion_mnist --archs=small --budget=cpu
  jaxcert-reproduce --datasets=mnist,fashion_mnist,cifar10 --archs=large   # the paper

Trains (resuming from checkpoints: rerun the same command after an interruption),
certifies at each eps with PGD attacks and the certificate audit, and writes
<root>/tables.md, tables.json and PNG plots, our numbers beside the paper's.
Also `python -m jaxcert.reproduce` and, in a checkout, `python reproduce.py`.
"""


class _BundledOrFile(flags.ArgumentParser):
  """Wraps ml_collections' config-file parser: bundled config names resolve to their file."""

  def __init__(self, file_parser: flags.ArgumentParser):
    self._file_parser = file_parser

  def parse(self, argument):
    return self._file_parser.parse(configs.resolve(argument))

  def flag_type(self) -> str:
    return self._file_parser.flag_type()


def _define_config_flag() -> flags.FlagHolder:
  """``--config`` with ``--config.x=y`` overrides; NAME[:ARG] or FILE[:ARG] (see module doc)."""
  # Defined without a default (nothing is loaded yet), given the name-resolving parser,
  # then the default, which that parser loads when --config is not given.
  holder = config_flags.DEFINE_config_file("config", None, _CONFIG_HELP, lock_config=True)
  flag = flags.FLAGS[holder.name]
  flag.parser = _BundledOrFile(flag.parser)
  flags.set_default(holder, DEFAULT_CONFIG)
  return holder


def _start(usage: str) -> None:
  """Checks ``--config.*`` keys (before the flag applies them) and sets the --help text."""
  config.exit_on_unknown_keys(sys.argv)
  sys.modules["__main__"].__doc__ = usage   # absl's --help prints __main__'s docstring


def _show_in_help(*holders: flags.FlagHolder) -> None:
  """Lists the program's own flags under --help (absl shows the main module's key flags)."""
  for holder in holders:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])


# absl's help flags (True: the program's own flags, False: all flags). absl exits with
# status 1 after printing help; asking for help is not a failure, so these exit with 0.
_HELP_ARGS = {"-h": True, "-?": True, "--help": True, "-help": True, "--helpshort": True,
              "-helpshort": True, "--helpfull": False, "-helpfull": False}


def _exit_on_help(argv) -> None:
  for arg in argv[1:]:
    if arg == "--":
      return
    if arg in _HELP_ARGS:
      app.usage(shorthelp=_HELP_ARGS[arg], writeto_stdout=True)
      if _HELP_ARGS[arg]:
        print("\nTry --helpfull to get a list of all flags.")
      sys.exit(0)


def _run(body: Callable[[], None], errors: tuple[type[Exception], ...]) -> None:
  _exit_on_help(sys.argv)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sys.stdout.reconfigure(line_buffering=True)   # progress lines show up in logs at once
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
      body()
    except errors as e:
      raise SystemExit(f"error: {e}") from None

  app.run(main)


def train_main() -> None:
  """``jaxcert-train``: :func:`jaxcert.training.train` on ``--config`` into ``--workdir``."""
  _start(TRAIN_USAGE)
  cfg = _define_config_flag()
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.",
                                required=True)
  _show_in_help(cfg, workdir)
  _run(lambda: training.train(cfg.value, workdir.value),
       (ValueError, CheckpointError, FloatingPointError))


def certify_main() -> None:
  """``jaxcert-certify``: :func:`jaxcert.certification.certify` on ``--workdir``."""
  _start(CERTIFY_USAGE)
  cfg = _define_config_flag()
  workdir = flags.DEFINE_string("workdir", None, "Directory holding the checkpoints.",
                                required=True)
  _show_in_help(cfg, workdir)
  _run(lambda: certification.certify(cfg.value, workdir.value,
                                     output_dir=cfg.value.certify.output_dir),
       (ValueError, CheckpointError))


def reproduce_main() -> None:
  """``jaxcert-reproduce``: :func:`jaxcert.reproduce.run` over the requested cells."""
  _start(REPRODUCE_USAGE)
  holders = (
      flags.DEFINE_list("datasets", ["fashion_mnist"], f"subset of {grid.DATASETS}"),
      flags.DEFINE_list("archs", ["small"], f"subset of {grid.ARCHS}"),
      flags.DEFINE_list("methods", list(grid.METHODS), f"subset of {grid.METHODS}"),
      flags.DEFINE_list("eps", None, "certification radii, e.g. 0.1,0.2 or 2/255 "
                        "(default: the paper's two per dataset)"),
      flags.DEFINE_enum("budget", "paper", list(grid.BUDGETS),
                        "paper: the paper's schedules; cpu: a 10-epoch schedule"),
      flags.DEFINE_string("root", "runs/cbir", "where runs and tables go"),
      flags.DEFINE_list("stages", ["train", "certify", "tables"],
                        "any of train, certify, tables"),
  )
  _show_in_help(*holders)
  datasets, archs, methods, eps, budget, root, stages = holders

  def body():
    eps_values = None if eps.value is None else [grid.parse_eps(e) for e in eps.value]
    reproduce.run(datasets=datasets.value, archs=archs.value, methods=methods.value,
                  eps_values=eps_values, budget=budget.value, root=root.value,
                  stages=stages.value)

  _run(body, (ValueError, CheckpointError, FloatingPointError))
