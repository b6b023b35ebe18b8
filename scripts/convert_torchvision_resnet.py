"""Converts a torchvision ResNet ``state_dict`` (.pth) to the .npz that
``jaxcert.resnet.load_pretrained`` reads.

  python scripts/convert_torchvision_resnet.py resnet50.pth resnet50.npz

Get the .pth on a machine with torchvision (this script needs torch and numpy,
not jax)::

  import torch, torchvision
  sd = torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict()
  torch.save(sd, "resnet50.pth")

Every tensor is written under its ``state_dict`` name, unchanged (conv weights
stay OIHW; ``load_pretrained`` converts them), except ``*.num_batches_tracked``,
which is skipped. Also accepted: a checkpoint dict with a ``"state_dict"`` entry
and ``module.``-prefixed names (DataParallel).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping

import numpy as np


def state_dict_to_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torch tensors (or arrays) by name -> numpy arrays, ``num_batches_tracked``
  dropped and a leading ``module.`` stripped."""
  arrays = {}
  for name, tensor in state_dict.items():
    if name.endswith("num_batches_tracked"):
      continue
    if name.startswith("module."):
      name = name[len("module."):]
    if hasattr(tensor, "detach"):
      tensor = tensor.detach().cpu().numpy()
    arrays[name] = np.asarray(tensor)
  return arrays


def load_state_dict(path: str) -> Mapping[str, Any]:
  """Reads a .pth with torch (CPU, ``weights_only``); returns its state dict."""
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit(
        "convert_torchvision_resnet.py needs PyTorch to read .pth files, and "
        "`import torch` failed. Install it (pip install torch) or run this script "
        "on the machine where the weights were saved.") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise SystemExit(f"{path!r} does not hold a state dict (got {type(obj).__name__}); "
                     f"save model.state_dict(), not the model")
  return obj


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
      description="Converts a torchvision ResNet state dict (.pth) to the .npz that "
                  "jaxcert.resnet.load_pretrained reads.")
  p.add_argument("pth", help="torchvision ResNet state dict saved with torch.save")
  p.add_argument("npz", help="output .npz (written under exactly this name)")
  args = p.parse_args(argv)
  if not os.path.isfile(args.pth):
    raise SystemExit(f"input file not found: pth={args.pth!r}")
  arrays = state_dict_to_arrays(load_state_dict(args.pth))
  if not arrays:
    raise SystemExit(f"{args.pth!r} holds no tensors")
  with open(args.npz, "wb") as f:
    np.savez(f, **arrays)
  n = sum(a.size for a in arrays.values())
  print(f"wrote {len(arrays)} arrays ({n:,} values) to {args.npz}", file=sys.stderr)


if __name__ == "__main__":
  main()
