#!/usr/bin/env bash
# One lent GPU session's worth of database labels, ready to run: by default databases/nb201_30ep,
# the 30-epoch rebuild (docs/labels.md, "The 30-epoch database").
#
# Here, on the CPU, first:
#   python benchmarks/gpu_pack.py --budget-mb 40        # .gpu/: only tasks that still lack records
#   PYTHONPATH=src python benchmarks/gpu_labels.py --smoke --device cpu --out /tmp/smoke   # the script works
# The tracked tree and .gpu must fit what the device tool carries: if they do not, untrack
# databases/ for the run (git rm -r --cached databases; /databases/ in .git/info/exclude)
# and restore it after (git reset -q databases; drop the exclude line).
# On the device machine (device tool, carry [".gpu"], timeout_s 600):
#   bash benchmarks/device_labels.sh
# Back here, with the run's files: stop any CPU builders of the database and merge (an import
# writes its own shard file, which a running split refuses), import, then start the builders
# again (they skip what the GPU labelled; the pack began at the first tasks they had left):
#   pkill -TERM -f "metad2a db build databases/nb201_30ep"; metad2a db merge databases/nb201_30ep
#   python benchmarks/gpu_import.py databases/nb201_30ep FILES_AT
#
# A retest instead (e.g. the float32 CPU tasks relabelled in bfloat16 here, docs/labels.md):
#   rm -rf .gpu; python benchmarks/gpu_pack.py --tasks t00084 t00090 t00085 t00088 t00083 t00086 t00087 t00081
# then the same device command; back here the labels join a retest run, not the database:
#   python benchmarks/label_retest.py --db databases/nb201_30ep --import-labels FILES_AT \
#       --out docs/label_precision_30ep_float32_tasks.json
#
# The speed phase (at most a quarter of the deadline; 10 cells, the size of a task) times
# the ensemble and the cells-apart variants and labels with the fastest that agrees with
# the eager ensemble; the epochs are the database's own (the pack's schedule.json), so the
# records can be imported: without --epochs the script calibrates a budget on CIFAR-10 cells, and records
# at another budget are refused.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?the device tool sets OUT}"
EPOCHS=$(python3 -c "import json; print(json.load(open('.gpu/schedule.json'))['epochs'])")
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
PYTHONPATH=src python3 benchmarks/gpu_labels.py --pack .gpu --out "$OUT" \
    --deadline "${DEADLINE:-480}" --epochs "$EPOCHS" --speed-cells 10 --no-old-proxy ${LABELS_ARGS:-}
