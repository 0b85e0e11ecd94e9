#!/usr/bin/env bash
# Issue 16 on one H200 (nvidia-h200): the fused head's CUDA tests, basis-bench with the head
# benchmark (plain, ours, ours sketched, Liger, Cut Cross-Entropy) and the memory targets, and
# the graphed GPT-2-small exact step with the fused vs the plain head. ~8 minutes.
# Before: pip install the carried wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 (optional;
# without them their rows read "skipped"). Usage: bash scripts/head_gpu.sh  -> $OUT/head_gpu.tgz
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1
W=/tmp/head_gpu; mkdir -p $W  # only the archive goes to $OUT (the device returns at most 8 files)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $W/gpu.txt
pip list 2>/dev/null | grep -iE "liger|cut.cross|^torch |triton" | tee -a $W/gpu.txt

timeout 120 python3 -m pytest -q -p no:cacheprovider tests/core/test_head.py tests/core/test_memory.py \
  tests/test_gpu.py > $W/gpu_tests.log 2>&1; echo "GPU tests rc=$?: $(tail -1 $W/gpu_tests.log)"

# Memory and time at both sizes, both heads, R = 1..64, plus the head alone; writes
# memory_targets.json (the paper-size equivalence target is read from head_equivalence/).
mkdir -p $W/bench && cp -r results/bench/head_equivalence $W/bench/ 2>/dev/null
timeout 330 python3 -m basis_train.cli.bench --sizes paper,gpt2-small --ranks 1,8,16,32,64 \
  --steps 10 --warmup 3 --out $W/bench --memory-table $W/bench/memory.md > $W/bench.log 2>&1
echo "bench rc=$?"; tail -8 $W/bench.log

# The training step as basis-train runs it (CUDA graphs): ms/step of the second 50-step interval.
for h in plain fused; do
  timeout 90 python3 -m basis_train.cli --config configs/gpt2-small.yaml --method exact --head $h --steps 100 --eval-every 50 \
    --checkpoint-every 1000 --quiet --out $W/step_$h > $W/step_$h.log 2>&1
  echo "exact $h head: rc=$? $(tail -1 $W/step_$h/metrics.jsonl 2>/dev/null | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(r["ms_per_step"], "ms/step")' 2>&1)"
  rm -f $W/step_$h/checkpoint.pt
done
tar czf ${OUT:-/tmp}/head_gpu.tgz -C $W .
