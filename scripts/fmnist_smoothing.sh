#!/usr/bin/env bash
# The Fashion-MNIST smoothing results of docs/RESULTS.md (CPU budget):
# DML and GDML (sigma 0.1, 0.25, 0.5), Small CNN, 6,000 steps; each certified with
# n = 10,000 samples for 300 queries against a fixed 1,000-image gallery.
#   scripts/fmnist_smoothing.sh [ROOT] [train|certify|all]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/smoothing}
STAGE=${2:-all}
CERT=(--config.data.num_queries=300 --config.smoothing.num_samples=10000)
if [ "$STAGE" != certify ]; then
  python train.py --config=configs/smoothing.py:dml --workdir="$ROOT/dml"
  for s in 0.1 0.25 0.5; do
    python train.py --config=configs/smoothing.py:gdml,$s --workdir="$ROOT/gdml_$s"
  done
fi
if [ "$STAGE" != train ]; then
  for s in 0.1 0.25 0.5; do
    python certify.py --config=configs/smoothing.py:gdml,$s --workdir="$ROOT/gdml_$s" \
      --config.certify.output_dir="$ROOT/gdml_$s/certify_sigma$s" "${CERT[@]}"
    python certify.py --config=configs/smoothing.py:dml,$s --workdir="$ROOT/dml" \
      --config.certify.output_dir="$ROOT/dml/certify_sigma$s" "${CERT[@]}"
  done
  python scripts/smoothing_summary.py "$ROOT"     # summary.md + summary.png
fi
