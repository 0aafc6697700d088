"""PhraseCut polygon rasterisation (CLIPSeg's convention).

CLIPSeg rasterises every polygon of every instance with
`skimage.draw.polygon2mask((H, W), [p[::-1] for p in poly])` and takes the union. That marks
pixel (row i, col j) when the point (x=j, y=i) lies inside the polygon (even-odd rule), with no
outline and no integer truncation of the vertices. skimage is not a dependency here, so the same
rule is implemented as a vectorised scanline fill.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Polygon = Sequence[Sequence[float]]  # [[x, y], ...] in pixel coordinates (col, row)


def polygon_to_mask(poly: Polygon, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """OR one polygon into a (height, width) uint8 mask and return it."""
    if out is None:
        out = np.zeros((height, width), np.uint8)
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return out
    xs, ys = pts[:, 0], pts[:, 1]
    x0, y0 = xs, ys
    x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
    r_lo = max(0, int(np.ceil(ys.min())))
    r_hi = min(height - 1, int(np.floor(ys.max())))
    if r_lo > r_hi:
        return out
    rows = np.arange(r_lo, r_hi + 1, dtype=np.float64)[:, None]  # (R, 1)
    # Half-open rule on y so a vertex on a scanline is counted once.
    crosses = ((y0 <= rows) & (rows < y1)) | ((y1 <= rows) & (rows < y0))  # (R, E)
    dy = np.where(y1 != y0, y1 - y0, 1.0)
    xint = np.where(crosses, x0 + (rows - y0) * (x1 - x0) / dy, np.inf)
    xint.sort(axis=1)
    # Pairs (x_2k, x_2k+1) of sorted crossings bound the inside spans (even-odd rule).
    a, b = xint[:, 0::2], xint[:, 1::2]
    a = a[:, : b.shape[1]]
    valid = np.isfinite(a) & np.isfinite(b)
    c0 = np.clip(np.ceil(np.where(valid, a, 0)), 0, width).astype(np.int64)
    c1 = np.clip(np.floor(np.where(valid, b, -1)) + 1, 0, width).astype(np.int64)
    keep = valid & (c1 > c0)
    rr = np.broadcast_to(np.arange(len(rows))[:, None], keep.shape)[keep]
    diff = np.zeros((len(rows), width + 1), np.int32)
    np.add.at(diff, (rr, c0[keep]), 1)
    np.add.at(diff, (rr, c1[keep]), -1)
    out[r_lo:r_hi + 1] |= (np.cumsum(diff[:, :width], axis=1) > 0).astype(np.uint8)
    return out


def polygons_to_mask(instances: Sequence[Sequence[Polygon]], height: int, width: int) -> np.ndarray:
    """Union of all polygons of all instances (PhraseCut `Polygons` field) as uint8 {0,1}."""
    out = np.zeros((height, width), np.uint8)
    for polys in instances:
        for poly in polys:
            polygon_to_mask(poly, height, width, out)
    return out
