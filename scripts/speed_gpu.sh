#!/usr/bin/env bash
# GPT-2-small speed on the device (issue 22's targets), the CUDA tests first; the corpus of the
# GPT-2-small grid is tokenized meanwhile on the CPU cores, so that scripts/scale_grid.sh can follow
# in the same call. Carry .whl and .ext (nanoGPT's model.py, never committed):
#   bash scripts/speed_gpu.sh            -> $OUT/tests.log, $OUT/speed_gpt2.json, $OUT/speed.log
# ROWS=0,1,... picks speed_gpt2.py's rows (default: nanoGPT compiled; ours graphed: exact with the fused
# head, with the plain one, which keeps its logits, and with the forward-grad
# head, which makes dX and dW in forward instead; BASIS R = 256 mlp+head with the fused and the
# forward-grad head. Rows 1 and 8 add nanoGPT's drop-in and BASIS all linears). PROFILE=1 adds each
# row's profiler table to $OUT/profile.txt (graphed rows list their kernels; the others their ops and
# host time too: e.g. ROWS=0,1,10,12,14). HEAD=1 then times the head alone (basis-bench's head rows:
# ours with and without forward-grad, Liger, Cut Cross-Entropy) into $OUT/head/; the two libraries'
# wheels, if carried in .ext/wheels/, are installed for that step only.
set -u
DEST=${OUT:-out}; mkdir -p "$DEST"; START=$(date +%s)
source scripts/device_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m basis_train.experiments.scale_grid --grid /tmp/scale25 --tokenize-only > "$DEST/tokenize.log" 2>&1 &
TOK=$!
# TESTS: the CUDA test files (default: all of them); TESTS_S: their time limit.
TESTS=${TESTS:-"tests/test_gpu.py tests/core/test_sketch_kernels.py tests/core/test_head.py tests/core/test_head_cce_gpu.py tests/fleet tests/experiments/test_scale_grid.py"}
timeout ${TESTS_S:-180} python3 -m pytest -q -p no:cacheprovider -rs $TESTS > "$DEST/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - START ))s): $(tail -1 "$DEST/tests.log")"
wait $TOK; echo "tokenize rc=$? ($(( $(date +%s) - START ))s): $(tail -1 "$DEST/tokenize.log")"
NANO=(); [ -f .ext/nanogpt/model.py ] && NANO=(--nanogpt .ext/nanogpt/model.py)
timeout ${SPEED_S:-330} python3 scripts/speed_gpt2.py "$DEST/speed_gpt2.json" ${NANO[@]+"${NANO[@]}"} \
  --steps ${STEPS:-20} --warmup ${WARMUP:-6} --rows ${ROWS:-0,4,5,17,6,18} \
  ${PROFILE:+--profile "$DEST/profile.txt"} 2>&1 | tee "$DEST/speed.log" | grep '^{'
echo "speed done ($(( $(date +%s) - START ))s)"
if [ -n "${HEAD:-}" ]; then
  HEADSITE=/tmp/headsite
  ls .ext/wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --target $HEADSITE .ext/wheels/*.whl
  PYTHONPATH=$HEADSITE:$PYTHONPATH timeout ${HEAD_S:-150} python3 -m basis_train.experiments.bench head "$DEST/head" \
    --steps 10 --warmup 3 > "$DEST/head.log" 2>&1
  echo "head done rc=$? ($(( $(date +%s) - START ))s)"; grep '^\[head\]' "$DEST/head.log"
fi
