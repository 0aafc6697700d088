"""numpy/OpenCV image operations of the PC+ pipeline (one sample at a time, GIL released).

OpenCV is used for the pixel work because its kernels release the GIL, so tf.data's threads
run them in parallel, and because TF's per-op overhead on CPU (≈ 10-50 µs per op, ~100 small ops
per sample) dominated the previous graph version (docs/benchmarks-input.md).
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "decode_image",
    "decode_mask",
    "pick_square_crop",
    "short_side_shape",
]


def _buffer(data: bytes | np.ndarray, name: str) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size == 0:  # cv2.imdecode asserts (cv2.error) on an empty buffer
        raise ValueError(f"{name}: empty file")
    return buf


def decode_image(data: bytes | np.ndarray, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB (libjpeg-turbo/libpng via OpenCV; PIL for the rest)."""
    buf = _buffer(data, name)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    if img is None:  # GIF, palette formats OpenCV lacks: PIL
        try:
            with Image.open(io.BytesIO(buf.tobytes())) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{name}: cannot decode image ({e})") from None
    return img


def decode_mask(data: bytes | np.ndarray, name: str = "mask") -> np.ndarray:
    """Encoded mask (PNG, any channel count) -> uint8 (H, W) {0,1}: non-zero in any colour channel."""
    buf = _buffer(data, name)
    m = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if m is None:
        try:
            with Image.open(io.BytesIO(buf.tobytes())) as im:
                m = np.asarray(im.convert("L"))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{name}: cannot decode mask ({e})") from None
    if m.ndim == 3:  # colour channels only: BGR(A) -> the first 3, gray + alpha -> the first
        m = m[:, :, :3 if m.shape[2] >= 3 else 1].max(axis=2)
    return (m > 0).view(np.uint8)


def crop_cumsum(mask: np.ndarray) -> np.ndarray:
    """(max(H, W) + 1,) int64: foreground pixels in the first k rows (H > W) or columns (otherwise)."""
    h, w = mask.shape
    # Foreground per row (tall) or column (wide): one OpenCV reduction, ~5x numpy's sum.
    line = cv2.reduce(np.ascontiguousarray(mask), 1 if h > w else 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).reshape(-1)
    cs = np.zeros(line.size + 1, np.int64)
    np.cumsum(line, out=cs[1:])
    return cs


def pick_square_crop(mask: np.ndarray, offsets: np.ndarray, min_frac: float,
                     cumsum: np.ndarray | None = None) -> tuple[int, int, int]:
    """The original `find_crop`: (offset_y, offset_x, side) of a min(H, W) square window.

    Of the candidate `offsets` along the long axis, the first whose window holds more than
    `min_frac` * H * W foreground pixels (the *full* image area, as in the original), else the
    first with the most foreground. `cumsum`, when given, is `crop_cumsum(mask)` (e.g. stored
    in a cache), and then only the mask's shape is used.
    """
    h, w = mask.shape
    side = min(h, w)
    cs = crop_cumsum(mask) if cumsum is None else cumsum
    if cs.shape != (max(h, w) + 1,):
        raise ValueError(f"cumsum has shape {cs.shape}; expected ({max(h, w) + 1},) for a {h}x{w} mask")
    offsets = np.asarray(offsets, np.int64)
    sums = cs[offsets + side].astype(np.int64) - cs[offsets]
    ok = sums > min_frac * float(h * w)
    first = int(ok.argmax())  # the first True, or 0 when there is none
    off = int(offsets[first if ok[first] else int(sums.argmax())])
    return (off, 0, side) if h > w else (0, off, side)


def short_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') with min(h', w') == size and the aspect ratio kept (rounded)."""
    m = min(h, w)
    return (size, max(size, round(w * size / m))) if h <= w else (max(size, round(h * size / m)), size)
