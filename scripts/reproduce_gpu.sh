#!/usr/bin/env bash
# The paper's Table 3 (both validation protocols) and the estimator ablations on all GPUs of one
# machine: basis-compare runs PER_GPU basis-train processes per GPU (default 16), sharing each GPU
# through MPS. Usage on the device:
#   BUDGET=570 bash scripts/reproduce_gpu.sh        (results land in $OUT/runs.tgz)
# WHAT=paper runs the Table 3 grids only (results/paper/{heldout,paper}), WHAT=ablations only the
# ablations (results/ablations: lam0, no-scalars, uniform, gaussian at R = 32 and 8, lr-matched
# exact; held-out protocol), WHAT=all (default) both, with the parallel slots split in proportion
# to the runs each grid still needs. The ablation grid runs without its baselines: exact and plain
# BASIS R = 32, 8 are the same configs as the Table 3 held-out grid and are copied from it.
# Runs already finished under results/ are skipped, so a later session continues. Unfinished runs
# are checkpointed (SIGTERM) at the deadline; their checkpoints stay on the machine only.
# GPUS=1,2 limits the runs to those devices; MPS=0 runs without the MPS daemon.
# SKIP_BENCH=0 runs the benchmark with the time left.
set -u
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
START=$(date +%s); BUDGET=${BUDGET:-570}; WHAT=${WHAT:-all}; PER_GPU=${PER_GPU:-16}
RES=${RES:-$PWD/results}
GPUS=${GPUS:-$(seq -s, 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}  # e.g. GPUS=1 keeps GPU 0 free
NGPU=$(echo $GPUS | tr , '\n' | wc -l); SLOTS=$((NGPU * PER_GPU))
COMMON="--seeds 5 --steps ${STEPS:-50000} --eval-every 1000 --checkpoint-every 10000"
ABL="--ranks 32,8 --variants lam0,no-scalars,uniform,gaussian,lr-matched --no-baselines --val-protocol heldout"
# name | out dir | grid flags | runs in the full grid | run directories that count (regex)
GRIDS=()
if [ "$WHAT" != ablations ]; then
  GRIDS+=("heldout|$RES/paper/heldout|--ranks 64,32,16,8,1 --val-protocol heldout|30|.")
  GRIDS+=("paper|$RES/paper/paper|--ranks 64,32,16,8,1 --val-protocol paper|30|.")
fi
[ "$WHAT" != paper ] && GRIDS+=("ablations|$RES/ablations|$ABL|45|/(exact_|basis_R[0-9]+_)[^/]*/summary")

finished() { ls "$1"/runs/*/summary.json 2>/dev/null | grep -cE "$2"; }
TOTAL=0
for g in "${GRIDS[@]}"; do IFS='|' read -r n d f size re <<<"$g"; TOTAL=$((TOTAL + size - $(finished $d "$re"))); done
echo "$NGPU GPUs, $SLOTS slots, $TOTAL runs to do"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# MPS=0: a few runs that do not need to share a GPU finely.
if [ "${MPS:-1}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog
  nvidia-cuda-mps-control -d && echo "MPS daemon started" || echo "MPS not started"
fi
for g in "${GRIDS[@]}"; do
  IFS='|' read -r n d f size re <<<"$g"; left=$((size - $(finished $d "$re")))
  [ $left -le 0 ] && continue
  jobs=$(( (SLOTS * left + TOTAL - 1) / TOTAL )); mkdir -p $d
  echo "$n: $left runs, $jobs in parallel"
  [ "${DRY:-0}" = 1 ] && { echo "  python3 -m basis_train.cli.compare $f $COMMON --out $d --jobs $jobs --gpus $GPUS"; continue; }
  setsid python3 -m basis_train.cli.compare $f $COMMON --out $d --jobs $jobs --gpus $GPUS >> $d/compare.log 2>&1 &
done
DEADLINE=$((START + BUDGET - 75))
while [ "$(date +%s)" -lt $DEADLINE ] && pgrep -f basis_train.cli.compare >/dev/null; do sleep 5; done
echo "training phase ended after $(( $(date +%s) - START ))s"
pkill -TERM -f basis_train.cli.compare; sleep 1; pkill -TERM -f basis_train.cli; sleep 8
[ "${MPS:-1}" = 1 ] && echo quit | nvidia-cuda-mps-control
if [ "$WHAT" != paper ]; then  # the ablations' baselines: the identical held-out Table 3 runs
  mkdir -p $RES/ablations/runs
  for r in $RES/paper/heldout/runs/{exact,basis_R32,basis_R8}-s*; do
    [ -f $r/summary.json ] && cp -r $r $RES/ablations/runs/ && rm -f $RES/ablations/runs/$(basename $r)/checkpoint.pt
  done
fi
for g in "${GRIDS[@]}"; do
  IFS='|' read -r n d f size re <<<"$g"
  python3 -m basis_train.cli.compare $f $COMMON --out $d --report-only >> $d/compare.log 2>&1
  echo "$n: $(finished $d "$re") of $size finished; $(grep -c '^done' $d/compare.log) done now, $(grep -c FAILED $d/compare.log) failed"
done
tar czf $OUT/runs.tgz --exclude=checkpoint.pt -C $RES $( [ "$WHAT" != ablations ] && echo paper ) \
  $( [ "$WHAT" != paper ] && echo ablations )
[ "${SKIP_BENCH:-1}" = 1 ] && exit 0
LEFT=$((START + BUDGET - $(date +%s) - 15))
echo "bench gets ${LEFT}s"
timeout $LEFT python3 -m basis_train.cli.bench --sizes paper,gpt2-small --steps 10 --warmup 3 --out $OUT/bench \
  --memory-table $OUT/bench/memory.md > $OUT/bench.log 2>&1
echo "bench rc=$? after $(( $(date +%s) - START ))s"; tail -3 $OUT/bench.log
