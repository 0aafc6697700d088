"""Host-side (NumPy) image reading and normalisation of the evaluation protocols; their resizes are in
`clipseg_jax.resize` (each named after the library call the original protocol ran).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from clipseg_jax.prompts import IMAGENET_MEAN, IMAGENET_STD
from clipseg_jax.resize import cv2_bilinear, cv2_nearest


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
    img = cv2_bilinear(image.astype(np.float32), (nh, nw))
    canvas = np.zeros((test_size, test_size, 3), np.float32)
    canvas[:nh, :nw] = img
    lh, lw = pfenet_new_hw(label.shape[0], label.shape[1], test_size)
    lab = cv2_nearest(label, (lh, lw))
    lcanvas = np.full((test_size, test_size), 255, np.float32)
    lcanvas[:lh, :lw] = lab
    return canvas, lcanvas
