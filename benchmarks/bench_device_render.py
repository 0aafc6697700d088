"""Cost on the accelerator of rendering visual prompts in the jitted step (PC+ `support_render="device"`).

With device rendering the input host ships the raw support square and its mask; the jitted step renders the prompt
(`render_visual_prompts_jax`: blur, highlight, crop, pad, nearest resize). This times that render for a batch on the
default JAX device and, for scale, the forward pass of the CLIP vision tower that encodes the same supports
(ViT-B/16 at 352, random weights): the render is only worth moving if it is small next to the model.

    python benchmarks/bench_device_render.py --batch-size 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def median_time(fn, warmup: int, iters: int) -> float:
    # bench_inference sits in this folder, which is sys.path[0] when the script runs.
    from bench_inference import timeit

    return statistics.median(timeit(fn, warmup, iters))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=352)
    ap.add_argument("--mode", default="crop_blur_highlight352")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tiny_models import reference_config

    from clipseg_jax.config import CLIPSegConfig
    from clipseg_jax.model.clipseg import CLIPSeg
    from clipseg_jax.predict import normalize
    from clipseg_jax.prompts_jax import render_visual_prompts_jax

    b, s = args.batch_size, args.size
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8))
    masks = np.zeros((b, s, s), np.uint8)
    for i in range(b):  # one box per support, 5-60 % of the side
        h, w = rng.integers(s // 20, int(s * 0.6), size=2)
        y, x = rng.integers(0, s - h), rng.integers(0, s - w)
        masks[i, y:y + h, x:x + w] = 1
    masks = jax.device_put(masks)
    valid = jax.device_put(np.ones(b, bool))

    render = jax.jit(lambda i, m, v: render_visual_prompts_jax(i, m, v, args.mode))
    t_render = median_time(lambda: render(images, masks, valid).block_until_ready(), args.warmup, args.iters)

    cfg = CLIPSegConfig.from_dict(reference_config("rd64-refined").to_dict())
    model = CLIPSeg(cfg, dtype=getattr(jnp, args.dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, px):
        return nnx.merge(graphdef, state).get_image_features(normalize(px, getattr(jnp, args.dtype)))

    t_enc = median_time(lambda: encode(state, images).block_until_ready(), args.warmup, args.iters)
    dev = jax.devices()[0]
    print(f"# device: {dev.platform} {dev.device_kind}, jax {jax.__version__}; batch {b} at {s}x{s}, mode {args.mode}, "
          f"encoder dtype {args.dtype}")
    print(f"render (jitted, vmapped): {t_render * 1e3:8.3f} ms per batch ({t_render / b * 1e6:8.1f} us per support)")
    print(f"CLIP vision forward     : {t_enc * 1e3:8.3f} ms per batch ({t_enc / b * 1e6:8.1f} us per support)")
    print(f"render / vision forward : {t_render / t_enc:.3f}")


if __name__ == "__main__":
    main()
