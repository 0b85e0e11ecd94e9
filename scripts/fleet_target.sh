#!/usr/bin/env bash
# Issue 13's target on one GPU: both Table 3 protocols (60 runs x 50,000 steps) by `basis-reproduce`
# (fleets by default on CUDA), timed end to end, after the fleet GPU tests and a 1,000-step smoke.
# Writes $OUT/fleet.json ({"runs", "steps", "wall_s", "gpu", "command"}) and $OUT/fleet_grid.tgz
# (the run directories and reports, without checkpoints). Usage on the device:
#   FULL_TIMEOUT=400 bash scripts/fleet_target.sh
# One device call may not hold both protocols: PROTOCOLS=heldout (then PROTOCOLS=paper with TESTS=0
# SMOKE=0, while the machine is still warm) trains them in two calls on the same grid, and each
# call's fleet.json gives its own basis-reproduce command and wall time.
set -u
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fleet_out}; GRID=/tmp/fleet_grid; mkdir -p "$OUT"; PROTOCOLS=${PROTOCOLS:-heldout,paper}
[ "${FRESH:-1}" = 1 ] && rm -rf $GRID
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
if [ "${TESTS:-1}" = 1 ]; then
SECONDS=0
timeout ${TEST_TIMEOUT:-100} python -m pytest -q tests/fleet/ tests/training/test_step_dispatch.py \
  -k "cuda or gpu or three or kernel or compiled" 2>&1 | tail -4
echo "tests: ${SECONDS}s"
fi
if [ "${SMOKE:-1}" = 1 ]; then
SECONDS=0
timeout ${SMOKE_TIMEOUT:-60} python -m basis_train.cli.reproduce --protocols heldout --steps 1000 \
  --out /tmp/fleet_smoke --quiet > /tmp/fleet_smoke.log 2>&1
python - <<'PY'
import glob, json
s = [json.load(open(p)) for p in sorted(glob.glob("/tmp/fleet_smoke/heldout/runs/*/summary.json"))]
if s:
    print(f"smoke: {len(s)} summaries, fleet_size {s[0].get('fleet_size')}, {s[0]['ms_per_step']:.2f} ms per fleet step "
          f"(incl. evaluation), cuda_graphs {s[0]['cuda_graphs']}")
PY
tail -3 /tmp/fleet_smoke.log
fi
CMD="python -m basis_train.cli.reproduce --protocols $PROTOCOLS --out $GRID --quiet"
SECONDS=0
timeout ${FULL_TIMEOUT:-400} $CMD > $OUT/fleet_full.log 2>&1
rc=$?; WALL=$SECONDS
echo "full rc=$rc wall ${WALL}s"; tail -5 $OUT/fleet_full.log
python - "$GRID" "$WALL" "$CMD" "$GPU" "$rc" > $OUT/fleet.json <<'PY'
import glob, json, sys
grid, wall, cmd, gpu, rc = sys.argv[1:]
done = [json.load(open(p)) for p in glob.glob(f"{grid}/*/runs/*/summary.json")]  # this call's and earlier calls' runs
print(json.dumps({"runs": len(done), "steps": max((s["steps"] for s in done), default=0), "wall_s": int(wall),
                  "gpu": gpu, "command": cmd.replace(grid, "GRID"), "exit_code": int(rc),
                  "fleet_sizes": sorted({s.get("fleet_size") for s in done if s.get("fleet_size")}),
                  "ms_per_fleet_step": sorted({round(s["ms_per_step"], 3) for s in done})}, indent=1))
PY
cat $OUT/fleet.json
tar czf $OUT/fleet_grid.tgz --exclude=checkpoint.pt -C /tmp fleet_grid
