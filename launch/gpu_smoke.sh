#!/usr/bin/env bash
# A few minutes on a GPU machine that has JAX (jax[cuda12]), flax, optax, orbax, tensorboard, scikit-learn and
# pillow but not TensorFlow, TFDS, clu or ml-collections, and no network (issue 24): the benchmark of the MPL step
# and the input layer (host batches + the views made on the GPU), then one digits training run (MPL then
# finetuning, the digits config's 400 + 40 steps), printing steps/s and the test accuracy.
#
# What the machine lacks is carried in WHEELS: ml-collections (pure Python; the only missing package the program
# needs without TFDS data). Fetch it once on a machine with network, into the repository:
#   pip download ml-collections==1.1.0 --no-deps -d wheels/
#
# Usage (from the repository root):
#   launch/gpu_smoke.sh
# Variables:
#   PYTHON  (default python3)            the interpreter with jax[cuda12] installed
#   WHEELS  (default wheels)             directory holding ml_collections-*.whl (used only if it is not installed)
#   OUT     (default /tmp/mpl_gpu_smoke) the run directory and the unpacked wheel
set -euo pipefail

PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-wheels}"
OUT="${OUT:-/tmp/mpl_gpu_smoke}"
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/ml_collections-*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "ml_collections is not installed and $WHEELS/ has no ml_collections-*.whl;" \
         "run: pip download ml-collections==1.1.0 --no-deps -d $WHEELS/" >&2
    exit 2
  fi
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$OUT/site" "${wheels[0]}"
  export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import importlib.util
import jax
print('devices:', jax.devices())
print('not installed (as expected):', [m for m in ('tensorflow', 'tensorflow_datasets', 'clu')
                                       if importlib.util.find_spec(m) is None])
PY

echo '== benchmark: the MPL step and the input layer (digits, views on the device) =='
"$PYTHON" -m meta_pseudo_labels.benchmark --config=configs/digits.py --feedback_modes=hard_taylor \
  --torch_reference=false --repeats=20 --warmup=3 --pipeline_batches=50 --pipeline_data=config

echo '== a digits training run: MPL, then finetuning; steps/s in the log =='
rm -rf "$OUT/digits"
"$PYTHON" -m meta_pseudo_labels.main --config=configs/digits.py --config.experiment=train \
  --workdir="$OUT/digits" 2>&1 | grep -E 'steps/s|Error|error' || true

"$PYTHON" - "$OUT/digits/results.json" <<'PY'
import json
import sys
with open(sys.argv[1]) as f:
  results = json.load(f)
print('wall time: %.1f s' % results['wall_time_s'])
for split in ('validation', 'test'):
  for model, metrics in sorted(results['final'].get(split, {}).items()):
    print(f'{split:10s} {model:18s} top-1 {100 * metrics["top1"]:.2f}%')
PY
