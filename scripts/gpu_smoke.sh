#!/usr/bin/env bash
# First look at the GPU: environment, GPU tests, single-run and fleet speed at the paper's size.
set -x
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1
python3 -c "import torch;print(torch.__version__, torch.cuda.get_device_name(), hasattr(torch.cuda.CUDAGraph,'register_generator_state'))"
python3 -m pytest -q -x tests/test_gpu.py tests/test_sketch.py -p no:cacheprovider 2>&1 | tail -5
for m in exact basis; do
  python3 -m basis_train.cli --quiet --method $m --rank 32 --steps 3000 --eval-every 1000 --checkpoint-every 100000 --out $OUT/single_$m
  cat $OUT/single_$m/metrics.jsonl | python3 -c "import sys,json;[print({k:round(v,3) if isinstance(v,float) else v for k,v in json.loads(l).items() if k in ('step','ms_per_step','eval_s','val_loss')}) for l in sys.stdin]"
done
python3 scripts/fleet_smoke.py
