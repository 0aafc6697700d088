"""PC+ tf.data pipeline: epochs, negatives, supports, sharding, determinism, resume, rendering."""
import json
import logging
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipseg_jax.prompts import (
    TEMPLATES_SHUFFLE_PLUS,
    VISUAL_PROMPT_MODES,
    render_visual_prompt,
    resize_bilinear_align_corners,
    resize_nearest,
)
from data_pipelines.pcplus import PCPlus, PCPlusIterator, eval_dataset, find_square_crop, resize_image, resize_mask
from data_pipelines.sources import CachedSource, OwnDataSource, TfdsSource, build_cache
from data_fixtures import data_dir, manual_dir  # noqa: F401


@pytest.fixture(scope="module")
def source(data_dir):
    return TfdsSource("train", data_dir)


SMALL = 96  # statistical tests run at a small output size: same code path, 13x fewer pixels


def take(pipe, n_batches, start=0):
    it = pipe.iterator(start, n_batches)
    batches = list(it)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_batch_format(source):
    b = next(PCPlus(source, batch_size=4, seed=0, process_index=0, process_count=1).iterator(0, 1))
    assert b["image"].shape == (4, 352, 352, 3) and b["image"].dtype == np.uint8
    assert b["mask"].shape == (4, 352, 352) and b["mask"].dtype == np.uint8
    assert b["support_image"].shape == (4, 352, 352, 3) and b["support_image"].dtype == np.uint8
    for k in ("prompt", "phrase"):
        assert b[k].shape == (4,) and all(isinstance(x, bytes) for x in b[k])
    assert b["negative"].dtype == bool and b["support_valid"].dtype == bool
    assert set(np.unique(b["mask"])) <= {0, 1}


def test_every_task_once_per_epoch_and_reshuffled(source):
    n = len(source)
    pipe = PCPlus(source, batch_size=1, seed=0, process_index=0, process_count=1, negative_prob=0.0, image_size=SMALL)
    s = take(pipe, 2 * n)["task_index"]
    e0, e1 = s[:n], s[n:]
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert list(e0) != list(e1)


def test_negatives_supports_and_prompts(source):
    n = len(source)
    pipe = PCPlus(source, batch_size=8, seed=1, process_index=0, process_count=1, image_size=SMALL)
    b = take(pipe, (12 * n) // 8)
    phrases = np.asarray(source.phrases)
    count = Counter(source.phrases)
    neg = b["negative"]
    assert 0.14 < neg.mean() < 0.26, neg.mean()
    assert (b["mask"][neg] == 0).all()
    true_phrase = phrases[b["task_index"]]
    got = np.array([p.decode() for p in b["phrase"]])
    assert (got[~neg] == true_phrase[~neg]).all()
    assert (got[neg] != true_phrase[neg]).all()
    # positives keep foreground: the crop search keeps >= 5 % of the object area nearly always
    assert (b["mask"][~neg].reshape((~neg).sum(), -1).sum(1) > 0).mean() > 0.95
    # supports: same phrase, never the query, valid iff another task has this phrase
    valid = b["support_valid"]
    sup = b["support_index"]
    assert (phrases[sup[valid]] == got[valid]).all()
    assert (sup[valid] != b["task_index"][valid]).all()
    expected_valid = np.array([count[p] - (0 if ng else 1) >= 1 for p, ng in zip(got, neg)])
    assert (valid <= expected_valid).all() and valid.sum() >= 0.9 * expected_valid.sum()
    assert valid.any() and (~valid).any()
    assert (b["support_image"][~valid] == 0).all() and (sup[~valid] == -1).all()
    # prompts: one of the 9 templates around the phrase, all templates used
    used = Counter()
    for p, ph in zip(b["prompt"], got):
        hits = [i for i, t in enumerate(TEMPLATES_SHUFFLE_PLUS) if t.format(ph) == p.decode()]
        assert hits, (p, ph)
        used[hits[0]] += 1
    assert len(used) >= 8


def test_original_support_rule_may_pick_query(source):
    pipe = PCPlus(source, batch_size=16, seed=2, process_index=0, process_count=1, negative_prob=0.0,
                  support_excludes_query=False, image_size=SMALL)
    b = take(pipe, 8)
    count = Counter(source.phrases)
    phr = np.array([p.decode() for p in b["phrase"]])
    expected = np.array([count[p] > 1 for p in phr])
    assert (b["support_valid"] <= expected).all()
    assert (b["support_index"] == b["task_index"])[b["support_valid"]].any()


def test_two_hosts_disjoint(source):
    n = len(source)
    per = n // 2
    a = take(PCPlus(source, batch_size=1, seed=4, process_index=0, process_count=2, image_size=SMALL), per)["task_index"]
    b = take(PCPlus(source, batch_size=1, seed=4, process_index=1, process_count=2, image_size=SMALL), per)["task_index"]
    assert len(set(a)) == per and len(set(b)) == per and not set(a) & set(b)


def test_same_seed_same_batches_different_seed_differs(source):
    kw = dict(batch_size=4, process_index=0, process_count=1, image_size=SMALL)
    a = take(PCPlus(source, seed=7, **kw), 3)
    b = take(PCPlus(source, seed=7, num_parallel_calls=1, **kw), 3)
    c = take(PCPlus(source, seed=8, **kw), 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["task_index"], c["task_index"])


def test_resume_yields_same_next_batch(source):
    pipe = PCPlus(source, batch_size=3, seed=9, process_index=0, process_count=1, image_size=SMALL)
    ref = list(pipe.iterator(0, 6))
    it = pipe.iterator()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.state()))  # survives serialisation
    resumed = PCPlusIterator.restore(PCPlus(source, batch_size=3, seed=9, process_index=0, process_count=1,
                                            image_size=SMALL), state)
    nxt = next(resumed)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], ref[4][k])
    with pytest.raises(ValueError, match="seed"):
        PCPlusIterator.restore(PCPlus(source, batch_size=3, seed=10, process_index=0, process_count=1), state)


@pytest.mark.parametrize("box", [(30, 70, 20, 45), (0, 5, 0, 60), (80, 96, 90, 96), (0, 96, 0, 96)])
@pytest.mark.parametrize("mode", VISUAL_PROMPT_MODES)
def test_pipeline_rendering_matches_numpy(source, mode, box):
    rng = np.random.default_rng(0)
    img = np.clip(resize_bilinear_align_corners(rng.integers(0, 256, (12, 12, 3)), (96, 96))
                  + rng.normal(0, 8, (96, 96, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[box[0]:box[1], box[2]:box[3]] = 1  # interior, touching the top / bottom-right borders, full
    pipe = PCPlus(source, batch_size=1, visual_prompt_mode=mode, image_size=96, process_index=0, process_count=1)
    ours = pipe._render(tf.constant(img), tf.constant(mask)).numpy()
    ref = render_visual_prompt(img, mask, mode, size=96)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_resize_and_crop_rules():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (50, 70, 3)).astype(np.uint8)
    ref = np.clip(np.rint(resize_bilinear_align_corners(img, (35, 90))), 0, 255)
    assert np.abs(resize_image(tf.constant(img), 35, 90).numpy().astype(int) - ref).max() <= 1
    m = (rng.random((50, 70)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(tf.constant(m), 352, 352).numpy(), resize_nearest(m, (352, 352)))
    # find_crop == the original rule on the same random offsets: first window with foreground
    # > 5 % of H*W, else the first window with the most foreground.
    mask = np.zeros((300, 100), np.uint8)
    mask[250:290, 20:80] = 1
    n_ok = 0
    for s in range(20):
        seed = tf.constant([s, 1], tf.int64)
        oy, ox, side = (int(v) for v in find_square_crop(tf.constant(mask), seed))
        offs = tf.random.stateless_uniform([50], seed=seed, minval=0, maxval=201, dtype=tf.int32).numpy()
        sums = np.array([mask[o:o + 100].sum() for o in offs])
        ok = sums > 0.05 * 300 * 100
        assert side == 100 and ox == 0
        assert oy == (offs[np.argmax(ok)] if ok.any() else offs[np.argmax(sums)])
        n_ok += ok.any()
    assert n_ok >= 15


def _write_own_data(root, n=6):
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        h, w = 60 + 7 * i, 90 - 5 * i
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        m = np.zeros((h, w), np.uint8)
        m[10:40, 10:40] = 255
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(img).save(root / f"img{i}.{ext}")
        Image.fromarray(m).save(root / f"mask{i}.png")
        lines.append({"image": f"img{i}.{ext}", "mask": f"mask{i}.png", "phrase": "cat" if i < 3 else f"dog {i}"})
    return lines


def test_own_data_through_pcplus(tmp_path, caplog):
    root = tmp_path / "own"
    lines = _write_own_data(root)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines.append({"image": "bad.jpg", "mask": "mask0.png", "phrase": "bad"})
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with caplog.at_level(logging.WARNING):
        src = OwnDataSource(root)
    assert len(src) == 6 and src.skipped["unreadable_file"] == 1
    assert any("bad.jpg" in r.getMessage() for r in caplog.records)
    b = take(PCPlus(src, batch_size=6, seed=0, process_index=0, process_count=1, negative_prob=0.0), 1)
    assert sorted(b["task_index"]) == list(range(6))
    assert b["image"].shape == (6, 352, 352, 3)
    cats = np.array([p == b"cat" for p in b["phrase"]])
    assert b["support_valid"][cats].all() and not b["support_valid"][~cats].any()
    assert (b["mask"].reshape(6, -1).max(1) == 1).all()


def test_own_data_missing_file_names_it(tmp_path):
    root = tmp_path / "own"
    lines = _write_own_data(root, 2)
    lines[1]["mask"] = "nope.png"
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        OwnDataSource(root)
    (root / "annotations.jsonl").write_text('{"image": "img0.png"}\n')
    with pytest.raises(ValueError, match=r"annotations.jsonl:1: missing"):
        OwnDataSource(root)


def test_cached_source(source, tmp_path):
    cache = build_cache(source, tmp_path / "cache")
    cs = CachedSource(cache)
    assert cs.phrases == source.phrases and cs.pre_resized == 352
    for i in (0, len(source) - 1):
        img, m = cs.load(tf.constant(i, tf.int64))
        assert min(img.shape[:2]) == 352 and img.shape[:2] == m.shape
        oi, om = source.load(tf.constant(i, tf.int64))
        assert abs(img.shape[0] / img.shape[1] - oi.shape[0] / oi.shape[1]) < 0.02
        assert abs(m.numpy().mean() - om.numpy().mean()) < 0.01
    n = len(cs)
    b = take(PCPlus(cs, batch_size=1, seed=0, process_index=0, process_count=1), n)
    assert sorted(b["task_index"]) == list(range(n))
    assert b["support_valid"].any()


def test_eval_dataset(source):
    batches = list(eval_dataset(source, batch_size=8, process_index=0, process_count=1).as_numpy_iterator())
    idx = np.concatenate([b["task_index"] for b in batches])
    assert list(idx) == list(range(len(source)))
    assert batches[0]["image"].shape[1:] == (352, 352, 3)


def test_make_pcplus_from_config(data_dir, tmp_path):
    from configs.data_phrasecut import get_config
    from data_pipelines import make_pcplus
    from data_pipelines.own_data import main as own_main

    cfg = get_config()
    cfg.data_dir = str(data_dir)
    pipe = make_pcplus(cfg, batch_size=2, process_index=0, process_count=1, image_size=SMALL)
    b = next(pipe.iterator(0, 1))
    assert b["image"].shape == (2, SMALL, SMALL, 3) and pipe.negative_prob == 0.2
    cfg.source = "nope"
    with pytest.raises(ValueError, match="config.source"):
        make_pcplus(cfg)
    root = tmp_path / "own"
    lines = _write_own_data(root, 3)
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    own_main([str(root)])


def test_query_is_a_square_crop_of_the_original_resized(source):
    """End to end: image/mask == bilinear/nearest resize of some min(H,W) window of the fully
    decoded original (so the window-only JPEG decoding is exact), and the window keeps > 5 % of
    the image as foreground whenever every window does."""
    b = take(PCPlus(source, batch_size=8, seed=3, process_index=0, process_count=1, negative_prob=0.0,
                    image_size=SMALL), 3)
    for img, msk, t in zip(b["image"], b["mask"], b["task_index"]):
        full, fmask = (x.numpy() for x in source.load(tf.constant(int(t), tf.int64)))
        h, w = fmask.shape
        side = min(h, w)
        errs = []
        for off in range(max(h, w) - side + 1):
            oy, ox = (off, 0) if h > w else (0, off)
            ref = np.clip(np.rint(resize_bilinear_align_corners(full[oy:oy + side, ox:ox + side], (SMALL, SMALL))), 0, 255)
            errs.append((np.abs(ref - img.astype(float)).max(), oy, ox))
        err, oy, ox = min(errs)
        assert err <= 1, err
        mcrop = fmask[oy:oy + side, ox:ox + side]
        np.testing.assert_array_equal(msk, resize_nearest(mcrop, (SMALL, SMALL)))
        windows = [fmask[o:o + side].sum() if h > w else fmask[:, o:o + side].sum() for o in range(max(h, w) - side + 1)]
        if min(windows) > 0.05 * h * w:
            assert mcrop.sum() > 0.05 * h * w


def test_jpeg_window_decoding_is_exact(manual_dir):
    from data_pipelines.sources import _decode_jpeg_window

    for path in sorted((manual_dir / "images").glob("*.jpg"))[:6]:
        data = tf.constant(path.read_bytes())
        full = tf.io.decode_jpeg(data, channels=3).numpy()
        h, w = full.shape[:2]
        s = min(h, w)
        for off in range(0, max(h, w) - s + 1, 3):
            win = [off, 0, s, s] if h > w else [0, off, s, s]
            got = _decode_jpeg_window(data, tf.constant([h, w]), tf.constant(win)).numpy()
            np.testing.assert_array_equal(got, full[win[0]:win[0] + s, win[1]:win[1] + s])


def test_support_is_rendered_from_a_square_crop_of_the_support_task(source):
    b = take(PCPlus(source, batch_size=8, seed=5, process_index=0, process_count=1, image_size=SMALL), 2)
    checked = 0
    for sup_img, valid, sidx in zip(b["support_image"], b["support_valid"], b["support_index"]):
        if not valid:
            continue
        full, fmask = (x.numpy() for x in source.load(tf.constant(int(sidx), tf.int64)))
        h, w = fmask.shape
        side = min(h, w)
        errs = []
        for off in range(max(h, w) - side + 1):
            oy, ox = (off, 0) if h > w else (0, off)
            m = resize_nearest(fmask[oy:oy + side, ox:ox + side], (SMALL, SMALL))
            if not m.any():
                continue
            img = np.clip(np.rint(resize_bilinear_align_corners(full[oy:oy + side, ox:ox + side], (SMALL, SMALL))),
                          0, 255).astype(np.uint8)
            ref = render_visual_prompt(img, m, "crop_blur_highlight352", size=SMALL)
            errs.append(np.abs(ref.astype(int) - sup_img.astype(int)).max())
        assert min(errs) <= 1
        checked += 1
    assert checked >= 4


def test_cached_fast_window_path_equals_generic_path(source, tmp_path, monkeypatch):
    """CachedSource.load_square_window (crop choice + window copy in numpy) gives exactly the
    batches of the generic path (TF find_square_crop on the decoded record)."""
    cs = CachedSource(build_cache(source, tmp_path / "cache"))
    kw = dict(batch_size=4, seed=11, process_index=0, process_count=1)
    fast = take(PCPlus(cs, **kw), 3)
    monkeypatch.setattr(CachedSource, "load_square_window", None)
    generic = take(PCPlus(cs, **kw), 3)
    assert fast["support_valid"].any()
    for k in fast:
        np.testing.assert_array_equal(fast[k], generic[k])
