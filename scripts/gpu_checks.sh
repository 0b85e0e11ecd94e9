#!/usr/bin/env bash
# The short GPU half of issues 11 and 16 on one H200, under a time budget (default 420 s):
# the kernel and Cut Cross-Entropy GPU tests, the v1/v2 sketch-kernel A/B, issue 11's targets
# (layer, GPT-2-small step, paper step), and the GPT-2-small exact step and head rows with the
# head basis-train runs on CUDA. A step is skipped, with a line saying so, when the budget left
# is below its limit; ONLY="name ..." runs only the steps named. Usage on the device, repository root
# (carry .whl): bash scripts/gpu_checks.sh
# -> $OUT/gpu_checks.tgz
set -u
START=$(date +%s); BUDGET=${BUDGET:-420}; DEST=${OUT:-out}; OUT=/tmp/gpu_checks; mkdir -p "$OUT/bk" "$DEST"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
cp results/bench/targets.json "$OUT/bk/" 2>/dev/null

step() {  # step NAME LIMIT_S COMMAND...: run with a timeout if the budget allows it (and ONLY names it)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((START + BUDGET - $(date +%s)))
  if [ $left -lt $limit ]; then echo "SKIPPED $name: ${left}s left, needs ${limit}s"; return; fi
  local t=$(date +%s)
  timeout $limit "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc ($(( $(date +%s) - t ))s): $(tail -1 "$OUT/$name.log")"
}
step tests 110 python3 -m pytest -q -p no:cacheprovider -rs tests/core/test_sketch_kernels.py \
  tests/core/test_head_cce_gpu.py tests/core/test_head_cce.py
# In order of what the issues need most; what does not fit in the budget is skipped.
# The fused head's vocabulary padding (on by default on CUDA) against none, head alone, one process each.
step head_pad 40 python3 -m basis_train.cli.bench --sizes paper --variants exact --heads fused \
  --steps 10 --warmup 3 --no-layer --head-bench --out "$OUT/head_pad"
step head_nopad 40 env BASIS_HEAD_PAD=1 python3 -m basis_train.cli.bench --sizes paper --variants exact \
  --heads fused --steps 10 --warmup 3 --no-layer --head-bench --out "$OUT/head_nopad"
step targets_gpt2 80 python3 -m basis_train.experiments.bench_kernels "$OUT/bk" gpt2
step fleet 100 env OUT=/tmp/fleet STEPS=${FLEET_STEPS:-500} bash scripts/fleet_gpu.sh
step cce_tests 40 python3 -m pytest -q -p no:cacheprovider -rs tests/core/test_head_cce_gpu.py tests/core/test_head.py
step bench_gpt2 100 python3 -m basis_train.cli.bench --sizes gpt2-small --variants exact \
  --heads fused,plain --steps 10 --warmup 3 --no-layer --head-bench --out "$OUT/bench"
step targets_layer 60 python3 -m basis_train.experiments.bench_kernels "$OUT/bk" layer
step targets_paper 40 python3 -m basis_train.experiments.bench_kernels "$OUT/bk" paper
step gpu_tests 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
grep -h -E "^(MET|MISS)" "$OUT"/targets_*.log
grep -h -E "passed|failed" "$OUT"/*tests.log | tail -4
tar czf "$DEST/gpu_checks.tgz" -C /tmp gpu_checks  # one file back (the device returns at most 8)
echo "total $(( $(date +%s) - START ))s"
