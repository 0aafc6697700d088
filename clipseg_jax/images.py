"""Reading images and masks as the Predictor takes them (PIL and numpy only: no jax, so the command line checks its
inputs before it loads jax and the model)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Any  # path, PIL.Image, or HxWx3 / HxW uint8 array


def load_image(image: ImageLike) -> np.ndarray:
    """Any supported input -> RGB uint8 (H, W, 3). RGBA/LA/P are converted like PIL's convert('RGB') (alpha dropped,
    as the HF processor does); grayscale is replicated; 16-bit images are scaled to 8 bits."""
    name = None
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        try:
            with Image.open(name) as im:
                im.load()
                # Phones store portrait photos as landscape pixels + an EXIF rotation (transformers' load_image
                # applies it too).
                image = ImageOps.exif_transpose(im)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: no such image file") from None
        except UnidentifiedImageError:
            raise ValueError(f"{name}: not an image (PIL cannot identify it)") from None
        except OSError as e:  # truncated / corrupt data
            raise ValueError(f"{name}: cannot decode image ({e})") from None
    if isinstance(image, Image.Image):
        if name is None:
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image).astype(np.float64)
            arr = (arr / (65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0) * 255.0).round()
            image = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
        arr = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        what = name or "image array"
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"{what}: shape {arr.shape}, expected (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) gray")
        arr = arr[..., :3]
        if arr.dtype == np.uint16:
            arr = (arr.astype(np.float64) / 65535.0 * 255.0).round().astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ValueError(f"{what}: float image with values outside [0, 1]; pass uint8 or floats in [0, 1]")
            arr = (arr * 255.0).round().astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise ValueError(f"{what}: dtype {arr.dtype}, expected uint8, uint16 or float in [0, 1]")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name or 'image'}: empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_mask(mask: ImageLike, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A mask given as a path / PIL image / array -> {0,1} uint8 of `shape` (non-zero = object)."""
    if isinstance(mask, (str, os.PathLike)):
        what = str(mask)
        try:
            with Image.open(mask) as im:
                im = ImageOps.exif_transpose(im)  # a mask drawn on a phone photo is stored like the photo
                arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "P", "I", "I;16") else im)
        except FileNotFoundError:
            raise FileNotFoundError(f"{mask}: no such mask file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{mask}: not a readable mask image ({e})") from None
    elif isinstance(mask, Image.Image):
        arr = np.asarray(ImageOps.exif_transpose(mask).convert("L"))
    else:
        arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., :3].max(-1)
    if arr.shape != tuple(shape):
        raise ValueError(f"{what}: shape {arr.shape} does not match its image {tuple(shape)}")
    m = (arr > 0).astype(np.uint8)
    if not m.any():
        raise ValueError(f"{what}: empty mask (no non-zero pixel)")
    return m
