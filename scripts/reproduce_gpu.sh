#!/usr/bin/env bash
# The paper's Table 3 on one H200, both validation protocols (6 configurations x 5 seeds x
# 50,000 steps each): basis-compare runs 2 x 8 basis-train processes that share the GPU
# through MPS. What is unfinished at the deadline is checkpointed (SIGTERM) and reported as
# such. Then, with the time left, the benchmark and the memory table. Usage on the device:
#   BUDGET=480 bash scripts/reproduce_gpu.sh     (results land in $OUT/runs.tgz)
# Runs already finished under $R (default: the committed results/paper) are skipped, so a later
# session continues the grid. Set ABLATIONS=1 to run the estimator ablations instead
# (results/ablations: exact, lr-matched exact, R = 32 and 8 with lam0, no-scalars, uniform,
# gaussian; held-out protocol).
set -u
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
START=$(date +%s); BUDGET=${BUDGET:-480}; mkdir -p $OUT/bench
if [ "${ABLATIONS:-0}" = 1 ]; then
  R=${R:-$PWD/results/ablations}; PROTOCOLS="heldout"; GRID="--ranks 32,8 --variants lam0,no-scalars,uniform,gaussian,lr-matched"
else
  R=${R:-$PWD/results/paper}; PROTOCOLS="heldout paper"; GRID="--ranks 64,32,16,8,1"
fi
mkdir -p $R
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog
nvidia-cuda-mps-control -d && echo "MPS daemon started" || echo "MPS not started"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
JOBS=$((16 / $(echo $PROTOCOLS | wc -w)))
for p in $PROTOCOLS; do
  setsid python3 -m basis_train.compare $GRID --seeds 5 --steps 50000 --eval-every 1000 \
    --checkpoint-every 10000 --val-protocol $p --out $R/$p --jobs $JOBS > $R/compare_$p.log 2>&1 &
done
DEADLINE=$((START + BUDGET - 110))
while [ "$(date +%s)" -lt $DEADLINE ] && pgrep -f basis_train.compare >/dev/null; do sleep 5; done
echo "training phase ended after $(( $(date +%s) - START ))s"
pkill -TERM -f basis_train.compare; sleep 1; pkill -TERM -f basis_train.cli; sleep 8
for p in $PROTOCOLS; do
  python3 -m basis_train.compare $GRID --seeds 5 --steps 50000 --val-protocol $p --out $R/$p \
    --report-only >> $R/compare_$p.log 2>&1
  grep -cE "^done" $R/compare_$p.log; tail -2 $R/compare_$p.log
done
echo quit | nvidia-cuda-mps-control
tar czf $OUT/runs.tgz -C $R --exclude=checkpoint.pt .
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
LEFT=$((START + BUDGET - $(date +%s) - 15))
echo "bench gets ${LEFT}s"
timeout $LEFT python3 -m basis_train.bench --sizes paper,gpt2-small --steps 10 --warmup 3 --out $OUT/bench \
  --memory-table $OUT/bench/memory.md > $OUT/bench.log 2>&1
echo "bench rc=$? after $(( $(date +%s) - START ))s"; tail -3 $OUT/bench.log
