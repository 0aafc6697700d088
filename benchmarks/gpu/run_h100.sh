#!/bin/bash
# The prepared GPU run of 2026-11-26 (device tool, H100): smoke, bf16 + f32 inference benchmarks, device render
# cost, parity, GPU tests. Run from the repo root on the GPU machine: OUT=/tmp/out bash benchmarks/gpu/run_h100.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 TF_CPP_MIN_LOG_LEVEL=3
L=$OUT/log.txt
step() { echo "=== $(date +%T) $*" | tee -a $L; }
step env
nvidia-smi -L 2>&1 | tee -a $L; lscpu | grep -m1 "Model name" | tee -a $L

step smoke
timeout 60 python3 benchmarks/gpu/smoke.py 2>&1 | grep -v "Loading weights\|Writing model" | tail -3 | tee -a $L
step bench bf16
timeout 200 python3 benchmarks/bench_inference.py --device gpu --dtype bfloat16 --cases 1x16 4x1 64x1 1x1 --iters 10 --warmup 3 --model-only --json $OUT/bf16.json 2>&1 | grep -v "Loading weights\|Writing model\|requires torchvision" | tee -a $L
step device render
timeout 60 python3 benchmarks/bench_device_render.py --batch-size 32 --dtype bfloat16 2>&1 | tail -4 | tee -a $L
step bench f32
timeout 150 python3 benchmarks/bench_inference.py --device gpu --dtype float32 --cases 1x16 4x1 64x1 --iters 5 --warmup 2 --model-only --json $OUT/f32.json 2>&1 | grep -v "Loading weights\|Writing model\|requires torchvision" | tee -a $L
step parity
timeout 90 python3 benchmarks/parity_report.py --configs rd64-refined 2>&1 | tail -4 | tee -a $L
step gpu tests
JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_predict.py 2>&1 | tail -4 | tee -a $L
step done
