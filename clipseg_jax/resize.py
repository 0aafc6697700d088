"""Every resize of the project, each named after the library function it reproduces.

CLIPSeg's numbers depend on which resize ran where (the original resizes masks with torch's legacy
'nearest', images with bilinear `align_corners=True`; HF's processor resizes with PIL; PFENet's protocol
with OpenCV). Each function here reproduces one library call and is tested against it over a sweep of
sizes (`tests/test_resize.py`):

* `torch_nearest`: ``F.interpolate(mode='nearest')`` (float32 scale, ``floorf``).
* `torch_bilinear_align_corners`: ``F.interpolate(mode='bilinear', align_corners=True)`` in float32.
* `torch_bilinear_align_corners_u8`: the same rule on uint8 images via ``cv2.warpAffine`` (OpenCV's 1/32-px
  fixed point): within 1 level of the float one rounded, ~10x faster; the training pipeline's.
* `torch_bilinear`: ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing), and
  `torch_bilinear_matrix`, the same along one axis as an (out, in) matrix.
* `torch_bicubic_matrix`: ``F.interpolate(mode='bicubic', align_corners=False)`` along one axis (float64).
* `cv2_bilinear`: ``cv2.resize(float32 image, INTER_LINEAR)`` (a call of it).
* `cv2_nearest`: ``cv2.resize(INTER_NEAREST)`` (a call of it).
* `pil_bilinear`: ``PIL.Image.resize(BILINEAR)`` on uint8 (HF's `ViTImageProcessor`).
* `torch_bilinear_align_corners_jax`, `torch_nearest_index_jax`: the torch rules in jax (metrics, renderer).

numpy only at import; OpenCV, PIL and jax load where a function needs them.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "cv2_bilinear",
    "cv2_nearest",
    "pil_bilinear",
    "torch_bicubic_matrix",
    "torch_bilinear",
    "torch_bilinear_align_corners",
    "torch_bilinear_align_corners_jax",
    "torch_bilinear_align_corners_taps",
    "torch_bilinear_align_corners_u8",
    "torch_bilinear_matrix",
    "torch_nearest",
    "torch_nearest_index",
    "torch_nearest_index_jax",
]


# ----------------------------------------------------------------------------------------------------
# Nearest
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _torch_nearest_index_cached(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    idx.flags.writeable = False
    return idx


def torch_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output of torch's 'nearest' n_in -> n_out: min(floorf(dst * (float)in/out), in-1).

    The scale and the product are float32 as in torch's CPU kernel: exact integer arithmetic
    (floor(dst * in / out)) differs for some sizes (e.g. 208 -> 352). Read-only (cached).
    """
    return _torch_nearest_index_cached(int(n_in), int(n_out))


def torch_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> (h, w[, C]) as ``F.interpolate(mode='nearest')`` (any dtype, values copied)."""
    h, w = array.shape[:2]
    return array[torch_nearest_index(h, size[0])][:, torch_nearest_index(w, size[1])]


def torch_nearest_index_jax(n_in, n_out: int, max_n_in: int):
    """`torch_nearest_index(n_in, n_out)` for a traced `n_in` in [1, max_n_in] (int32 (n_out,)).

    A row of a table built on the host: jax's `n_in / n_out` is not torch's float32 division (XLA turns the
    division by a constant into a multiplication by its reciprocal, TPUs divide approximately).
    """
    import jax.numpy as jnp

    table = _nearest_table(int(n_out), int(max_n_in))
    return jnp.asarray(table)[jnp.clip(jnp.asarray(n_in, jnp.int32), 1, max_n_in)]


@functools.lru_cache(maxsize=16)
def _nearest_table(n_out: int, max_n_in: int) -> np.ndarray:
    """(max_n_in + 1, n_out) int32: row n = torch_nearest_index(n, n_out) (row 0 unused)."""
    table = np.zeros((max_n_in + 1, n_out), np.int32)
    for n in range(1, max_n_in + 1):
        table[n] = torch_nearest_index(n, n_out)
    table.flags.writeable = False
    return table


# ----------------------------------------------------------------------------------------------------
# Bilinear, align_corners=True
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def torch_bilinear_align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) along one axis of ``F.interpolate(..., 'bilinear', align_corners=True)``, computed in
    float32 like torch's CPU kernel (int32 indices, float32 weights; read-only, cached)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0).astype(np.int32)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.flags.writeable = False
    return i0, i1, w0, w1


def _separable(img: np.ndarray, ty, tx) -> np.ndarray:
    """w_y0 * (w_x0 * x[y0, x0] + w_x1 * x[y0, x1]) + w_y1 * (...) in float32: torch's CPU kernel's order
    (along x first), so the rounding is torch's too."""
    y0, y1, wy0, wy1 = ty
    x0, x1, wx0, wx1 = tx
    img = np.asarray(img, np.float32)
    ex = (None, slice(None)) + (None,) * (img.ndim - 2)
    cols = img[:, x0] * wx0[ex] + img[:, x1] * wx1[ex]
    ey = (slice(None),) + (None,) * (img.ndim - 1)
    return (cols[y0] * wy0[ey] + cols[y1] * wy1[ey]).astype(np.float32)


def torch_bilinear_align_corners(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) any numeric dtype -> float32 (h, w[, C]) as ``F.interpolate(mode='bilinear',
    align_corners=True)`` on the float32 image."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return np.asarray(image, np.float32)
    return _separable(image, torch_bilinear_align_corners_taps(h, int(size[0])),
                      torch_bilinear_align_corners_taps(w, int(size[1])))


def torch_bilinear_align_corners_u8(image: np.ndarray, oh: int, ow: int, out: np.ndarray | None = None,
                                    origin: tuple[float, float] = (0.0, 0.0),
                                    scale: tuple[float, float] | None = None) -> np.ndarray:
    """`torch_bilinear_align_corners` of a uint8 (H, W, 3) image, rounded to uint8, within 1 level.

    One ``cv2.warpAffine`` with the inverse map src = origin + dst * (n_in - 1) / (n_out - 1) (OpenCV samples
    at 1/32-px positions with fixed-point weights, hence "within 1 level"). `origin` / `scale` (src pixels per
    dst pixel, (y, x)) evaluate a sub-rectangle of a larger resize: output pixel (i, j) is then the full
    resize's pixel (i + oy / sy, j + ox / sx). `image` may be a strided window; `out`, when given, is written
    in place (C-contiguous (oh, ow, 3)).
    """
    import cv2

    h, w = image.shape[:2]
    if scale is None:
        scale = ((h - 1) / (oh - 1) if oh > 1 else 0.0, (w - 1) / (ow - 1) if ow > 1 else 0.0)
    m = np.array([[scale[1], 0.0, origin[1]], [0.0, scale[0], origin[0]]])
    res = cv2.warpAffine(image, m, (ow, oh), dst=out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    if out is not None and res is not out and not np.shares_memory(res, out):
        out[...] = res
        return out
    return res


def torch_bilinear_align_corners_jax(x, size: tuple[int, int]):
    """(B, h, w) -> float32 (B, H, W) as ``F.interpolate(mode='bilinear', align_corners=True)``, in jax."""
    import jax.numpy as jnp

    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 3:
        raise ValueError(f"torch_bilinear_align_corners_jax: expected (B, h, w), got shape {tuple(x.shape)}")
    H, W = int(size[0]), int(size[1])
    if (x.shape[1], x.shape[2]) == (H, W):
        return x
    ty = [jnp.asarray(a) for a in torch_bilinear_align_corners_taps(x.shape[1], H)]
    tx = [jnp.asarray(a) for a in torch_bilinear_align_corners_taps(x.shape[2], W)]
    return bilinear_with_taps_jax(x, ty, tx)


def bilinear_with_taps_jax(x, ty, tx):
    """(B, h, w) -> (B, H, W) from (i0, i1, w0, w1) taps per axis, in torch's order (along x first)."""
    import jax.numpy as jnp

    y0, y1, wy0, wy1 = ty
    x0, x1, wx0, wx1 = tx
    cols = jnp.take(x, x0, axis=2) * wx0[None, None, :] + jnp.take(x, x1, axis=2) * wx1[None, None, :]
    return jnp.take(cols, y0, axis=1) * wy0[None, :, None] + jnp.take(cols, y1, axis=1) * wy1[None, :, None]


# ----------------------------------------------------------------------------------------------------
# Bilinear with half-pixel centres (align_corners=False), bicubic
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _torch_bilinear_taps(n_in: int, n_out: int):
    # torch: float32 scale, src = scale * (dst + 0.5) - 0.5 as one fused multiply-add (rounded once to
    # float32), clamped at 0.
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def torch_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> float32 (h, w[, C]) as ``F.interpolate(mode='bilinear', align_corners=False)``."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return np.asarray(image, np.float32)
    return _separable(image, _torch_bilinear_taps(h, int(size[0])), _torch_bilinear_taps(w, int(size[1])))


@functools.lru_cache(maxsize=64)
def torch_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of ``F.interpolate(mode='bilinear', align_corners=False)`` along one axis
    (so a resize of any batch is two small matmuls). Read-only (cached)."""
    i0, i1, w0, w1 = _torch_bilinear_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) float64 matrix of ``F.interpolate(mode='bicubic', align_corners=False)`` along one axis.

    Keys cubic with A=-0.75, source coordinate (dst + 0.5) * n_in / n_out - 0.5, taps clamped to the edge;
    float64 so a resized table equals torch's to float32 rounding. Read-only (cached).
    """

    def c1(x: float) -> float:
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def c2(x: float) -> float:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = scale * (o + 0.5) - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        for k, wt in enumerate((c2(t + 1), c1(t), c1(1 - t), c2(2 - t))):
            m[o, min(max(i0 - 1 + k, 0), n_in - 1)] += wt
    m.flags.writeable = False
    return m


# ----------------------------------------------------------------------------------------------------
# OpenCV and PIL
# ----------------------------------------------------------------------------------------------------
def cv2_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> float32 (h, w[, C]) by ``cv2.resize(float32 image, (w, h), INTER_LINEAR)`` (PFENet's
    test resize)."""
    import cv2

    h, w = image.shape[:2]
    img = np.asarray(image, np.float32)
    if (h, w) == tuple(size):
        return img
    return cv2.resize(img, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def cv2_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) -> (h, w[, C]) by ``cv2.resize(image, (w, h), INTER_NEAREST)`` (PFENet's label resize;
    OpenCV's double-precision scale picks other rows than `torch_nearest` for some sizes)."""
    import cv2

    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)


def pil_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W[, 3]) -> uint8 (h, w[, 3]) by ``PIL.Image.resize((w, h), BILINEAR)`` (antialiased when
    shrinking), as HF's `ViTImageProcessor` / `CLIPSegProcessor` resize."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((int(size[1]), int(size[0])), Image.BILINEAR))
