"""The configs bundled with jaxcert, by name: ``cbir``, ``quickstart``, ``smoothing``.

Each module defines ``get_config([ARG])`` returning a locked ``ml_collections.ConfigDict``
over the schema of :func:`jaxcert.config.base_config`:

- ``quickstart[:METHOD]``: Small CNN on Fashion-MNIST, TBT (or METHOD), minutes on a CPU;
- ``cbir:DATASET,ARCH,METHOD[,EPS][,BUDGET]``: the CBIR paper's grid (:mod:`jaxcert.grid`);
- ``smoothing[:METHOD[,SIGMA]]``: RetrievalGuard's DML / GDML with smoothing certificates.

The entry points take them as ``--config=NAME[:ARG]`` (``jaxcert-train
--config=cbir:fashion_mnist,small,tbt``) wherever jaxcert is installed; a checkout keeps
``configs/NAME.py`` files that load these modules, and ``configs/NAME.py[:ARG]`` also names
the bundled config where no such file exists. In Python::

  from jaxcert import configs
  cfg = configs.get_config("cbir:fashion_mnist,small,tbt")
  configs.path("cbir")   # the installed file, for tools that take a config path
"""

from __future__ import annotations

import importlib
import importlib.resources
import os

import ml_collections

BUNDLED = ("cbir", "quickstart", "smoothing")


def _check_name(name: str) -> str:
  if name not in BUNDLED:
    raise ValueError(f"config name {name!r} is not a bundled config; bundled: "
                     f"{', '.join(BUNDLED)} (NAME[:ARG], e.g. cbir:fashion_mnist,small,tbt)")
  return name


def path(name: str) -> str:
  """The file of bundled config ``name`` (an installed package keeps it as a plain file)."""
  return str(importlib.resources.files(__name__).joinpath(f"{_check_name(name)}.py"))


def bundled_name(file: str) -> str | None:
  """``NAME``, ``NAME.py`` or ``configs/NAME.py`` -> NAME when it is bundled, else None."""
  head, base = os.path.split(os.path.normpath(file))
  stem = base.removesuffix(".py")
  return stem if head in ("", "configs") and stem in BUNDLED else None


def resolve(spec: str) -> str:
  """A ``--config`` value ``FILE[:ARG]`` or ``NAME[:ARG]`` -> ``FILE[:ARG]`` to load.

  An existing FILE is kept as it is (a checkout's ``configs/cbir.py``, your own file);
  otherwise ``NAME``, ``NAME.py`` or ``configs/NAME.py`` is the bundled config NAME.
  Raises ValueError naming the value when it is neither.
  """
  if not isinstance(spec, str) or not spec.split(":", 1)[0]:
    raise ValueError(f"config {spec!r}: expected NAME[:ARG] with NAME one of "
                     f"{', '.join(BUNDLED)}, or FILE.py[:ARG]")
  file, sep, arg = spec.partition(":")
  if os.path.isfile(file):
    return spec
  name = bundled_name(file)
  if name is None:
    raise ValueError(f"config {spec!r}: {file!r} is neither a file nor a bundled config; "
                     f"use NAME[:ARG] with NAME one of {', '.join(BUNDLED)} (e.g. "
                     "cbir:fashion_mnist,small,tbt), or the path of a file defining "
                     "get_config()")
  return path(name) + sep + arg


def get_config(spec: str) -> ml_collections.ConfigDict:
  """Bundled config ``NAME[:ARG]``, e.g. ``"smoothing:gdml,0.5"`` (what ``--config`` loads)."""
  name, sep, arg = spec.partition(":")
  module = importlib.import_module(f"{__name__}.{_check_name(name)}")
  return module.get_config(arg) if sep else module.get_config()
