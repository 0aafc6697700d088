"""clipseg_jax.polygons reproduces skimage.draw.polygon2mask (the original's rasteriser), pixel for pixel."""

import numpy as np
import pytest

from clipseg_jax.polygons import polygon_mask, polygons_mask

skdraw = pytest.importorskip("skimage.draw")


def skimage_mask(shape, poly_xy) -> np.ndarray:
    """What CLIPSeg calls: polygon2mask((H, W), [(y, x) ...])."""
    return skdraw.polygon2mask(shape, np.asarray(poly_xy, np.float64)[:, ::-1])


def random_polygons(rng, n, h, w):
    kinds = ("lattice", "half", "float", "rect", "thin")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        k = int(rng.integers(3, 10))
        if kind == "lattice":    # vertices on pixel centres: edge and vertex pixels decide the result
            p = rng.integers(-3, max(h, w) + 3, (k, 2)).astype(np.float64)
        elif kind == "half":     # half-integer vertices: edges pass exactly between and through centres
            p = rng.integers(-6, 2 * max(h, w) + 6, (k, 2)) / 2.0
        elif kind == "float":
            p = rng.random((k, 2)) * [w + 6, h + 6] - 3
        elif kind == "rect":     # axis-aligned: whole rows and columns on the edge
            x0, x1 = np.sort(rng.integers(-2, w + 2, 2))
            y0, y1 = np.sort(rng.integers(-2, h + 2, 2))
            p = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        else:                    # slivers and degenerate (collinear) polygons
            a = rng.integers(0, max(h, w), 2).astype(np.float64)
            d = rng.integers(-5, 6, 2).astype(np.float64)
            p = np.stack([a, a + d, a + 2 * d + rng.integers(0, 2, 2)])
        yield kind, p.tolist()


@pytest.mark.parametrize("shape", [(17, 23), (40, 31), (64, 64)])
def test_polygon_mask_equals_skimage(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    h, w = shape
    checked = {"edge_or_vertex": 0}
    for kind, poly in random_polygons(rng, 150, h, w):
        ours, ref = polygon_mask(shape, poly), skimage_mask(shape, poly)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{kind} {poly}")
        p = np.asarray(poly)
        on_lattice = (p == np.round(p)).all(1) & (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
        if on_lattice.any():  # vertex pixels are set: the case an interior-only rasteriser gets wrong
            assert ref[p[on_lattice, 1].astype(int), p[on_lattice, 0].astype(int)].all()
            checked["edge_or_vertex"] += 1
    assert checked["edge_or_vertex"] > 50


def test_union_of_instances_equals_skimage_union():
    rng = np.random.default_rng(3)
    h, w = 30, 45
    for _ in range(30):
        polys = [p for _, p in random_polygons(rng, int(rng.integers(1, 5)), h, w)]
        instances = [polys[: len(polys) // 2 + 1], polys[len(polys) // 2 + 1:]]
        ref = np.zeros((h, w), bool)
        for inst in instances:
            for p in inst:
                ref |= skimage_mask((h, w), p)
        np.testing.assert_array_equal(polygons_mask(instances, h, w), ref.astype(np.uint8))
