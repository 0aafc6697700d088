"""Side-by-side inference benchmark: clipseg-jax vs transformers.CLIPSegForImageSegmentation, same weights, same
machine, one run.

Workload (what a user does): uint8 images in (480x640 by default), probabilities at the image size out.
- HF side: `CLIPSegProcessor(text=prompts, images=[image]*K, padding=True)` -> model -> sigmoid -> bilinear resize
  back, as documented (one vision pass per (image, prompt) pair).
- Ours: `Predictor.predict(images, prompts)` (one vision pass per image), text-embedding cache cleared every
  call so the text tower is timed too.

Prints one line per case with median seconds per call, pairs/s and the ratio ours/HF throughput. Also checks that
both sides compute the same probabilities (max |Δ|) on the timed inputs.

`--model-only` adds a second line per case: the networks alone on inputs already on the device (ours: uint8 pixels
(N, 352, 352, 3) and K conditions -> N*K probability maps; transformers: N*K normalised pixel tensors and
conditional embeddings -> sigmoid(logits), both with bf16 autocast and with bf16 weights when --dtype bfloat16,
the ratio taken against the faster). It separates the network's speed from host-side decoding and resizing.

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
    ap.add_argument("--model-only", action="store_true", help="also time the networks alone (inputs on device)")
    ap.add_argument("--attention", default="einsum", choices=("einsum", "xla", "cudnn", "auto"),
                    help="our attention implementation (clipseg_jax.model.clip.set_attention_implementation)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from tiny_models import make_model, make_processor, reference_config
    from transformers import CLIPSegForImageSegmentation

    import clipseg_jax
    from clipseg_jax.predict import IMAGE_BUCKETS, PROMPT_BUCKETS, Predictor, _bucket

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
    from clipseg_jax.model.clip import set_attention_implementation

    model = set_attention_implementation(clipseg_jax.from_pretrained(ckpt, dtype=getattr(jnp, args.dtype)), args.attention)
    pred = Predictor(model)
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

    def sync():
        if tdev == "cuda":
            torch.cuda.synchronize()

    hf_bf16 = None
    if args.model_only and args.dtype == "bfloat16":
        import copy

        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)

    def model_only(n, k):
        """{name: median seconds} for the networks alone on device-resident inputs (N images x K conditions)."""
        px = jax.device_put(np.asarray(rng.integers(0, 256, (n, 352, 352, 3)), np.uint8))
        cond = jax.device_put(np.asarray(rng.standard_normal((k, hf.config.projection_dim)), np.float32))
        out = {"ours": statistics.median(timeit(
            lambda: pred._jit_segment(pred._state, px, cond).block_until_ready(), args.warmup + 1, args.iters))}
        pv = torch.randn(n * k, 3, 352, 352, device=tdev)
        ce = torch.randn(n * k, hf.config.projection_dim, device=tdev)
        variants = {"transformers": (hf, pv, ce)}
        if hf_bf16 is not None:
            variants["transformers bf16 weights"] = (hf_bf16, pv.bfloat16(), ce.bfloat16())

        for name, (m, p, c) in variants.items():
            auto = m is hf and args.dtype == "bfloat16" and tdev == "cuda"

            def run(m=m, p=p, c=c, auto=auto):
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if auto else torch.no_grad()
                with torch.inference_mode(), ctx:
                    torch.sigmoid(m(pixel_values=p, conditional_embeddings=c).logits.float())
                sync()

            out[name] = statistics.median(timeit(run, args.warmup, args.iters))
        return out

    results = []
    print(f"# device: jax {jax.devices()[0].device_kind} ({jax.__version__}), torch {torch.__version__} on {tdev} "
          f"({args.torch_threads} threads), {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"dtype {args.dtype}; attention {args.attention}; images {args.height}x{args.width} uint8 in, probabilities out; "
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
        if args.model_only:
            nb = _bucket(n, IMAGE_BUCKETS) if n <= IMAGE_BUCKETS[-1] else n
            kb = _bucket(k, PROMPT_BUCKETS) if k <= PROMPT_BUCKETS[-1] else k
            mt = model_only(nb, kb)
            best = min(v for name, v in mt.items() if name != "ours")
            r["model_only_s"] = mt
            print(f"{'':>6}  network only ({nb}x{kb} padded to our buckets): "
                  + "  ".join(f"{name} {v * 1e3:.1f} ms ({nb * kb / v:.1f} pairs/s)" for name, v in mt.items())
                  + f"  ratio {best / mt['ours']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
