"""`clipseg_jax.resize`: each function against the library call it is named after, over sweeps of sizes."""

import numpy as np
import pytest

from clipseg_jax import resize as R

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Downscaling, upscaling, odd ratios, 1-pixel sides, identity.
SIZE_PAIRS = [(n, m) for n in (1, 2, 3, 7, 20, 33, 64, 208, 351, 352, 368, 500, 799) for m in (1, 5, 64, 352, 400)]


def _torch_resize(x: np.ndarray, size, **kw) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    r = F.interpolate(t, size=tuple(size), **kw)[0]
    return (r.permute(1, 2, 0) if x.ndim == 3 else r[0]).numpy()


def _assert_like_torch_float32(ours, x: np.ndarray, size, what: str, **kw) -> np.ndarray:
    """`ours` is as close to torch's float64 result as torch's own float32 result is (within one float32 ulp of the
    values' scale). Not a match to torch's float32 bits: those depend on torch's thread count (1 vs 2 threads differ
    by up to 3 ulp for some sizes), so a fixed tolerance to them fails or passes with `OMP_NUM_THREADS`.
    Returns torch's float32 result."""
    ref64 = _torch_resize(x.astype(np.float64), size, **kw)
    ref32 = _torch_resize(x, size, **kw)
    err_torch = np.abs(ref32.astype(np.float64) - ref64).max()
    err_ours = np.abs(np.asarray(ours, np.float64) - ref64).max()
    ulp = float(np.spacing(np.float32(np.abs(ref64).max())))
    assert err_ours <= err_torch + ulp, f"{what}: max error to torch float64 {err_ours:.3g}, torch float32's {err_torch:.3g}"
    return ref32


def test_torch_nearest_index_every_size_to_352_and_back():
    """Every n in 1..800 -> 352 and 352 -> n, as torch's own kernel picks them."""
    for n in range(1, 801):
        for a, b in ((n, 352), (352, n)):
            src = torch.arange(a, dtype=torch.float32).reshape(1, 1, a, 1)
            want = F.interpolate(src, size=(b, 1), mode="nearest")[0, 0, :, 0].numpy().astype(np.int64)
            np.testing.assert_array_equal(R.torch_nearest_index(a, b), want, err_msg=f"{a} -> {b}")


def test_exact_integer_floor_is_not_torch_nearest():
    """Why the float32 rule: floor(dst * in / out) in exact arithmetic picks other rows for some sizes
    (the rule this project used before for training masks)."""
    exact = lambda a, b: np.minimum(np.arange(b) * a // b, a - 1)  # noqa: E731
    differ = [n for n in range(20, 800) if not np.array_equal(exact(n, 352), R.torch_nearest_index(n, 352))]
    assert 208 in differ and 368 in differ and len(differ) == 23


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, bool])
def test_torch_nearest_sweep(dtype):
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS, SIZE_PAIRS[::-1]):
        x = rng.integers(0, 200, (h, w, 3)) if dtype is not bool else rng.random((h, w)) < 0.5
        x = x.astype(dtype)
        ref = _torch_resize(x.astype(np.float32), (oh, ow), mode="nearest").astype(dtype)
        np.testing.assert_array_equal(R.torch_nearest(x, (oh, ow)), ref, err_msg=f"{(h, w)} -> {(oh, ow)}")


def test_torch_nearest_index_jax_equals_numpy():
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda n: R.torch_nearest_index_jax(n, 352, 799))
    for n in range(1, 800):
        np.testing.assert_array_equal(np.asarray(f(jnp.int32(n))), R.torch_nearest_index(n, 352), err_msg=str(n))


def test_torch_bilinear_align_corners_sweep():
    rng = np.random.default_rng(1)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS, SIZE_PAIRS[::-1]):
        x = (rng.random((h, w, 3)) * 255).astype(np.float32)
        _assert_like_torch_float32(R.torch_bilinear_align_corners(x, (oh, ow)), x, (oh, ow), f"{(h, w)} -> {(oh, ow)}",
                                   mode="bilinear", align_corners=True)


def test_torch_bilinear_align_corners_u8_within_one_level():
    rng = np.random.default_rng(2)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS, SIZE_PAIRS[::-1]):
        if min(h, w) < 2 or min(oh, ow) < 2:
            continue  # cv2's warp needs 2 px; the pipeline's crops and outputs are >= 2
        x = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        ref = np.rint(_torch_resize(x.astype(np.float32), (oh, ow), mode="bilinear", align_corners=True))
        got = R.torch_bilinear_align_corners_u8(x, oh, ow).astype(np.int64)
        assert np.abs(got - ref).max() <= 1, f"{(h, w)} -> {(oh, ow)}"


def test_torch_bilinear_align_corners_u8_windows_and_sub_rectangles():
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (300, 300, 3)).astype(np.uint8)
    out = np.zeros((2, 64, 80, 3), np.uint8)
    R.torch_bilinear_align_corners_u8(big[3:203, 2:152], 64, 80, out=out[1])  # strided window, in place
    np.testing.assert_array_equal(out[1], R.torch_bilinear_align_corners_u8(np.ascontiguousarray(big[3:203, 2:152]), 64, 80))
    assert not out[0].any()
    img = big[:250, :250]
    full = R.torch_bilinear_align_corners_u8(img, 352, 352)
    sc = 249 / 351
    part = R.torch_bilinear_align_corners_u8(img, 60, 90, origin=(100 * sc, 200 * sc), scale=(sc, sc))
    assert np.abs(part.astype(int) - full[100:160, 200:290]).max() <= 1


def test_torch_bilinear_align_corners_jax_sweep():
    rng = np.random.default_rng(4)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS[::3], SIZE_PAIRS[::-3]):
        x = rng.random((2, h, w)).astype(np.float32)
        ours = np.asarray(R.torch_bilinear_align_corners_jax(x, (oh, ow)))
        for a, o in zip(x, ours):
            _assert_like_torch_float32(o, a, (oh, ow), f"{(h, w)} -> {(oh, ow)}", mode="bilinear", align_corners=True)
    with pytest.raises(ValueError, match=r"expected \(B, h, w\)"):
        R.torch_bilinear_align_corners_jax(np.zeros((4, 4)), (2, 2))


def test_torch_bilinear_and_its_matrix_sweep():
    rng = np.random.default_rng(5)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS, SIZE_PAIRS[::-1]):
        x = (rng.random((h, w, 3)) * 255).astype(np.float32)
        ref = _assert_like_torch_float32(R.torch_bilinear(x, (oh, ow)), x, (oh, ow), f"{(h, w)} -> {(oh, ow)}",
                                         mode="bilinear", align_corners=False)
        mh, mw = R.torch_bilinear_matrix(h, oh), R.torch_bilinear_matrix(w, ow)
        via = np.einsum("oh,hwc,pw->opc", mh, x, mw, optimize=True)
        np.testing.assert_allclose(via, ref, rtol=0, atol=2e-3, err_msg=f"{(h, w)} -> {(oh, ow)} (matrix)")


def test_torch_bicubic_matrix_sweep():
    for n, m in [(14, 22), (22, 14), (22, 22), (14, 30), (7, 3), (2, 9), (1, 4)]:
        x = np.random.default_rng(n * m).random((n, 5))
        t = torch.from_numpy(x).T[None, :, :, None]  # (1, 5, n, 1)
        want = F.interpolate(t, size=(m, 1), mode="bicubic", align_corners=False)[0, :, :, 0].T.numpy()
        np.testing.assert_allclose(R.torch_bicubic_matrix(n, m) @ x, want, rtol=0, atol=1e-12, err_msg=f"{n} -> {m}")


def test_cv2_resizes_are_cv2_resize():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(6)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS, SIZE_PAIRS[::-1]):
        x = (rng.random((h, w, 3)) * 255).astype(np.float32)
        np.testing.assert_array_equal(R.cv2_bilinear(x, (oh, ow)), cv2.resize(x, (ow, oh), interpolation=cv2.INTER_LINEAR))
        lab = x[..., 0].astype(np.uint8)
        np.testing.assert_array_equal(R.cv2_nearest(lab, (oh, ow)), cv2.resize(lab, (ow, oh), interpolation=cv2.INTER_NEAREST))


def test_pil_bilinear_sweep():
    """The (h, w) order and the identity shortcut (HF's processor resizes every image, PIL's identity
    resize is exact)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for (h, w), (oh, ow) in zip(SIZE_PAIRS, SIZE_PAIRS[::-1]):
        x = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        want = np.asarray(Image.fromarray(x).resize((ow, oh), Image.BILINEAR))
        got = R.pil_bilinear(x, (oh, ow))
        assert got.shape == (oh, ow, 3)
        np.testing.assert_array_equal(got, want)
