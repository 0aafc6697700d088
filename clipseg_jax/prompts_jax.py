"""CLIPSeg's visual-prompt engineering in JAX: render supports on the accelerator.

`render_visual_prompt_jax` computes the same function as `clipseg_jax.prompts.render_visual_prompt`
for a square support (uint8 image + {0,1} mask) with static shapes, so it runs inside a jitted
train step (vmap it over the batch). The PC+ pipeline's `support_render="device"` ships the raw
support crop and its mask instead of the rendered prompt; a 15-tap blur of a 352² image is
~2e7 FLOPs, nothing next to the model, and it takes the largest per-sample cost off the input
host (docs/benchmarks-input.md).
"""
from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from clipseg_jax.resize import torch_nearest_index_jax
from clipseg_jax.prompts import (
    _BLUR_RADIUS,
    _PREPROCESS_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VISUAL_PROMPT_MODES,
    _elementwise_prompt,
    _gauss_taps,
)

__all__ = ["render_visual_prompt_jax", "render_visual_prompts_jax"]


def _blur(x: jax.Array, sigma: float) -> jax.Array:
    """Separable 15-tap Gaussian with reflect-101 borders (scipy 'mirror', cv2 default), (H, W, C)."""
    k = _gauss_taps(sigma).astype(np.float32)
    r = _BLUR_RADIUS
    h, w = x.shape[:2]
    xp = jnp.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(float(k[i]) * xp[i:i + h] for i in range(2 * r + 1))
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(float(k[i]) * xp[:, i:i + w] for i in range(2 * r + 1))


def _bounds(any_line: jax.Array, context: float, n: int) -> tuple[jax.Array, jax.Array]:
    """`mask_crop_box` along one axis: (lo, hi) of the foreground widened by context * extent,
    truncated as int() does in the original; rational arithmetic so the floor is exact."""
    lo = jnp.argmax(any_line)
    hi = n - jnp.argmax(any_line[::-1])
    ext = hi - lo
    frac = Fraction(context).limit_denominator(10_000)
    num, den = frac.numerator, frac.denominator
    return jnp.maximum(0, (den * lo - num * ext) // den), jnp.minimum(n, (den * hi + num * ext) // den)


def render_visual_prompt_jax(image: jax.Array, mask: jax.Array, mode: str = "crop_blur_highlight352") -> jax.Array:
    """Visual prompt of a square support, uint8 (S, S, 3) -> uint8 (S, S, 3), jit/vmap-able.

    Args:
      image: uint8 (S, S, 3).
      mask: (S, S) bool or {0,1}; must not be empty for the crop modes (an empty mask gives an
        unspecified image; the pipeline marks such supports invalid).
      mode: one of `clipseg_jax.prompts.VISUAL_PROMPT_MODES`.

    Equal to `render_visual_prompt(image, mask, mode, size=S)` within 1 level (float rounding),
    tested for every mode.
    """
    if mode not in VISUAL_PROMPT_MODES:
        raise ValueError(f"unknown visual prompt mode {mode!r}; expected one of {VISUAL_PROMPT_MODES}")
    s = image.shape[0]
    if image.shape != (s, s, 3) or mask.shape != (s, s):
        raise ValueError(f"expected a square (S, S, 3) image and (S, S) mask; got {image.shape} {mask.shape}")
    mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
    x = (image.astype(jnp.float32) / 255.0 - mean) / std
    mb = mask.astype(bool)
    m = mb.astype(jnp.float32)[:, :, None]

    if mode in _PREPROCESS_MODES:
        sigma, bg_fac, context, offset = _PREPROCESS_MODES[mode]
        blurred = _blur(x, sigma) if sigma > 0 else x
        out = x * m + bg_fac * blurred * (1.0 - m)
        if context is not None:
            y0, y1 = _bounds(mb.any(axis=1), context, s)
            x0, x1 = _bounds(mb.any(axis=0), context, s)
            ch, cw = y1 - y0, x1 - x0
            n = jnp.maximum(ch, cw)
            # pad the crop to an n x n square (zeros = mean colour), nearest-resize it back to s
            src = torch_nearest_index_jax(n, s, s)
            iy, ix = src - (n - ch) // 2, src - (n - cw) // 2
            valid = ((iy >= 0) & (iy < ch))[:, None] & ((ix >= 0) & (ix < cw))[None, :]
            rows = jnp.clip(y0 + iy, 0, s - 1)
            cols = jnp.clip(x0 + ix, 0, s - 1)
            out = jnp.where(valid[:, :, None], out[rows][:, cols], 0.0)
        out = out + offset
    else:
        out = _elementwise_prompt(mode, x, m)
    y = (out * std + mean) * 255.0
    return jnp.clip(jnp.round(y), 0, 255).astype(jnp.uint8)


def render_visual_prompts_jax(images: jax.Array, masks: jax.Array, valid: jax.Array,
                              mode: str = "crop_blur_highlight352") -> jax.Array:
    """A batch of supports as the PC+ pipeline ships them with `support_render="device"`.

    images uint8 (B, S, S, 3), masks (B, S, S), valid bool (B,) -> uint8 (B, S, S, 3), zeros
    where not valid (what `support_render="host"` yields).
    """
    out = jax.vmap(lambda i, m: render_visual_prompt_jax(i, m, mode))(images, masks)
    return jnp.where(valid[:, None, None, None], out, jnp.zeros_like(out))
