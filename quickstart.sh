#!/usr/bin/env bash
# Set-up + the main job: trains the quickstart model (Small CNN, TBT, Fashion-MNIST)
# and certifies it, printing the Recall@K / CR-Recall@K table.
#   ./quickstart.sh [extra --config.x=y overrides]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
# Offline Fashion-MNIST (the original IDX files) from Debian/Ubuntu, if missing.
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "note: could not install dataset-fashion-mnist; tfds will try to download instead"
fi
WORKDIR=${WORKDIR:-runs/quickstart}
python train.py --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
python certify.py --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
