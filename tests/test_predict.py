"""Predictor: same function as HF processor + model, one encoding per image, bucketed compiles, bad inputs."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clipseg_jax
from clipseg_jax.predict import Predictor, load_image, resize_probs


@pytest.fixture(scope="module")
def pred(tiny_hf_dir):
    return Predictor.from_pretrained(tiny_hf_dir)


def _img(h=120, w=90, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_matches_hf_processor_and_model(tiny_hf_dir, pred):
    """probabilities at 352 == sigmoid(HF logits) for HF's own processor output (PIL bilinear, ImageNet mean/std)."""
    import torch
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    proc = CLIPSegProcessor.from_pretrained(tiny_hf_dir)
    tm = CLIPSegForImageSegmentation.from_pretrained(tiny_hf_dir).eval()
    img = _img()
    texts = ["a cat", "a remote control", "the blue sky."]
    inputs = proc(text=texts, images=[img] * 3, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = torch.sigmoid(tm(**inputs).logits).numpy()
    pixels, sizes = pred.preprocess([img])
    ours = pred.predict_batch(pixels, pred.encode_text(texts))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    full = pred.predict([img], texts)
    assert full.shape == (1, 3, 120, 90) and full.dtype == np.float32
    assert 0 <= full.min() and full.max() <= 1


def test_image_encoded_once_for_all_prompts(pred):
    imgs = [_img(seed=1), _img(seed=2)]
    prompts = [f"prompt number {i}" for i in range(5)]
    many = pred.predict(imgs, prompts)
    for j, p in enumerate(prompts):
        one = pred.predict(imgs, [p])
        np.testing.assert_allclose(many[:, j], one[:, 0], atol=1e-5)


def test_prompt_count_in_same_bucket_does_not_recompile(tiny_hf_dir, lowerings):
    pred = Predictor.from_pretrained(tiny_hf_dir)
    img = _img()
    pred.predict([img], ["a", "b", "c"])          # prompt bucket 4, text bucket 8
    n = len(lowerings)
    assert n > 0
    pred.predict([img], ["d", "e", "f", "g"])     # still bucket 4 / 8
    pred.predict([img], ["h", "i", "j"])
    assert lowerings[n:] == []                    # nothing compiled, not even an eager op
    pred.predict([img], ["k"] * 1)                # new prompt bucket 1 -> the text and segment calls compile again
    assert len(lowerings) > n


def test_pair_chunk_follows_the_device_and_does_not_change_the_result(tiny_hf_dir, pred):
    """On CPU the decoder goes pair by pair (the Predictor's default there); chunks of 3 over 4 prompt slots leave
    a padded group; one batched pass (None) gives the same probabilities."""
    assert pred.device.platform == "cpu" and pred.pair_chunk == 1
    imgs, prompts = [_img(seed=1), _img(seed=2)], ["a cat", "the dog", "a red umbrella"]
    want = pred.predict(imgs, prompts)
    for chunk in (None, 3):
        other = Predictor.from_pretrained(tiny_hf_dir, pair_chunk=chunk)
        assert other.pair_chunk == chunk
        np.testing.assert_allclose(other.predict(imgs, prompts), want, atol=1e-5)
    with pytest.raises(ValueError, match="pair_chunk"):
        Predictor.from_pretrained(tiny_hf_dir, pair_chunk=0)


def test_sizes_differ_returns_list(pred):
    out = pred.predict([_img(100, 80), _img(50, 70)], ["a cat"])
    assert isinstance(out, list) and out[0].shape == (1, 100, 80) and out[1].shape == (1, 50, 70)


def test_resize_on_device_and_threaded_preprocess_match_host_path(tiny_hf_dir, pred):
    """The accelerator defaults (probabilities resized in a jitted matmul, inputs prepared by a thread pool) give
    the host path's result: same sizes, runs of equal sizes across chunk boundaries, a 352x352 image (no resize)."""
    dev = Predictor.from_pretrained(tiny_hf_dir, resize_on_device=True, host_threads=4, max_images_per_call=2)
    imgs = [_img(100, 80, 1), _img(100, 80, 2), _img(100, 80, 3), _img(50, 70, 4), _img(352, 352, 5)]
    prompts = ["a cat", "the dog", "a red umbrella"]
    want, got = pred.predict(imgs, prompts), dev.predict(imgs, prompts)
    assert [g.shape for g in got] == [w.shape for w in want] == [(3, 100, 80)] * 3 + [(3, 50, 70), (3, 352, 352)]
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=1e-5)
    same = dev.predict(imgs[:3], prompts)
    assert same.shape == (3, 3, 100, 80)
    np.testing.assert_allclose(same, np.stack(want[:3]), atol=1e-5)


def test_visual_prompt_path(pred):
    img = _img()
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[20:70, 10:60] = 1
    out = pred.predict([img], ["a cat"], visual_prompts=[(img, mask)])
    assert out.shape == (1, 2, 120, 90)
    from clipseg_jax.prompts import render_visual_prompt

    support = render_visual_prompt(img, mask)[None]
    pixels, _ = pred.preprocess([img])
    direct = pred.predict_visual(pixels, support)
    np.testing.assert_allclose(pred.predict_batch(pixels, pred.encode_rendered(support))[:, 0], direct, atol=1e-6)


def test_bfloat16_predictor(tiny_hf_dir):
    p32 = Predictor.from_pretrained(tiny_hf_dir)
    p16 = Predictor.from_pretrained(tiny_hf_dir, dtype=jnp.bfloat16)
    img = _img()
    a, b = p32.predict([img], ["a cat"]) > 0.5, p16.predict([img], ["a cat"]) > 0.5
    assert (a & b).sum() / max((a | b).sum(), 1) >= 0.97


def test_resize_back_matches_torch_bilinear():
    import torch

    p = np.random.default_rng(0).random((2, 352, 352)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(p)[None], size=(480, 640), mode="bilinear",
                                          align_corners=False)[0].numpy()
    ours = resize_probs(p, 480, 640)  # the library's host path (two matmuls through einsum(optimize=True))
    # torch computes source coordinates in float32; ours in float64: differences ~3e-5 at a few pixels.
    np.testing.assert_allclose(ours, ref, atol=1e-4)


# -- bad input -----------------------------------------------------------------------------------------
def test_image_conversions(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    Image.fromarray(np.full((10, 12), 90, np.uint8), "L").save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").shape == (10, 12, 3)
    Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png")[0, 0].tolist() == [255, 255, 255]
    assert load_image(np.full((4, 4), 0.5)).dtype == np.uint8


def test_bad_images_one_clear_error(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.jpg: not an image"):
        load_image(tmp_path / "text.jpg")
    Image.fromarray(_img(200, 200)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc\.jpg: cannot decode image"):
        load_image(tmp_path / "trunc.jpg")
    with pytest.raises(FileNotFoundError, match=r"missing\.png: no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_empty_prompts_and_long_prompt(pred):
    with pytest.raises(ValueError, match="no prompts"):
        pred.predict([_img()], [])
    with pytest.raises(ValueError, match="images is empty"):
        pred.predict([], ["a cat"])
    long = " ".join(["word"] * 300)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = pred.predict([_img()], [long])
    assert out.shape == (1, 1, 120, 90)
    assert any("truncated to 77" in str(x.message) for x in w)


def test_public_interface(tiny_hf_dir):
    model = clipseg_jax.from_pretrained(tiny_hf_dir)
    x = jnp.zeros((2, 64, 64, 3))
    out = model(x, conditional_embeddings=jnp.ones((2, 24)))
    assert out.logits.shape == (2, 64, 64) and out.conditional_embeddings.shape == (2, 24)
    with pytest.raises(ValueError, match="exactly one of"):
        model(x)
    with pytest.raises(ValueError, match="batch 1, pixel_values has 2"):
        model(x, conditional_embeddings=jnp.ones((1, 24)))
