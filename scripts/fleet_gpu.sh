#!/usr/bin/env bash
# Fleet mode on one GPU (issue 13): the CUDA tests of tests/fleet/test_fleet.py (graphed fleet =
# eager fleet = graphed single runs), then the 30-run held-out Table 3 grid (exact, R = 64, 32, 16,
# 8, 1; seeds 0-4) trained as one fleet by basis-reproduce --fleet, timed end to end (data load,
# memory probes, capture, training, evaluation, checkpoints and the report). Usage on the device:
#   bash scripts/fleet_gpu.sh               STEPS=2000 by default; the grid lands in $OUT/fleet-smoke
# TESTS=0 skips the tests.
set -u
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1
DIR=${OUT:-/tmp}/fleet-smoke; STEPS=${STEPS:-2000}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  SECONDS=0
  python -m pytest -q -x tests/fleet/test_fleet.py -k "cuda or three" || exit 1
  echo "tests: ${SECONDS}s"
fi
SECONDS=0
python -m basis_train.cli.reproduce --fleet --protocols heldout --steps "$STEPS" --out "$DIR" --quiet
rc=$?
echo "wall_s ${SECONDS} for 30 runs x $STEPS steps as one fleet (rc=$rc)"
python - "$DIR" <<'PY'
import glob, json, sys
runs = sorted(glob.glob(f"{sys.argv[1]}/heldout/runs/*/summary.json"))
s = json.load(open(runs[0]))
print(f"{len(runs)} summaries; fleet_size {s.get('fleet_size')}, fleet step {s['ms_per_step']:.2f} ms "
      f"(per member, shared), training wall {s['wall_s']:.1f}s, cuda_graphs {s['cuda_graphs']}, {s['gpu']}")
PY
sed -n 1,20p "$DIR/heldout/summary.md"
exit $rc
