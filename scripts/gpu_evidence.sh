#!/usr/bin/env bash
# One device call on a 2-GPU machine (nvidia-h200-x2) that gathers what CPUs cannot show:
#   GPU 1, in the background: the ablation runs still missing (scripts/reproduce_gpu.sh, WHAT=ablations)
#   GPU 0: the CUDA tests, the BasisLinear profile (bf16 and fp32), the CUDA-graphed paper-size step,
#          basis-bench (GPU 1 is busy with training meanwhile; the GPUs do not share work)
#   both GPUs, once the above are done: the DDP scaling benchmark (scripts/ddp_bench.py).
# Usage on the device: BUDGET=560 bash scripts/gpu_evidence.sh  -> $OUT/evidence.tgz, $OUT/evidence.log
set -u
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
START=$(date +%s); BUDGET=${BUDGET:-560}; W=/tmp/evidence; mkdir -p $W
t() { echo "[$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( START + BUDGET - $(date +%s) - ${1:-0} )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

(GPUS=1 PER_GPU=3 MPS=0 WHAT=ablations BUDGET=${ABL_BUDGET:-300} bash scripts/reproduce_gpu.sh > $W/ablations.log 2>&1;
 cp $OUT/runs.tgz $W/ablation_runs.tgz 2>/dev/null) &
ABL=$!

CUDA_VISIBLE_DEVICES=0 timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  tests/test_sketch.py -k "cuda or compiled or graph" > $W/gpu_tests.log 2>&1
t "GPU tests rc=$?: $(tail -1 $W/gpu_tests.log)"
for d in bf16 fp32; do
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 scripts/profile_layer.py --dtype $d --out $W/profile_$d > $W/profile_$d.log 2>&1
  t "profile $d rc=$?"
done
for m in exact basis; do
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 scripts/fleet_debug.py 1 $m >> $W/paper_step.log 2>&1
done
t "paper-size graphed step: $(tr '\n' ';' < $W/paper_step.log)"
[ "${SKIP_BENCH:-0}" = 1 ] || {
  BT=$(( ${BENCH_UNTIL:-260} - $(date +%s) + START )); [ $BT -lt 5 ] && BT=5
  CUDA_VISIBLE_DEVICES=0 timeout $BT python3 -m basis_train.experiments.bench \
    --sizes paper,gpt2-small --steps 10 --warmup 3 --out $W/bench --memory-table $W/bench/memory.md > $W/bench.log 2>&1
  t "bench rc=$?"; tail -4 $W/bench.log; }
wait $ABL; t "ablations: $(grep -E 'of 45|runs to do' $W/ablations.log | tr '\n' ';')"

timeout $(left 20) python3 scripts/ddp_bench.py --out $W/ddp --budget-s $(left 60) > $W/ddp.log 2>&1
t "DDP bench rc=$?"; grep -E "tokens/s|FAILED|skipping" $W/ddp.log
rm -f $OUT/runs.tgz
tar czf $OUT/evidence.tgz -C $W .
t "packed"
