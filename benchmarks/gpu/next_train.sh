#!/bin/bash
# Prepared for the next GPU session (not run: no device was lent to the training session): the training figures
# the issue asks for on one H100/H200. Run from the repo root on the GPU machine:
#   OUT=/tmp/out bash benchmarks/gpu/next_train.sh
# 1. The train step alone vs the PyTorch reference step, bf16, batch 64 (attention implementations compared).
# 2. The trainer with its input pipeline running: rd64 recipe (full ViT-B/16 CLIP, random weights: no hub), batch 64,
#    from a pre-resized cache with visual prompts rendered on the device; samples/s and MFU from metrics.jsonl.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=3
L=$OUT/log.txt
for impl in einsum cudnn; do
  echo "=== $(date +%T) bench_train attention=$impl" | tee -a $L
  timeout 170 python3 benchmarks/bench_train.py --device gpu --dtype bfloat16 --batch 64 --iters 10 --warmup 3 \
    --text-length 16 --json $OUT/train_$impl.json 2>&1 | grep -v "Loading weights\|Writing model\|torchvision" | tee -a $L
done
echo "=== $(date +%T) trainer + pipeline" | tee -a $L
timeout 240 python3 - <<'PY' 2>&1 | tee -a $L
import os, sys
sys.path.insert(0, ".")
from data_pipelines import synthetic
from data_pipelines.sources import TfdsSource, build_cache
d = synthetic.prepare("/tmp/shapes", train_images=3000, val_images=100, min_size=320, max_size=640)
build_cache(TfdsSource("train", d), "/tmp/shapes_cache", size=352)
PY
timeout 300 python3 main.py train --config configs/rd64_uni.py --workdir $OUT/rd64 --config.init_clip= \
  --config.data.source=cached --config.data.cache_dir=/tmp/shapes_cache --config.data.support_render=device \
  --config.data.workers=8 --config.data.text_length=16 --config.eval_data.source=synthetic \
  --config.eval_data.data_dir=/tmp/shapes --config.eval_data.synthetic.train_images=3000 \
  --config.eval_data.synthetic.val_images=100 --config.eval_data.synthetic.min_size=320 \
  --config.eval_data.synthetic.max_size=640 --config.eval_data.limit=256 --config.total_steps=600 \
  --config.log_every=50 --config.checkpoint_every=100000 --config.eval_every=0 --config.progress=false 2>&1 | tail -5 | tee -a $L
cp $OUT/rd64/metrics.jsonl $OUT/rd64_metrics.jsonl 2>/dev/null
