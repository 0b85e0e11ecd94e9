#!/usr/bin/env bash
# The GPU half of issue 14's tests and the re-measured graphed step, on one H200 (~5 min).
# Usage on the device, from the repository root: bash scripts/hardening_gpu.sh  -> $OUT/*.log, $OUT/bench/
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1
OUT=${OUT:-out/hardening}; mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# CUDA graphs (replay k = eager step k, generator continuity), resume with graphs, graphed run vs CPU,
# float16, bench's graphed step.
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?: $(tail -1 "$OUT/gpu_tests.log")"
# The paper-size graphed step figure (docs/history.md), now from basis-bench.
timeout 150 python3 -m basis_train.cli.bench --sizes paper --ranks 32 --variants exact,mlp+head \
  --steps 200 --warmup 20 --no-layer --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -A6 "CUDA-graph replay" "$OUT/bench/bench.md"
