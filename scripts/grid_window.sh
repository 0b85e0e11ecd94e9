#!/usr/bin/env bash
# Issue 12's remaining GPT-2-small runs on a 2-GPU machine, over several device calls (<= 10 min each).
#   bash scripts/grid_window.sh start SECONDS   set up, start the grid in the background, GPU probes, wait, pack
#   bash scripts/grid_window.sh wait SECONDS    wait, pack
#   bash scripts/grid_window.sh finish SECONDS  wait for the grid (or stop it: runs checkpoint), report, pack;
#                                               then AFTER (a shell command) on the idle GPUs, writing to $W/after
# The grid is the committed one (same command as results/scale/corpus.md) over both GPUs with two runs
# per GPU under MPS (--jobs 4 --gpus 0,1): finished runs (copied from results/scale/grid) are skipped.
# Runs that share a GPU record runs_per_gpu = 2 in summary.json, and the scale report leaves their
# speed out (their losses and memory are unaffected). While the corpus tokenizes, GPU 1 runs the
# probes named in PROBES (a shell command; default: the fleet GPU tests and a short fleet timing).
# Everything runs from a private copy under $W, so later calls may re-send a changed working tree.
set -u
PHASE=${1:?start|wait|finish}; SECS=${2:-560}; T0=$(date +%s)
W=${W:-/tmp/w}; REPO=$W/repo
GRID="--config configs/gpt2-small-code.yaml --ranks 64,256,1024 --variants ckpt@exact,all@256,${EXTRA_VARIANTS:-cce@exact} --seeds 3"
[ "${SMOKE:-0}" = 1 ] && GRID="--config tiny --ranks 64,256,1024 --variants ckpt@exact,all@256 --seeds 3 --steps 4 --eval-every 2 --dataset files"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/window_lib.sh"

pack() {
  mkdir -p "$OUT"
  tar czf "$OUT/scale.tgz" --exclude=checkpoint.pt -C $W scale 2>/dev/null
  cp $W/*.log $W/after/*.json "$OUT/" 2>/dev/null
  ls "$OUT"
}
progress() {
  echo "--- $(( $(date +%s) - T0 ))s into this call; finished $(ls $W/scale/grid/runs/*/summary.json 2>/dev/null | wc -l)/22;" \
       "steps logged: $(tail -qn1 $W/scale/grid/runs/*/metrics.jsonl 2>/dev/null | grep -o '"step": [0-9]*' | cut -d' ' -f2 | tr '\n' ' ')"
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
}

if [ "$PHASE" = start ]; then
  rm -rf $W && mkdir -p $W/scale/grid/runs $W/mps $W/mpslog
  [ "${SMOKE:-0}" = 1 ] || for d in results/scale/grid/runs/*/; do  # finished runs only: the others start over
    [ -f "$d/summary.json" ] && cp -r "$d" $W/scale/grid/runs/
  done
  private_copy
  # MPS: the daemon sees both GPUs; only the grid's processes get its pipe directory.
  if [ "${SMOKE:-0}" != 1 ]; then
    CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mpslog nvidia-cuda-mps-control -d && echo "MPS up"
  fi
  start_chain grid "export CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mpslog" \
    "python3 -m basis_train.cli.compare $GRID --data-files \"\$DATA\" --out $W/scale/grid \
--jobs ${JOBS:-4} --gpus 0,1 --quiet"
  # Probes on GPU 1 while the corpus tokenizes (they may overlap the first grid runs: timing is indicative).
  PROBES=${PROBES-"TESTS=1 STEPS=1000 timeout 200 bash scripts/fleet_gpu.sh"}
  if [ -n "$PROBES" ]; then
    CUDA_VISIBLE_DEVICES=1 OUT=$W/probe bash -c "$PROBES" > $W/probe.log 2>&1
    echo "probes rc=$?"; tail -30 $W/probe.log
  fi
fi

cd $REPO 2>/dev/null || { echo "no $REPO: the machine is fresh, run 'start' first"; exit 2; }
source $W/env.sh
END=$((T0 + SECS))
MARGIN=25; [ "$PHASE" = finish ] && MARGIN=60
running() { pgrep -g "$(cat $W/grid.pid)" > /dev/null 2>&1; }
while [ "$(date +%s)" -lt $((END - MARGIN)) ] && running; do progress; sleep $(( ${SMOKE:-0} == 1 ? 5 : 30 )); done
if [ "$PHASE" = finish ]; then
  # The chain is its own process group (setsid): TERM reaches the runs, which checkpoint and stop.
  running && { kill -TERM -- -"$(cat $W/grid.pid)"; sleep 15; }
  CUDA_MPS_PIPE_DIRECTORY=$W/mps bash -c 'echo quit | nvidia-cuda-mps-control' 2>/dev/null
  python3 -m basis_train.reporting.scale $W/scale/grid --results $W/scale \
    --command "see scripts/grid_window.sh" >> $W/grid.log 2>&1
  if [ -n "${AFTER:-}" ]; then
    mkdir -p $W/after; OUT=$W/after bash -c "$AFTER" > $W/after.log 2>&1; echo "after rc=$?"; tail -5 $W/after.log
  fi
fi
progress
pack
