"""Side-by-side inference benchmark: clipseg-jax vs transformers.CLIPSegForImageSegmentation, same weights, same
machine, one run.

Workload (what a user does): uint8 images in (480x640 by default), probabilities at the image size out.
- HF side: `CLIPSegProcessor(text=prompts, images=[image]*K, padding=True)` -> model -> sigmoid -> bilinear resize
  back, as documented (one vision pass per (image, prompt) pair).
- Ours: `Predictor.predict(images, prompts)` (one vision pass per image), text-embedding cache cleared every
  call so the text tower is timed too.

Prints one line per case with median seconds per call, pairs/s and the ratio ours/HF throughput. Also checks that
both sides compute the same probabilities (max |Δ|) on the timed inputs.

    python benchmarks/bench_inference.py                      # CPU, float32, rd64-refined architecture
    python benchmarks/bench_inference.py --dtype bfloat16 --cases 1x16 4x1 64x1 --device gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timeit(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="HF directory to use (default: random rd64-refined weights)")
    ap.add_argument("--config", default="rd64-refined", choices=("rd64-refined", "rd64", "rd16"))
    ap.add_argument("--cases", nargs="+", default=["1x16", "4x1", "1x1"], help="IMAGESxPROMPTS")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import CLIPSegForImageSegmentation

    import clipseg_jax
    from clipseg_jax.predict import Predictor
    from tiny_models import make_model, make_processor, reference_config

    torch.set_num_threads(args.torch_threads)
    tdev = "cuda" if args.device == "gpu" else "cpu"
    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = Path(tmp.name) / "hf"
        make_model(reference_config(args.config), seed=0).save_pretrained(ckpt)
    processor = make_processor(Path(tmp.name))
    hf = CLIPSegForImageSegmentation.from_pretrained(ckpt, attn_implementation="sdpa").eval().to(tdev)
    t0 = time.perf_counter()
    pred = Predictor(clipseg_jax.from_pretrained(ckpt, dtype=getattr(jnp, args.dtype)))
    load_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    words = ["cat", "dog", "red umbrella", "person on a bike", "blue car", "wooden table", "sky", "grass", "tree",
             "window", "a glass", "something to fill", "wood", "a jar", "road sign", "white boat", "lamp"]

    def images(n):
        base = rng.random((n, 15, 20, 3))
        from PIL import Image

        return [np.asarray(Image.fromarray((b * 255).astype(np.uint8)).resize((args.width, args.height)))
                for b in base]

    def hf_run(imgs, prompts):
        texts = [p for _ in imgs for p in prompts]
        ims = [im for im in imgs for _ in prompts]
        inputs = processor(text=texts, images=ims, padding=True, return_tensors="pt").to(tdev)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (args.dtype == "bfloat16" and tdev == "cuda") else torch.no_grad()
        with torch.inference_mode(), ctx:
            logits = hf(**inputs).logits.float()
        if logits.ndim == 2:
            logits = logits[None]
        probs = torch.sigmoid(logits)[:, None]
        probs = torch.nn.functional.interpolate(probs, size=(args.height, args.width), mode="bilinear", align_corners=False)
        return probs[:, 0].reshape(len(imgs), len(prompts), args.height, args.width).cpu().numpy()

    def ours_run(imgs, prompts):
        pred.clear_cache()
        return pred.predict(imgs, prompts)

    results = []
    print(f"# device: jax {jax.devices()[0].device_kind} ({jax.__version__}), torch {torch.__version__} on {tdev} "
          f"({args.torch_threads} threads), {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"dtype {args.dtype}; images {args.height}x{args.width} uint8 in, probabilities out; "
          f"ours load {load_s:.1f}s")
    for case in args.cases:
        n, k = map(int, case.split("x"))
        imgs = images(n)
        prompts = [words[i % len(words)] + ("" if i < len(words) else f" {i}") for i in range(k)]
        t = time.perf_counter()
        ours_out = ours_run(imgs, prompts)
        first_s = time.perf_counter() - t
        ref_out = hf_run(imgs, prompts)
        diff = float(np.abs(ours_out - ref_out).max())
        ours_t = timeit(lambda: ours_run(imgs, prompts), args.warmup, args.iters)
        hf_t = timeit(lambda: hf_run(imgs, prompts), args.warmup if n * k < 64 else 1, max(2, args.iters // (1 + n * k // 32)))
        mo, mh = statistics.median(ours_t), statistics.median(hf_t)
        r = dict(case=case, images=n, prompts=k, ours_s=mo, hf_s=mh, ours_pairs_s=n * k / mo, hf_pairs_s=n * k / mh,
                 ratio=mh / mo, first_call_s=first_s, max_abs_diff_probs=diff, dtype=args.dtype, device=args.device)
        results.append(r)
        print(f"{case:>6}: ours {mo * 1e3:8.1f} ms ({n * k / mo:7.2f} pairs/s)  transformers {mh * 1e3:8.1f} ms "
              f"({n * k / mh:7.2f} pairs/s)  ratio {mh / mo:5.2f}x  first call {first_s:5.1f}s  max|Δp| {diff:.1e}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
