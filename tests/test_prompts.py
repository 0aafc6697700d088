"""Visual prompt rendering vs a torch port of the original img_preprocess / crop_mask code."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipseg_jax.resize import torch_bilinear_align_corners
from clipseg_jax.prompts import (
    TEMPLATES_SHUFFLE_PLUS,
    VISUAL_PROMPT_MODES,
    apply_template,
    render_visual_prompt,
)

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _gauss_blur_reflect101(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(ksize=15, sigma) on a CHW float tensor, written independently."""
    k = torch.exp(-0.5 * (torch.arange(15, dtype=torch.float64) - 7) ** 2 / sigma**2)
    k = (k / k.sum()).float()
    xp = F.pad(x[None], (7, 7, 7, 7), mode="reflect")  # torch 'reflect' == BORDER_REFLECT_101
    w = (k[:, None] * k[None, :])[None, None].repeat(3, 1, 1, 1)
    return F.conv2d(xp, w, groups=3)[0]


def _reference(img_u8: np.ndarray, seg: np.ndarray, mode: str) -> torch.Tensor:
    """The original's float output for a square input, following datasets/utils.py."""
    img = (torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255 - MEAN) / STD
    seg_t = torch.from_numpy(seg.astype(np.float32))
    params = {
        "crop_blur_highlight352": (3, 0.1, 0.1, 0.0),
        "crop": (1, 1.0, 0.1, 0.0),
        "blur3_highlight01": (3, 0.1, None, -0.01),
        "blur_highlight": (1, 0.5, None, -0.01),
    }
    if mode == "highlight":
        return img * seg_t[None] * 0.85 + 0.15 * img
    if mode == "overlay":
        return img * seg_t
    blur, bg_fac, context, off = params[mode]
    img_bl = _gauss_blur_reflect101(img, blur)
    out = img * seg_t + bg_fac * img_bl * (1 - seg_t)
    if context is not None:
        mask = seg_t
        # crop_mask, verbatim logic (square input, so its H/W swap is harmless)
        bbox = [mask.max(0).values.argmax(), mask.size(0) - mask.max(0).values.flip(0).argmax()]
        bbox += [mask.max(1).values.argmax(), mask.size(1) - mask.max(1).values.flip(0).argmax()]
        bbox = [int(v) for v in bbox]
        width, height = (bbox[3] - bbox[2]), (bbox[1] - bbox[0])
        bbox[0] = int(max(0, bbox[0] - context * height))
        bbox[1] = int(min(mask.size(0), bbox[1] + context * height))
        bbox[2] = int(max(0, bbox[2] - context * width))
        bbox[3] = int(min(mask.size(1), bbox[3] + context * width))
        crop = out[:, bbox[2]:bbox[3], bbox[0]:bbox[1]]
        h, w = crop.shape[1:]
        px1 = px2 = py1 = py2 = 0
        if h > w:
            px1 = (h - w) // 2
            px2 = h - w - px1
        elif w > h:
            py1 = (w - h) // 2
            py2 = w - h - py1
        crop = F.pad(crop, (px1, px2, py1, py2))
        out = F.interpolate(crop[None], (img.shape[1], img.shape[2]))[0]
    return out + off


def _textured(rng, size):
    base = rng.integers(0, 256, size=(size // 8, size // 8, 3)).astype(np.float32)
    img = torch_bilinear_align_corners(base, (size, size)) + rng.normal(0, 10, (size, size, 3))
    img[:3] = 0  # some pure-black pixels exercise the clipping of "- 0.01"
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["crop_blur_highlight352", "crop", "blur3_highlight01", "blur_highlight",
                                  "highlight", "overlay"])
def test_matches_original_after_normalisation(mode):
    rng = np.random.default_rng(0)
    size = 352
    img = _textured(rng, size)
    seg = np.zeros((size, size), np.uint8)
    seg[60:200, 100:170] = 1  # tall object -> padding along x
    seg[210:230, 40:300] = 1
    ours = render_visual_prompt(img, seg, mode=mode, size=size)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    ref = _reference(img, seg, mode)
    ours_norm = (torch.from_numpy(ours).permute(2, 0, 1).float() / 255 - MEAN) / STD
    diff = ((ours_norm - ref) * STD * 255).abs()  # in uint8 units
    # 0.5 quantisation + float32 rounding; clipped pixels (only below 0) are excluded.
    ref_u8 = (ref * STD + MEAN) * 255
    inside = (ref_u8 >= 0) & (ref_u8 <= 255)
    assert diff[inside].max() <= 0.5 + 1e-3
    assert inside.float().mean() > 0.98


def test_crop_mode_pads_with_mean_colour_and_crops_object():
    img = np.full((100, 100, 3), 255, np.uint8)
    seg = np.zeros((100, 100), np.uint8)
    seg[10:90, 40:60] = 1  # 80 x 20 box -> context 8 rows / 2 cols -> 96 x 24 crop, padded to 96 x 96
    out = render_visual_prompt(img, seg, mode="crop_blur_highlight352", size=96)
    mean_u8 = np.rint(np.array([0.485, 0.456, 0.406]) * 255)
    assert np.array_equal(out[48, 0], mean_u8)  # left padding == 0 in normalised space
    assert np.array_equal(out[48, 48], [255, 255, 255])  # object kept at full intensity
    # background context column: 10 % of a blurred white image in normalised space
    bg = ((0.1 * (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
          * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])) * 255
    assert np.abs(out[48, 37].astype(float) - bg).max() <= 1.0


def test_non_square_input_is_resized_first_and_grayscale_accepted():
    img = np.full((40, 80), 128, np.uint8)
    seg = np.zeros((40, 80), bool)
    seg[10:30, 20:60] = True
    out = render_visual_prompt(img, seg, mode="highlight", size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_all_modes_render():
    rng = np.random.default_rng(2)
    img = _textured(rng, 64)
    seg = np.zeros((64, 64), np.uint8)
    seg[20:40, 10:30] = 1
    outs = {m: render_visual_prompt(img, seg, mode=m, size=64) for m in VISUAL_PROMPT_MODES}
    assert VISUAL_PROMPT_MODES[0] == "crop_blur_highlight352"
    assert not np.array_equal(outs["crop_blur_highlight352"], outs["blur3_highlight01"])
    assert np.array_equal(outs["image_only"], img)
    assert (outs["image_black"] == np.rint(np.array([0.485, 0.456, 0.406]) * 255)).all()


@pytest.mark.parametrize(
    "img,seg,mode,msg",
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), "crop", "empty"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((8, 9), np.uint8), "crop", "does not match"),
        (np.zeros((8, 8, 4), np.uint8), np.ones((8, 8), np.uint8), "crop", "(H, W, 3)"),
        (np.zeros((8, 8, 3), np.float32), np.ones((8, 8), np.uint8), "crop", "uint8"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8), "crop", "only 0 and 1"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), "nope", "unknown visual prompt mode"),
    ],
)
def test_bad_input_raises_value_error(img, seg, mode, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        render_visual_prompt(img, seg, mode=mode, size=8)


def test_templates():
    assert len(TEMPLATES_SHUFFLE_PLUS) == 9
    assert TEMPLATES_SHUFFLE_PLUS[0] == "a photo of a {}."
    assert TEMPLATES_SHUFFLE_PLUS[3] == "{}."
    assert all(t.count("{}") == 1 for t in TEMPLATES_SHUFFLE_PLUS)


@pytest.mark.parametrize("template, phrase, expected", [
    ("a cropped photo of a {}.", "a red mug", "a cropped photo of a red mug."),
    ("a photo of a {}.", "An apple", "a photo of a apple."),
    ("a photo of the {}.", "the kettle", "a photo of the kettle."),
    ("a photo of one {}.", "a bike", "a photo of one bike."),
    ("{}.", "a red mug", "a red mug."),                        # no article in the template: kept
    ("an image of a {}.", "red mug", "an image of a red mug."),  # no article in the phrase
    ("a photo of a {}.", "athlete", "a photo of a athlete."),    # 'a' starts a word, not an article
    ("a photo of a {}.", "a", "a photo of a a."),                # nothing would be left
    ("a photo of a {}.", "theatre seats", "a photo of a theatre seats."),
])
def test_templates_do_not_double_an_article(template, phrase, expected):
    assert apply_template(template, phrase) == expected


@pytest.mark.parametrize("mode", VISUAL_PROMPT_MODES)
def test_fast_square_renderer_matches_render_visual_prompt(mode):
    """`render_visual_prompt_square_u8` (used by the PC+ pipeline) equals the reference within 1
    level: objects inside, at the borders, scattered pixels, 1-px strips, full image; also
    written into a strided `out` from a strided image view (a window of a larger array)."""
    from clipseg_jax import prompts

    rng = np.random.default_rng(3)
    for size in (16, 96, 352):
        img = _textured(rng, size)
        masks = []
        for box in [(0.3, 0.7, 0.2, 0.45), (0.0, 0.05, 0.0, 0.6), (0.8, 1.0, 0.9, 1.0), (0.0, 1.0, 0.0, 1.0)]:
            m = np.zeros((size, size), np.uint8)
            y0, y1, x0, x1 = (int(round(v * size)) for v in box)
            m[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
            masks.append(m)
        masks.append((rng.random((size, size)) < 0.02).astype(np.uint8))
        masks[-1][size // 2, size // 3] = 1
        for m in masks:
            ref = render_visual_prompt(img, m, mode, size=size)
            ours = prompts.render_visual_prompt_square_u8(img, m, mode)
            assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, (size, mode)
            big = np.zeros((size + 5, size + 9, 3), np.uint8)
            big[2:2 + size, 4:4 + size] = img
            batch = np.zeros((2, size, size, 3), np.uint8)
            res = prompts.render_visual_prompt_square_u8(big[2:2 + size, 4:4 + size], m.astype(bool), mode, out=batch[1])
            assert res is batch[1] or np.shares_memory(res, batch)
            np.testing.assert_array_equal(batch[1], ours)
            assert not batch[0].any()


@pytest.mark.parametrize("mode", VISUAL_PROMPT_MODES)
def test_jax_renderer_matches_render_visual_prompt(mode):
    """`render_visual_prompt_jax` (jitted, vmapped over a batch) equals the reference within 1
    level: objects inside, at the borders, scattered pixels, 1-px strips, full image."""
    import jax

    from clipseg_jax.prompts_jax import render_visual_prompt_jax

    render = jax.jit(jax.vmap(lambda i, m: render_visual_prompt_jax(i, m, mode)))
    rng = np.random.default_rng(4)
    for size in (16, 96):
        img = _textured(rng, size)
        masks = []
        for box in [(0.3, 0.7, 0.2, 0.45), (0.0, 0.05, 0.0, 0.6), (0.8, 1.0, 0.9, 1.0), (0.0, 1.0, 0.0, 1.0),
                    (0.5, 0.52, 0.1, 0.9)]:
            m = np.zeros((size, size), np.uint8)
            y0, y1, x0, x1 = (round(v * size) for v in box)
            m[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
            masks.append(m)
        masks.append((rng.random((size, size)) < 0.02).astype(np.uint8))
        masks[-1][size // 2, size // 3] = 1
        got = np.asarray(render(np.repeat(img[None], len(masks), 0), np.stack(masks)))
        for m, ours in zip(masks, got):
            ref = render_visual_prompt(img, m, mode, size=size)
            assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, (size, mode)
