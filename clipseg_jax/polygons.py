"""Polygon rasterisation with CLIPSeg's convention, shared by training data and evaluation.

CLIPSeg rasterises every polygon of every PhraseCut instance with
``skimage.draw.polygon2mask((H, W), [p[::-1] for p in poly])`` and takes the union. That sets
pixel (row r, col c) when the point (x=c, y=r) is inside the polygon, on one of its edges or
on a vertex (skimage's ``point_in_polygon`` != OUTSIDE: O'Rourke's crossing test, which makes
a self-overlapping region follow the even-odd rule), with no outline and no integer
truncation of the vertices, within the bounding box that skimage scans. skimage is not a
dependency here, so the same test is re-implemented below, vectorised:

* skimage counts, per pixel, the edges whose crossing with the pixel's row lies to its right
  (``r_cross``, edges that straddle the row upwards) and to its left (``l_cross``, edges that
  straddle it downwards); the pixel is on the polygon when either count is odd (or it is a
  vertex).  Along a row, "crossing to the right" holds for a prefix of the columns and "to
  the left" for a suffix, so both parities are prefix-XORs over the row: one toggle per
  (row, edge) plus a cumulative sum over the bounding box.
* Only the few columns next to each crossing (where the sign of skimage's floating-point
  crossing value could depend on rounding) are decided by evaluating skimage's own
  expression, bit for bit, so pixels exactly on an edge come out as in skimage.

Cost: O(box area + rows x edges), instead of a per-pixel, per-edge test.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["polygon_mask", "polygons_mask"]

Polygon = Sequence[Sequence[float]]  # [[x, y], ...] in pixel coordinates (col, row)

_EPS = 1e-12  # skimage's vertex tolerance
# Columns lo .. lo + _NEAR - 1 around a crossing at x = X (lo = floor(X) - 1) are tested
# exactly; every other column is at least 2 px from the crossing, far beyond rounding error.
_NEAR = 4


def _parity_runs(toggles: np.ndarray, size: int) -> np.ndarray:
    """bool (size,): True where an odd number of toggle positions are <= the index (a prefix
    XOR, built from runs; every row holds an even number of toggles, so rows do not leak)."""
    edges = np.concatenate(([0], np.sort(toggles), [size]))
    return np.repeat((np.arange(len(edges) - 1) & 1).astype(bool), np.diff(edges))


def _fill(out: np.ndarray, points) -> None:
    """OR the skimage ``polygon2mask`` of one polygon ((x, y) points) into ``out`` (H, W) bool."""
    H, W = out.shape
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(pts)
    if n == 0:
        return
    xp, yp = pts[:, 0], pts[:, 1]
    # skimage's scan box: int() of max(0, min) (truncation), ceil of max, clipped to the image.
    minr = int(max(0.0, yp.min()))
    maxr = min(H - 1, math.ceil(yp.max()))
    minc = int(max(0.0, xp.min()))
    maxc = min(W - 1, math.ceil(xp.max()))
    if maxr < minr or maxc < minc:
        return
    R, C = maxr - minr + 1, maxc - minc + 1

    # (edge, row) pairs that can straddle: edge i joins vertex i and vertex i-1 (skimage's order).
    xa, ya = xp, yp                          # vertex i     (skimage's x0, y0 before the shift)
    xb, yb = np.roll(xp, 1), np.roll(yp, 1)  # vertex i - 1 (skimage's x1, y1)
    lo_y = np.minimum(ya, yb)
    hi_y = np.maximum(ya, yb)
    r0 = np.clip(np.ceil(lo_y), minr, maxr + 1).astype(np.int64)
    r1 = np.clip(np.floor(hi_y), minr - 1, maxr).astype(np.int64)
    cnt = np.maximum(r1 - r0 + 1, 0)
    total = int(cnt.sum())
    toggles_r: list[np.ndarray] = []  # flat indices into the (R, C + 1) parity difference arrays
    toggles_l: list[np.ndarray] = []
    if total:
        e = np.repeat(np.arange(n), cnt)
        start = np.repeat(np.cumsum(cnt) - cnt, cnt)
        row = (r0[e] + (np.arange(total) - start)).astype(np.float64)
        a = ya[e] - row  # skimage's y0
        b = yb[e] - row  # skimage's y1
        up = (a > 0) != (b > 0)
        down = (a < 0) != (b < 0)
        keep = up | down
        e, row, a, b, up, down = e[keep], row[keep], a[keep], b[keep], up[keep], down[keep]
        if len(e):
            xe0, xe1 = xa[e], xb[e]
            den = b - a  # never 0 for a straddling edge
            # Crossing abscissa (approximate; only used to find the columns to test exactly).
            X = (xe0 * b - xe1 * a) / den
            lo = np.floor(np.clip(X, minc - _NEAR - 2, maxc + 2)).astype(np.int64) - 1
            ri = (row.astype(np.int64) - minr) * (C + 1)
            # Columns < lo: crossing to the right -> r_cross toggles on the prefix [minc, lo).
            pre = np.clip(lo, minc, maxc + 1) - minc
            toggles_r += [ri[up], (ri + pre)[up]]
            # Columns > lo + _NEAR - 1: crossing to the left -> l_cross toggles on that suffix.
            suf = np.clip(lo + _NEAR, minc, maxc + 1) - minc
            toggles_l += [(ri + suf)[down], (ri + C)[down]]
            # The columns in between: skimage's expression, same operations in the same order.
            cols = lo[:, None] + np.arange(_NEAR)
            inb = (cols >= minc) & (cols <= maxc)
            cf = cols.astype(np.float64)
            x0 = xe0[:, None] - cf
            x1 = xe1[:, None] - cf
            cross = (x0 * b[:, None] - x1 * a[:, None]) / den[:, None]
            cidx = ri[:, None] + (cols - minc)
            hit_r = inb & up[:, None] & (cross > 0)
            hit_l = inb & down[:, None] & (cross < 0)
            toggles_r += [cidx[hit_r], cidx[hit_r] + 1]
            toggles_l += [cidx[hit_l], cidx[hit_l] + 1]

    flat = np.zeros(R * (C + 1), bool)
    for toggles in (toggles_r, toggles_l):
        if toggles:
            flat |= _parity_runs(np.concatenate(toggles), R * (C + 1))
    region = flat.reshape(R, C + 1)[:, :C]

    # Vertices within skimage's eps of a grid point are on the polygon.
    vc, vr = np.round(xp), np.round(yp)
    on = (np.abs(xp - vc) < _EPS) & (np.abs(yp - vr) < _EPS) & (vr >= minr) & (vr <= maxr) & (vc >= minc) & (vc <= maxc)
    if on.any():
        region[vr[on].astype(np.int64) - minr, vc[on].astype(np.int64) - minc] = True

    out[minr:maxr + 1, minc:maxc + 1] |= region


def polygon_mask(shape: tuple[int, int], points) -> np.ndarray:
    """``skimage.draw.polygon2mask(shape, [(y, x) ...])`` for a polygon given as (x, y) points:
    bool (H, W), pixel (r, c) set when (x=c, y=r) is inside, on an edge or on a vertex."""
    out = np.zeros(tuple(int(s) for s in shape), bool)
    _fill(out, points)
    return out


def polygons_mask(instances: Sequence[Sequence[Polygon]], height: int, width: int) -> np.ndarray:
    """Union of ``polygon_mask`` over all polygons of all instances (PhraseCut's ``Polygons``
    field: instances -> polygons -> (x, y) points), as uint8 {0, 1} of shape (height, width)."""
    out = np.zeros((int(height), int(width)), bool)
    for polys in instances:
        for poly in polys:
            _fill(out, poly)
    return out.view(np.uint8)
