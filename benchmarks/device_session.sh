#!/usr/bin/env bash
# A lent GPU session's one run: databases/nb201_30ep labels (device_labels.sh) and the
# held-out panel at fit's defaults, 30 epochs and no augmentation (device_heldout.sh), side by side on the one GPU.
# Each alone leaves the GPU mostly idle (docs/labels.md, "Speed"), so together they should
# cost little of each other's speed; the speed phase's timings are then not clean ones.
#
# Here, on the CPU, first (the tracked tree is over the 64 MiB a run carries while it holds
# databases/: untrack it for the run, as device_labels.sh says):
#   python benchmarks/gpu_pack.py --budget-mb 40        # .gpu/
#   python benchmarks/gpu_heldout.py pack               # .gpu-heldout/
#   OUT=/tmp/session DEADLINE=60 LABELS_ARGS="--smoke --device cpu --epochs 1" \
#     HELDOUT_ARGS="--smoke --device cpu" bash benchmarks/device_session.sh   # the script works
# On the device machine (device tool, carry [".gpu", ".gpu-heldout"], timeout_s 600):
#   bash benchmarks/device_session.sh
# Back here: the imports of device_labels.sh (FILES_AT/labels) and device_heldout.sh
# (FILES_AT/heldout, `gpu_heldout.py report ... --epochs 30 --augment none`).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?the device tool sets OUT}"
ALL=$OUT
mkdir -p "$ALL/labels" "$ALL/heldout"
OUT=$ALL/labels bash benchmarks/device_labels.sh > "$ALL/labels.log" 2>&1 &
labels=$!
OUT=$ALL/heldout HELDOUT_ARGS="${HELDOUT_ARGS:---epochs 30 --rates 0.1 --augment none}" bash benchmarks/device_heldout.sh > "$ALL/heldout.log" 2>&1 &
heldout=$!
wait "$labels"; rl=$?
wait "$heldout"; rh=$?
tail -n 5 "$ALL/labels.log" "$ALL/heldout.log"
echo "labels exit $rl, held-out exit $rh"
exit $(( rl || rh ))
