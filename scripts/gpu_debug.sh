#!/usr/bin/env bash
export PYTHONPATH=$PWD BASIS_TRAIN_CACHE=$PWD/.cache PYTHONUNBUFFERED=1
(which nvidia-cuda-mps-control; nproc) > $OUT/env.txt 2>&1
timeout 120 python3 -m pytest -q -x tests/test_gpu.py -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
grep -E "^E  |passed|failed" $OUT/gpu_tests.txt | head -12
for a in "1 exact" "4 exact" "1 basis" "4 basis"; do timeout 60 python3 scripts/fleet_debug.py $a 2>>$OUT/err.txt | tail -1; done
timeout 60 python3 -m basis_train.cli --quiet --rank 32 --steps 2000 --eval-every 1000 --checkpoint-every 100000 --out $OUT/single 2>>$OUT/err.txt
tail -1 $OUT/single/metrics.jsonl
grep -c Error $OUT/err.txt
