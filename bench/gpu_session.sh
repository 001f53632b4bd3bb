#!/usr/bin/env bash
# One GPU-machine session of checks, as run through the device tool (see bench/README.md):
#   bash bench/gpu_session.sh OUT_DIR [tests|offload|throughput ...]
# tests:      the GPU-only tests (tests/test_gpu.py) -> OUT/gpu_tests.txt
# offload:    the quickstart on one GPU with DeepSpeed ZeRO-3 and optimizer offload
#             -> OUT/ds_offload.txt, OUT/ds_offload_summary.json
# fp8:        bench/gpu_fp8.py (FP8 frozen base: matmuls, 1B quality and speed, restart)
#             and tests/test_fp8.py -> OUT/gpu_fp8.json, OUT/gpu_tests_fp8.txt
# throughput: the 8B shape, q,k,v,o, batch 8, Liger + compile: ray-app, the plain loop of its
#             model stack, and the common recipe -> OUT/gpu_throughput.json / .md
set -uo pipefail
out=$1; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for what in "$@"; do
  case "$what" in
    tests)
      python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" ;;
    offload)
      python -m ray_app train --num-cpus 8 --output /tmp/ds_offload \
        --set scaling.use_gpu=true --set scaling.num_workers=1 \
        --set scaling.strategy=deepspeed --set scaling.zero_stage=3 \
        --set scaling.offload=optimizer --set train.max_steps=20 \
        --set run.name=ds-offload --set run.storage_path=/tmp/ds_offload_ckpt \
        2>&1 | tee "$out/ds_offload.txt"
      cp /tmp/ds_offload/run_summary.json "$out/ds_offload_summary.json" ;;
    throughput)
      python bench/gpu_throughput.py --models 8b --data fixed --out "$out" --work /tmp/gt \
        --ray-variants liger+compile:8 --plain-variants liger+compile:8 --deadline-s 420 \
        2>&1 | tee "$out/throughput.log" ;;
    fp8)
      python bench/gpu_fp8.py --out "$out" --work /tmp/fp8 micro quality restart \
        2>&1 | tee "$out/gpu_fp8.log"
      python -m pytest -q -p no:cacheprovider tests/test_fp8.py 2>&1 | tee "$out/gpu_tests_fp8.txt" ;;
    *) echo "unknown check $what" >&2; exit 2 ;;
  esac
done
