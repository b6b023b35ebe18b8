"""Argument checks shared by the public API.

Each check raises ``ValueError`` with a message that names the argument, the value
received and what is allowed. Checks run on concrete (host) values, before any
jitted work starts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def check_eps(eps, name: str = "eps") -> float:
  """eps: finite, >= 0 (pixel units, images in [0, 1])."""
  try:
    value = float(eps)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number >= 0 (pixel units in [0, 1]), "
                     f"got {name}={eps!r}") from e
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0 (pixel units in [0, 1]), "
                     f"got {name}={eps!r}")
  return value


def check_alpha(alpha, name: str = "alpha"):
  a = np.asarray(alpha)
  if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.all(a == np.round(a))):
    raise ValueError(f"{name} must be a non-negative integer, got {name}={alpha!r}")
  if np.any(a < 0):
    raise ValueError(f"{name} must be a non-negative integer (alpha >= 0), "
                     f"got {name}={alpha!r}")
  return alpha


def check_ks(ks: Sequence[int] | int, num_candidates: int, name: str = "k") -> tuple[int, ...]:
  """Each K must satisfy 1 <= K <= |C| (number of candidates)."""
  ks_t = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
  if not ks_t:
    raise ValueError(f"{name} must name at least one K, got {name}={ks!r}")
  for k in ks_t:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
      raise ValueError(f"{name} must hold integers, got {name}={ks!r}")
    if k < 1 or k > num_candidates:
      raise ValueError(
          f"{name}={k} is not allowed: K must satisfy 1 <= K <= |C| = {num_candidates} "
          f"(the number of candidates)")
  return tuple(int(k) for k in ks_t)


def check_gallery(num_candidates: int, name: str = "candidates") -> None:
  if num_candidates < 1:
    raise ValueError(f"{name} is empty: the gallery must hold at least one candidate "
                     f"(got {num_candidates})")


def check_images(x, name: str = "images", *, valid_min: float = 0.0,
                 valid_max: float = 1.0) -> None:
  """Pixels must be finite and inside [valid_min, valid_max]; shape [N, H, W, C]."""
  arr = np.asarray(x)
  if arr.ndim != 4:
    raise ValueError(f"{name} must have shape [N, H, W, C], got shape {arr.shape}")
  if arr.dtype.kind == "f":
    bad = ~np.isfinite(arr)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name} contains NaN or infinite pixels (first at index {idx}); "
                       f"pixels must be finite values in [{valid_min}, {valid_max}]")
  lo, hi = float(arr.min(initial=valid_min)), float(arr.max(initial=valid_max))
  if lo < valid_min or hi > valid_max:
    raise ValueError(f"{name} has pixels in [{lo}, {hi}]; pixels must lie in "
                     f"[{valid_min}, {valid_max}] (divide uint8 images by 255)")


def check_same_dim(a, b, name_a: str, name_b: str, axis: int = -1) -> None:
  sa, sb = np.shape(a), np.shape(b)
  if len(sa) == 0 or len(sb) == 0 or sa[axis] != sb[axis]:
    raise ValueError(f"{name_a} and {name_b} must agree on axis {axis}, "
                     f"got shapes {sa} and {sb}")


def check_shape(x, shape: tuple, name: str) -> None:
  """``shape`` entries of None match any size."""
  s = np.shape(x)
  if len(s) != len(shape) or any(e is not None and e != v for e, v in zip(shape, s, strict=True)):
    want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
    raise ValueError(f"{name} must have shape {want}, got shape {s}")
