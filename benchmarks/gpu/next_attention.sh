#!/bin/bash
# Prepared for the next GPU session (not run yet): is a fused attention kernel what our network lacks at large
# batches? On the H100 (docs/benchmarks.md §1) the network alone ran 64x1 at 0.91x transformers (bf16 weights);
# the einsum attention writes (64, 12, 485, 485) float32 scores per layer (~0.7 GB), a fused kernel writes none.
# Run from the repo root on the GPU machine: OUT=/tmp/out bash benchmarks/gpu/next_attention.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 TF_CPP_MIN_LOG_LEVEL=3
L=$OUT/log.txt
for impl in einsum cudnn auto xla; do
  echo "=== $(date +%T) attention $impl" | tee -a $L
  timeout 150 python3 benchmarks/bench_inference.py --device gpu --dtype bfloat16 --cases 64x1 1x16 --iters 10 \
    --warmup 3 --model-only --attention $impl --json $OUT/attn_$impl.json 2>&1 \
    | grep -v "Loading weights\|Writing model\|requires torchvision\|UserWarning\|from_numpy" | tee -a $L
done
