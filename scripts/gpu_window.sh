#!/usr/bin/env bash
# One lease of a 2-GPU machine spread over several device calls (each call <= 10 minutes).
# Long work runs in background chains (setsid) that outlive a call; every call ends by packing
# what has finished into $OUT, so a machine lost between calls loses only unfinished runs.
#   bash scripts/gpu_window.sh start SECONDS   set up, start the chains, GPU-0 checks, wait, pack
#   bash scripts/gpu_window.sh wait SECONDS    wait, pack
#   bash scripts/gpu_window.sh finish SECONDS  wait, stop the chains (runs checkpoint), report, pack
# Chains:
#   GPU 1: issue 11's held-out Table 3 re-check with the Feistel sketch stream (exact, R = 32, 8;
#          5 seeds; 50,000 steps; 15 processes under MPS), then issue 12's learning-rate check.
#   GPU 0: basis-bench rows (GPT-2 small, fused head: exact, checkpointing, BASIS mlp+head and all
#          at R = 64; the head alone), then issue 12's main grid, seed-major, one run at a time.
# Everything runs from a private copy of the repository under $W (later calls re-send the working
# tree; the running chains must not see it change).
set -u
PHASE=${1:?start|wait|finish}; SECS=${2:-560}; T0=$(date +%s)
W=${W:-/tmp/w}; REPO=$W/repo
# SMOKE=1: a CPU dry run of the plumbing (tiny steps, the repository's own .py files as corpus).
RECHECK_STEPS=50000; GRID_CONFIG=configs/gpt2-small-code.yaml; GRID_EXTRA=""; BENCH_EXTRA=""
[ "${SMOKE:-0}" = 1 ] && { RECHECK_STEPS=40; GRID_CONFIG=tiny; GRID_EXTRA="--steps 4 --eval-every 2 --dataset files"; BENCH_EXTRA="--quick"; }
RECHECK="--ranks 32,8 --val-protocol heldout --seeds 5 --steps $RECHECK_STEPS --eval-every 1000 --checkpoint-every 10000"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
source "$(dirname "$0")/window_lib.sh"

pack() {
  mkdir -p "$OUT"
  tar czf "$OUT/recheck.tgz" --exclude=checkpoint.pt -C $W recheck 2>/dev/null
  tar czf "$OUT/scale.tgz" --exclude=checkpoint.pt -C $W scale 2>/dev/null
  tar czf "$OUT/bench.tgz" -C $W bench 2>/dev/null
  cp $W/*.log "$OUT/" 2>/dev/null
  ls "$OUT"
}
progress() {
  echo "--- $(( $(date +%s) - T0 ))s into this call"
  echo "recheck: $(ls $W/recheck/runs/*/summary.json 2>/dev/null | wc -l)/15 finished; lowest step logged:" \
       "$(tail -qn1 $W/recheck/runs/*/metrics.jsonl 2>/dev/null | grep -o '"step": [0-9]*' | sort -t: -k2 -n | head -1)"
  echo "scale: $(ls $W/scale/grid/runs/*/summary.json 2>/dev/null | wc -l) finished;" \
       "$(tail -qn1 $W/scale/grid/runs/*/metrics.jsonl 2>/dev/null | grep -o '"step": [0-9]*' | tr '\n' ' ')"
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
}

if [ "$PHASE" = start ]; then
  rm -rf $W && mkdir -p $W/bench $W/scale/grid/runs $W/mps $W/mpslog
  cp -r results/scale/grid/runs/* $W/scale/grid/runs/
  private_copy
  # MPS for GPU 1's 15 small processes only: the daemon sees every GPU (a client's
  # CUDA_VISIBLE_DEVICES is read relative to the daemon's), and only the re-check's processes
  # get its pipe directory, so nothing else goes through it.
  CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mpslog nvidia-cuda-mps-control -d && echo "MPS up"
  CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mpslog setsid python3 -m basis_train.cli.compare \
    $RECHECK --out $W/recheck --jobs 15 --gpus 1 --quiet > $W/recheck.log 2>&1 < /dev/null &
  echo $! > $W/recheck.pid
  # issue 12's learning-rate check takes GPU 1 once the re-check is done
  start_chain lrcheck "while kill -0 $(cat $W/recheck.pid) 2>/dev/null; do sleep 10; done" \
    "python3 -m basis_train.cli.compare --config $GRID_CONFIG --data-files \"\$DATA\" $GRID_EXTRA \
--ranks 256 --variants lr0.5x,lr2x --seeds 1 --no-baselines --out $W/scale/grid --jobs 1 --gpus 1 --quiet"
  # Tokenize the grid's corpus once (all cores) while GPU 1 starts.
  python3 -c "
from basis_train.data.corpus import load_tokens
c = load_tokens(None, '$SITE/**/*.py', 50000); print(c.source, c.stats)" 2>&1 | tail -2
  # GPU 0: the bench rows that failed last session (the graphed fused-head capture), then the grid.
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -x tests/test_gpu.py -k "bench" 2>&1 | tail -5
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m basis_train.cli.bench --sizes gpt2-small \
    --variants exact,exact+ckpt,mlp+head,all --ranks 64 --heads fused --steps 10 --warmup 3 --no-layer \
    --head-bench $BENCH_EXTRA --out $W/bench > $W/bench.log 2>&1; echo "bench rc=$?"; tail -12 $W/bench.log
  start_chain grid "python3 -m basis_train.cli.compare --config $GRID_CONFIG --data-files \"\$DATA\" \
$GRID_EXTRA --ranks 64,256,1024 --variants ckpt@exact,all@256 --seeds 3 --out $W/scale/grid --jobs 1 --gpus 0 --quiet"
fi

cd $REPO 2>/dev/null || { echo "no $REPO: the machine is fresh, run 'start' first"; exit 2; }
source $W/env.sh
END=$((T0 + SECS))
MARGIN=30; [ "$PHASE" = finish ] && MARGIN=80  # finish still stops, reports and packs
while [ "$(date +%s)" -lt $((END - MARGIN)) ]; do progress; sleep $(( ${SMOKE:-0} == 1 ? 5 : 50 )); done
if [ "$PHASE" = finish ]; then
  # Each chain is its own process group (setsid): TERM reaches the runs, which checkpoint and stop.
  for f in recheck lrcheck grid; do kill -TERM -- -"$(cat $W/$f.pid)" 2>/dev/null; done; sleep 15
  CUDA_MPS_PIPE_DIRECTORY=$W/mps bash -c 'echo quit | nvidia-cuda-mps-control'
  python3 -m basis_train.cli.compare $RECHECK --out $W/recheck --report-only >> $W/recheck.log 2>&1
  python3 -m basis_train.reporting.scale $W/scale/grid --results $W/scale \
    --command "see scripts/gpu_window.sh" >> $W/grid.log 2>&1
fi
progress
pack
