"""Host-side (NumPy) image operations of the evaluation protocols, each matching the
library call the original pipeline used:

* ``resize_bilinear_align_corners``: ``F.interpolate(mode='bilinear', align_corners=True)``
  (CLIPSeg's PhraseCut loader), float32 index/weight arithmetic as PyTorch's CPU kernel.
* ``resize_bilinear_half_pixel``: ``F.interpolate(mode='bilinear', align_corners=False)``,
  which ``torchvision.transforms.Resize`` runs on tensors without antialiasing (torchvision
  0.13, JoEm/CLIPSeg zero-shot): half-pixel centres, source clamped at 0, no antialiasing
  when downscaling; float32 coordinates like PyTorch.
* ``resize_bilinear_cv2``: the same rule with ``cv2.resize(INTER_LINEAR)``'s arithmetic
  (double scale, horizontal pass first), for PFENet's ``test_Resize`` on float images.
* ``resize_nearest``: ``F.interpolate(mode='nearest')`` / torchvision NEAREST / cv2
  INTER_NEAREST: ``src = min(floor(dst * (in / out)), in - 1)``, scale in float32.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from clipseg_jax.prompts import IMAGENET_MEAN, IMAGENET_STD


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3); grayscale is replicated to three channels (as CLIPSeg does)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def load_label(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W) class-index map: grayscale (SegmentationClassAug) or palette
    (VOC SegmentationClass) PNG, read as indices."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"{path}: expected a grayscale or palette PNG label map, got mode {im.mode}")
            return np.asarray(im).astype(np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: label file not found") from None
    except ValueError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read label ({e})") from None


def normalize01(x: np.ndarray) -> np.ndarray:
    """ImageNet normalisation of a float image in [0, 1]."""
    return ((x.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def normalize255(x: np.ndarray) -> np.ndarray:
    """ImageNet normalisation of a float image in [0, 255] (PFENet's ``Normalize(mean*255, std*255)``)."""
    return ((x.astype(np.float32) - IMAGENET_MEAN * 255) / (IMAGENET_STD * 255)).astype(np.float32)


def _taps_align_corners(n_in: int, n_out: int):
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = np.arange(n_out, dtype=np.float32) * np.float32(scale)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def _taps_half_pixel(n_in: int, n_out: int):
    # PyTorch: float32 scale, src = scale * (dst + 0.5) - 0.5 evaluated as one fused
    # multiply-add (rounded once to float32), clamped at 0.
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def _taps_cv2_linear(n_in: int, n_out: int):
    """cv2.resize INTER_LINEAR (float images): source coordinate (dx + 0.5) * in / out - 0.5
    and its fraction in double precision (weights then float32), clamped to the border."""
    scale = 1.0 / (n_out / n_in)
    fx = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    sx = np.floor(fx).astype(np.int64)
    lam = (fx - sx).astype(np.float32)
    low = sx < 0
    lam[low] = 0
    sx[low] = 0
    high = sx >= n_in - 1
    lam[high] = 0
    sx[high] = n_in - 1
    return sx, np.minimum(sx + 1, n_in - 1), lam


def _separable(img: np.ndarray, ty, tx) -> np.ndarray:
    y0, y1, ly = ty
    x0, x1, lx = tx
    img = np.asarray(img, np.float32)
    ext = (slice(None),) + (None,) * (img.ndim - 1)
    rows = img[y0] * (1 - ly)[ext] + img[y1] * ly[ext]
    ext_x = (None, slice(None)) + (None,) * (img.ndim - 2)
    return (rows[:, x0] * (1 - lx)[ext_x] + rows[:, x1] * lx[ext_x]).astype(np.float32)


def resize_bilinear_align_corners(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> float32 (h, w[, C]), bilinear with align_corners=True."""
    H, W = img.shape[:2]
    if (H, W) == tuple(size):
        return np.asarray(img, np.float32)
    return _separable(img, _taps_align_corners(H, size[0]), _taps_align_corners(W, size[1]))


def resize_bilinear_cv2(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> float32 (h, w[, C]) like ``cv2.resize(img_float32, (w, h), INTER_LINEAR)``:
    horizontal pass first, then vertical, with cv2's coordinate arithmetic."""
    H, W = img.shape[:2]
    if (H, W) == tuple(size):
        return np.asarray(img, np.float32)
    x0, x1, lx = _taps_cv2_linear(W, size[1])
    y0, y1, ly = _taps_cv2_linear(H, size[0])
    img = np.asarray(img, np.float32)
    ext_x = (None, slice(None)) + (None,) * (img.ndim - 2)
    cols = img[:, x0] * (1 - lx)[ext_x] + img[:, x1] * lx[ext_x]
    ext = (slice(None),) + (None,) * (img.ndim - 1)
    return (cols[y0] * (1 - ly)[ext] + cols[y1] * ly[ext]).astype(np.float32)


def resize_bilinear_half_pixel(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> float32 (h, w[, C]), bilinear with half-pixel centres, no antialiasing."""
    H, W = img.shape[:2]
    if (H, W) == tuple(size):
        return np.asarray(img, np.float32)
    return _separable(img, _taps_half_pixel(H, size[0]), _taps_half_pixel(W, size[1]))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> (h, w[, C]) nearest neighbour, PyTorch's legacy 'nearest' rule."""
    H, W = arr.shape[:2]
    return arr[_nearest_index(H, size[0])][:, _nearest_index(W, size[1])]


def pfenet_new_hw(h: int, w: int, test_size: int) -> tuple[int, int]:
    """PFENet ``test_Resize.find_new_hw``: longer side -> test_size, both sides floored to
    multiples of 8; images not larger than test_size are kept as they are."""
    if max(h, w) <= test_size:
        return h, w
    if h >= w:
        ratio = test_size * 1.0 / h
        new_h, new_w = test_size, int(w * ratio)
    else:
        ratio = test_size * 1.0 / w
        new_h, new_w = int(h * ratio), test_size
    if new_h % 8 != 0:
        new_h = int(new_h / 8) * 8
    if new_w % 8 != 0:
        new_w = int(new_w / 8) * 8
    return new_h, new_w


def pfenet_test_resize(image: np.ndarray, label: np.ndarray, test_size: int = 352):
    """PFENet ``test_Resize``: (image float32 (S,S,3) in 0..255 with black padding,
    label float32 (S,S) nearest-resized with 255 padding), both pasted top-left."""
    h, w = image.shape[:2]
    nh, nw = pfenet_new_hw(h, w, test_size)
    img = resize_bilinear_cv2(image.astype(np.float32), (nh, nw))
    canvas = np.zeros((test_size, test_size, 3), np.float32)
    canvas[:nh, :nw] = img
    lh, lw = pfenet_new_hw(label.shape[0], label.shape[1], test_size)
    lab = resize_nearest(label, (lh, lw))
    lcanvas = np.full((test_size, test_size), 255, np.float32)
    lcanvas[:lh, :lw] = lab
    return canvas, lcanvas
