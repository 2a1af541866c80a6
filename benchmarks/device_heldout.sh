#!/usr/bin/env bash
# The held-out evaluation's fits on a lent GPU: every cell fitted on gtsrb and fashion_mnist
# at lr 0.025 and 0.1 (seed 0 first, then seeds 1 and 2 as time allows), to decide fit's
# default rate, and the label schedule's, on what users get.
#
# Here, on the CPU, first:
#   python benchmarks/gpu_heldout.py pack                # .gpu-heldout/: the subsamples and the cells
#   python benchmarks/gpu_heldout.py run --device cpu --smoke --out /tmp/smoke
# On the device machine (device tool, carry [".gpu-heldout"], timeout_s 600):
#   bash benchmarks/device_heldout.sh
# or, for the panel at fit's defaults, 30 epochs and no augmentation (docs/generalization.md,
# "With fit's default augmentation: none"; add --augment crop-flip for "At fit's default budget"):
#   HELDOUT_ARGS="--epochs 30 --rates 0.1 --augment none" bash benchmarks/device_heldout.sh
# (the tracked tree, about 43 MB, and .gpu-heldout, about 20 MB, fit the 64 MiB it carries)
# Back here, with the run's files:
#   python benchmarks/gpu_heldout.py report FILES_AT --report docs/heldout_gpu.json
#
# Each (seed, rate) pair is about 64 fits of 10 epochs on 1,600-1,720 images; records are
# appended after every group of cells, so a run cut short keeps what it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?the device tool sets OUT}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
PYTHONPATH=src python3 benchmarks/gpu_heldout.py run --pack .gpu-heldout --out "$OUT" --deadline "${DEADLINE:-480}" ${HELDOUT_ARGS:-}
