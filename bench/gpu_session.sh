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
# speed8b:    the 8B shape with the FP8 base through ray-app, q,k,v,o at batch 8 and all linear
#             layers at batch 4 (fits 80 GB), each against the common recipe with the same
#             targets at batch 8 -> OUT/gpu_throughput.json
# methods:    bench/gpu_methods.py: DPO, ORPO, SimPO, KTO, SFT and the LoRA variants on the
#             8B shape -> OUT/gpu_methods.json / .md
# restart8b:  bench/gpu_fp8.py restart on the 8B shape -> OUT/gpu_fp8.json
# spread:     bench/gpu_fp8.py quality with a second bf16 run (bf16, FP8, bf16 again; no common
#             recipe): FP8's distance from bf16 against bf16's own run-to-run spread
#             -> OUT/gpu_fp8.json
# quality240: bench/gpu_fp8.py quality over 240 steps (the runs leave the loss plateau and end
#             at the schedule's end): bf16 and FP8 for train.seed $SEEDS (default 7; one
#             seed per call fits the 10-minute limit), no common recipe -> OUT/gpu_fp8.json
# profile1b:  bench/probes/profile_step.py on the 1B shape, bf16 and FP8 -> OUT/profile_1b_step.json
# fp8tests:   tests/test_fp8.py alone -> OUT/gpu_tests_fp8.txt
# micro:      bench/gpu_fp8.py micro (frozen linears, the quantisation kernel) -> OUT/gpu_fp8.json
# speed1b:    the 1B shape on full rows (as the 8B rows): the common recipe at batch 16, ray-app
#             bf16 at 16 and the FP8 base at 16 and 32 -> OUT/gpu_throughput.json
# words:      bench/gpu_fp8.py quality on the word chain (pre-trained base; kept in $WORK, default
#             .bench_work/words, for the next call on a warm machine), bf16 and FP8 for
#             train.seed $SEEDS (default 42), $STEPS steps (default 200) -> OUT/gpu_fp8.json
# ablations:  the same FP8 run (seed 42) once per RAY_APP_FP8_ABLATION in $ABLATIONS (default
#             exact_accum,activation_rounding; `none`: the FP8 base itself; ~190 s each) on the
#             base kept by `words`
#             -> OUT/<ablation>/gpu_fp8.json
# Run from the repository root with the carried stack active (source .device/activate.sh);
# wheels in .whl/ (packages the carried stack lacks) are installed first. The project needs
# zstandard there (ray_app.data imports it), the tests pytest-timeout:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
#     zstandard pytest-timeout
set -uo pipefail
out=$1; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
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
      timeout 150 python -m pytest -q -p no:cacheprovider tests/test_fp8.py 2>&1 \
        | tee "$out/gpu_tests_fp8.txt"
      timeout 400 python bench/gpu_fp8.py --out "$out" --work /tmp/fp8 --steps 120 micro quality \
        > "$out/gpu_fp8.log" 2>&1 ;;
    speed8b)
      python bench/gpu_throughput.py --models 8b --data fixed --targets qkvo --common-batch 8 \
        --out "$out" --work /tmp/gt --ray-variants liger+compile+fp8:8 --keep-model \
        > "$out/speed8b_qkvo.log" 2>&1
      python bench/gpu_throughput.py --models 8b --data fixed --targets all-linear \
        --common-batch 8 --out "$out" --work /tmp/gt --ray-variants liger+compile+fp8:4 \
        --keep-model > "$out/speed8b_all_linear.log" 2>&1 ;;
    methods)
      python bench/gpu_methods.py --out "$out" --methods \
        dpo,orpo,simpo,kto,sft,dpo+dora,dpo+rslora,dpo+loraplus,simpo+olora,simpo+pissa \
        > "$out/gpu_methods.log" 2>&1 ;;
    spread)
      timeout 560 python bench/gpu_fp8.py --out "$out" --work /tmp/fp8 --steps 120 quality \
        --precisions default,fp8,default --common-batch 0 > "$out/spread.log" 2>&1 ;;
    quality240)
      timeout 580 python bench/gpu_fp8.py --out "$out" --work "/tmp/fp8_240_${SEEDS:-7}" \
        --steps 240 quality --precisions default,fp8 --seeds "${SEEDS:-7}" --common-batch 0 \
        > "$out/quality240.log" 2>&1 ;;
    profile1b)
      timeout 330 python bench/probes/profile_step.py --model 1b --batch 16 --common-batch 0 \
        --precisions default,fp8 --out "$out/profile_1b_step.json" > "$out/profile1b.log" 2>&1 ;;
    fp8tests)
      timeout 200 python -m pytest -q -p no:cacheprovider tests/test_fp8.py 2>&1 \
        | tee "$out/gpu_tests_fp8.txt" ;;
    micro)
      timeout 150 python bench/gpu_fp8.py --out "$out" --work /tmp/fp8 micro > "$out/micro.log" 2>&1 ;;
    speed1b)
      timeout 420 python bench/gpu_throughput.py --models 1b --data fixed --targets qkvo \
        --common-batch 16 --out "$out" --work /tmp/gt --ray-steps 80 --keep-model \
        --ray-variants liger+compile:16,liger+compile+fp8:16,liger+compile+fp8:32 \
        > "$out/speed1b.log" 2>&1 ;;
    words)
      # Runs of an earlier call on this machine would resume under the same run names.
      rm -rf "${WORK:-.bench_work/words}/storage" "${WORK:-.bench_work/words}/outputs"
      timeout 590 python bench/gpu_fp8.py --out "$out" --work "${WORK:-.bench_work/words}" \
        --steps "${STEPS:-200}" quality --task words --precisions default,fp8 \
        --seeds "${SEEDS:-42}" --common-batch 0 > "$out/words.log" 2>&1 ;;
    ablations)
      IFS=, read -ra ablations <<< "${ABLATIONS:-exact_accum,activation_rounding}"
      for ablation in "${ablations[@]}"; do
        # `none`: the FP8 base itself, for a comparison within one session.
        RAY_APP_FP8_ABLATION=${ablation#none} timeout 290 python bench/gpu_fp8.py --out "$out/$ablation" \
          --work "${WORK:-.bench_work/words}" --steps "${STEPS:-200}" quality --task words \
          --precisions fp8 --seeds 42 --common-batch 0 > "$out/$ablation.log" 2>&1
      done ;;
    restart8b)
      python bench/gpu_fp8.py --out "$out" --work /tmp/gt --restart-model 8b restart \
        > "$out/restart8b.log" 2>&1 ;;
    *) echo "unknown check $what" >&2; exit 2 ;;
  esac
done
