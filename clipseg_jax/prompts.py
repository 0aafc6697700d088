"""Text templates and visual-prompt engineering of CLIPSeg (numpy + OpenCV).

Shared by training (the PC+ pipeline), inference and one-shot evaluation.

The original (timojl/clipseg ``datasets/utils.py`` + ``evaluation_utils.img_preprocess``)
applies blur / highlight / crop on the ImageNet-*normalised* float image and pads with 0,
which is the mean colour after normalisation. Batches in this project stay uint8 and are
normalised on device, so every mode here is computed in normalised space and mapped back with
``round(clip((x * std + mean) * 255))``. After on-device normalisation the result differs
from the original float tensor by at most 0.5/255 per channel before dividing by std (plus
clipping of values the original produced outside the uint8 range, which only the ``- 0.01``
of the ``blur*_highlight*`` modes can do, on pure-black pixels).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
from scipy import ndimage

from clipseg_jax.resize import torch_bilinear_align_corners, torch_nearest, torch_nearest_index

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEMPLATES_SHUFFLE_PLUS",
    "VISUAL_PROMPT_MODES",
    "apply_template",
    "render_visual_prompt",
    "render_visual_prompt_square_u8",
    "visual_prompt_read_region",
]

# Order as in the original `get_prompt_list('shuffle+')` (models/clipseg.py).
TEMPLATES_SHUFFLE_PLUS: tuple[str, ...] = (
    "a photo of a {}.",
    "a photograph of a {}.",
    "an image of a {}.",
    "{}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
    "a bad photo of a {}.",
    "a photo of the {}.",
)

# Table 2 / `blend_image_segmentation` modes that produce one 3-channel image.
# Not supported: `blur_highlight_random` (needs an RNG argument), `concat` (4 channels) and
# the `separate*` modes (return (image, mask) pairs for a masked CLIP variant not ported here).
VISUAL_PROMPT_MODES: tuple[str, ...] = (
    "crop_blur_highlight352",
    "crop_blur_highlight",
    "crop",
    "blur3_highlight01",
    "blur3_highlight",
    "blur_highlight",
    "highlight",
    "highlight2",
    "overlay",
    "shape",
    "image_only",
    "image_black",
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# (blur sigma, bg_fac, center_context, offset) per img_preprocess-based mode.
_PREPROCESS_MODES: dict[str, tuple[float, float, float | None, float]] = {
    "crop_blur_highlight352": (3.0, 0.1, 0.1, 0.0),
    "crop_blur_highlight": (3.0, 0.1, 0.1, 0.0),
    "crop": (1.0, 1.0, 0.1, 0.0),
    "blur3_highlight01": (3.0, 0.1, None, -0.01),
    "blur3_highlight": (3.0, 0.5, None, -0.01),
    "blur_highlight": (1.0, 0.5, None, -0.01),
}

# cv2.GaussianBlur(ksize=(15, 15)) == a separable Gaussian of radius 7 with BORDER_REFLECT_101
# ("mirror" in scipy); truncate = 7 / sigma gives exactly that radius.
_BLUR_RADIUS = 7


_TEMPLATE_ARTICLES = ("a", "an", "the", "one")
_PHRASE_ARTICLES = ("a ", "an ", "the ")


def apply_template(template: str, phrase: str) -> str:
    """Fill a `{}` template with a phrase. Where the template puts an article right before the phrase ("a photo of
    a {}.") and the phrase brings its own ("a red mug"), the phrase's is dropped: "a photo of a red mug.", not the
    original's "a photo of a a red mug.". Other phrases are filled in unchanged."""
    prefix, sep, suffix = template.partition("{}")
    if not sep:
        raise ValueError(f"template {template!r} must contain '{{}}'")
    words = prefix.lower().split()
    if prefix.endswith(" ") and words and words[-1] in _TEMPLATE_ARTICLES:
        low = phrase.lower()
        for art in _PHRASE_ARTICLES:
            if low.startswith(art) and phrase[len(art):].strip():
                phrase = phrase[len(art):].lstrip()
                break
    return prefix + phrase + suffix


def _normalize(image_u8: np.ndarray) -> np.ndarray:
    return (image_u8.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _denormalize_to_uint8(x: np.ndarray) -> np.ndarray:
    y = (x * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(
        x, sigma=(sigma, sigma, 0), mode="mirror", truncate=_BLUR_RADIUS / sigma
    )


def mask_crop_box(mask: np.ndarray, context: float) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of the foreground, each side enlarged by `context` × extent.

    Follows `evaluation_utils.crop_mask`: bounds are truncated with int() after clipping to
    the image. The original clips columns to H and rows to W (swapped); that only matters for
    non-square inputs, where this function clips each axis to its own size.
    """
    mask = np.asarray(mask)
    m = mask.view(np.uint8) if mask.dtype in (np.uint8, np.bool_) else (mask != 0).view(np.uint8)
    x0, y0, pw, ph = cv2.boundingRect(m)  # of the non-zero pixels; ~2x numpy's any/flatnonzero
    if pw == 0:
        raise ValueError("mask_crop_box: the mask is empty")
    y1, x1 = y0 + ph, x0 + pw
    h, w = mask.shape
    return (
        int(max(0, y0 - context * ph)),
        int(min(h, y1 + context * ph)),
        int(max(0, x0 - context * pw)),
        int(min(w, x1 + context * pw)),
    )


def _pad_to_square(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    if h > w:
        a = (h - w) // 2
        return np.pad(x, ((0, 0), (a, h - w - a), (0, 0)))
    if w > h:
        a = (w - h) // 2
        return np.pad(x, ((a, w - h - a), (0, 0), (0, 0)))
    return x


def render_visual_prompt(
    image: np.ndarray, mask: np.ndarray, mode: str = "crop_blur_highlight352", size: int = 352
) -> np.ndarray:
    """Render a support image + mask into CLIPSeg's visual prompt.

    Args:
      image: uint8 (H, W, 3) RGB (a (H, W) grayscale image is replicated to 3 channels).
      mask: (H, W) bool or {0,1} integer mask of the object; must not be empty.
      mode: one of `VISUAL_PROMPT_MODES`.
      size: output side. An input that is not size×size is first resized to it
        (bilinear, align_corners=True; mask nearest), as the original renders supports at
        the dataset resolution. For PC+-style supports, square-crop before calling.

    Returns:
      uint8 (size, size, 3); on-device ImageNet normalisation of it reproduces the original's
      float visual prompt to within 0.5/255 (see module docstring).
    """
    if mode not in VISUAL_PROMPT_MODES:
        raise ValueError(f"unknown visual prompt mode {mode!r}; expected one of {VISUAL_PROMPT_MODES}")
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) or (H, W); got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8; got {image.dtype}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    if not np.isin(np.unique(mask), (0, 1)).all():
        raise ValueError("mask must be boolean or contain only 0 and 1")
    if size < 1:
        raise ValueError(f"size must be positive; got {size}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty: a visual prompt needs at least one foreground pixel")

    if image.shape[:2] != (size, size):
        image = np.clip(np.rint(torch_bilinear_align_corners(image, (size, size))), 0, 255).astype(np.uint8)
        mask = torch_nearest(mask, (size, size))
        if not mask.any():
            raise ValueError(f"mask vanished when resized to {size}x{size}; object too small")

    x = _normalize(image)
    m = mask.astype(np.float32)[:, :, None]

    if mode in _PREPROCESS_MODES:
        sigma, bg_fac, context, offset = _PREPROCESS_MODES[mode]
        blurred = _blur(x, sigma) if sigma > 0 else x
        out = x * m + bg_fac * blurred * (1.0 - m)
        if context is not None:
            y0, y1, x0, x1 = mask_crop_box(mask, context)
            out = _pad_to_square(out[y0:y1, x0:x1])
            out = torch_nearest(out, (size, size))
        out = out + offset
    else:
        out = _elementwise_prompt(mode, x, m)
    return _denormalize_to_uint8(out)


def _elementwise_prompt(mode: str, x, m):
    """The per-pixel modes, from the normalised image x (H, W, 3) and mask m (H, W, 1).

    Plain arithmetic, so it serves numpy here and JAX in `prompts_jax`.
    """
    if mode == "overlay":
        return x * m
    if mode == "highlight":
        return x * m * 0.85 + 0.15 * x
    if mode == "highlight2":
        half = x / 2
        return (half + 0.1) * m + 0.3 * half
    if mode == "shape":
        return m + 0.0 * x  # the mask on all three channels
    if mode == "image_only":
        return x
    if mode == "image_black":
        return 0.0 * x
    raise ValueError(f"{mode!r} is not a per-pixel visual prompt mode")


# --------------------------------------------------------------------------------------------
# Fast uint8 renderer for the blur/highlight/crop modes (used by the PC+ pipeline).
# --------------------------------------------------------------------------------------------

def _gauss_taps(sigma: float) -> np.ndarray:
    x = np.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=np.float64)
    k = np.exp(-0.5 * x * x / (sigma * sigma))
    return k / k.sum()


@functools.cache
def _u8_mode_constants(mode: str):
    """Per-mode constants of the uint8 renderer (computed once)."""
    sigma, bg_fac, _, offset = _PREPROCESS_MODES[mode]
    off = np.float64(offset) * IMAGENET_STD.astype(np.float64) * 255.0  # offset in uint8 units
    bg = (1.0 - bg_fac) * IMAGENET_MEAN.astype(np.float64) * 255.0 + off
    k = _gauss_taps(sigma).astype(np.float32)
    pad = _denormalize_to_uint8(np.full((1, 1, 3), offset, np.float32))
    return (k * np.float32(bg_fac), k, (*np.rint(bg).tolist(), 0.0), (*off.tolist(), 0.0), pad[0, 0])


def _rgba_u32(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) uint32 pixels, so a 2-D gather moves whole pixels."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA).view(np.uint32)[:, :, 0]


def _render_box(m: np.ndarray, context: float | None) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) the prompt shows: `mask_crop_box`, or everything for the modes without a crop."""
    h, w = m.shape
    return (0, h, 0, w) if context is None else mask_crop_box(m, context)


def _with_margin(box: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
    r = _BLUR_RADIUS
    y0, y1, x0, x1 = box
    return max(y0 - r, 0), min(y1 + r, h), max(x0 - r, 0), min(x1 + r, w)


def visual_prompt_read_region(mask: np.ndarray, mode: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the only image pixels `render_visual_prompt_square_u8` reads for `mask`.

    Lets a caller produce just that part of the support image (e.g. resize only the crop box
    plus the blur margin); the rest of the image it passes may be left uninitialised.
    """
    h, w = mask.shape
    if mode not in _PREPROCESS_MODES:
        return 0, h, 0, w
    box = _render_box(np.asarray(mask), _PREPROCESS_MODES[mode][2])
    return _with_margin(box, h, w)


def render_visual_prompt_square_u8(image: np.ndarray, mask: np.ndarray, mode: str = "crop_blur_highlight352",
                                   out: np.ndarray | None = None) -> np.ndarray:
    """Fast `render_visual_prompt` for a square uint8 image and its non-empty {0,1} mask.

    Output side = input side; written into `out` (uint8 (S, S, 3)) when given. `image` may be
    a strided view (e.g. a window of a memory-mapped cache). Only the blur/highlight/crop modes
    (`_PREPROCESS_MODES`) are accelerated; the others fall back to `render_visual_prompt`.

    Works in uint8 units: an object pixel keeps its value, a background pixel becomes
    ``bg_fac * blur + (1 - bg_fac) * 255 * mean`` (the blur is linear with unit gain, so it
    commutes with the normalisation), ``offset`` becomes ``offset * 255 * std`` and the zero
    padding of the original's normalised space the mean colour. The 15-tap blur (OpenCV,
    float32) is evaluated on the crop box plus its 7-px margin only; the pad to square and the
    nearest resize are one gather of 32-bit pixels. Equal to `render_visual_prompt` within 1
    level (float rounding at .5 ties), tested.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if mode not in _PREPROCESS_MODES:
        return _into(render_visual_prompt(image, mask, mode, size=image.shape[0]), out)
    h, w = mask.shape
    if image.shape != (h, w, 3) or h != w or image.dtype != np.uint8:
        raise ValueError(f"expected a square uint8 (S, S, 3) image and (S, S) mask; got {image.shape} {mask.shape}")
    sigma, bg_fac, context, offset = _PREPROCESS_MODES[mode]
    kx, ky, bg, off, _ = _u8_mode_constants(mode)
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    y0, y1, x0, x1 = _render_box(m, context)

    # Background of the box: blur of the box + margin (clipped at the image border, where the
    # filter's own reflect-101 border is the image's, so this equals blurring the whole image),
    # scaled by bg_fac and rounded by the filter, plus the rounded constant. Both roundings
    # together stay within 1 level of the exact value.
    ys, ye, xs, xe = _with_margin((y0, y1, x0, x1), h, w)
    sub = image[ys:ye, xs:xe]
    if min(sub.shape[:2]) > 1:
        blurred = cv2.sepFilter2D(sub, cv2.CV_8U, kx, ky, borderType=cv2.BORDER_REFLECT_101)
    else:  # OpenCV's filters need 2 px; a 1-px strip is filtered along its length only
        k = _gauss_taps(sigma)
        blurred = ndimage.correlate1d(sub.astype(np.float32), k, axis=0, mode="mirror")
        blurred = np.rint(ndimage.correlate1d(blurred, k, axis=1, mode="mirror") * bg_fac).astype(np.uint8)
    blurred = np.ascontiguousarray(blurred[y0 - ys:y1 - ys, x0 - xs:x1 - xs])
    comp = cv2.add(blurred, bg)  # saturating uint8 add
    crop = image[y0:y1, x0:x1]
    if offset:
        crop = cv2.add(crop.astype(np.float32), off, dtype=cv2.CV_8U)
    cv2.copyTo(np.ascontiguousarray(crop), np.ascontiguousarray(m[y0:y1, x0:x1]), comp)
    if context is None:
        return _into(comp, out)

    # Pad to a square of the mean colour (0 in normalised space), then nearest-resize back to
    # h x w with torch's nearest rule (`torch_nearest_index`). Only the output rows
    # and columns whose source lies inside the box are gathered (as 32-bit RGBA pixels); the
    # others are the pad colour.
    ch, cw = y1 - y0, x1 - x0
    n = max(ch, cw)
    rows, r0 = _nearest_span(n, h, (n - ch) // 2, ch)
    cols, c0 = _nearest_span(n, w, (n - cw) // 2, cw)
    r1, c1 = r0 + len(rows), c0 + len(cols)
    gathered = np.take(_rgba_u32(comp), cols, axis=1)[rows]
    shown = cv2.cvtColor(gathered.view(np.uint8).reshape(len(rows), len(cols), 4), cv2.COLOR_RGBA2RGB)
    if out is None:
        out = np.empty((h, w, 3), np.uint8)
    pad_row = _pad_row(mode, w)
    out[:r0] = pad_row
    out[r1:] = pad_row
    out[r0:r1, :c0] = pad_row[:c0]
    out[r0:r1, c1:] = pad_row[c1:]
    out[r0:r1, c0:c1] = shown
    return out


def _into(res: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`res`, copied into `out` when one is given."""
    if out is None:
        return res
    out[...] = res
    return out


@functools.lru_cache(maxsize=4096)
def _nearest_span(n: int, size: int, start: int, length: int) -> tuple[np.ndarray, int]:
    """Nearest resize n -> size: (source indices - start, first output) of the outputs whose source is in [start, start+length)."""
    src = torch_nearest_index(n, size)
    lo, hi = np.searchsorted(src, [start, start + length])
    idx = src[lo:hi] - start
    idx.flags.writeable = False
    return idx, int(lo)


@functools.cache
def _pad_row(mode: str, w: int) -> np.ndarray:
    row = np.empty((w, 3), np.uint8)
    row[...] = _u8_mode_constants(mode)[4]  # the mean colour (+ offset) as uint8 RGB
    row.flags.writeable = False
    return row
