"""PC+ tf.data pipeline: epochs, negatives, supports, sharding, determinism, resume, rendering."""
import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from clipseg_jax.prompts import (
    TEMPLATES_SHUFFLE_PLUS,
    VISUAL_PROMPT_MODES,
    render_visual_prompt,
)
from clipseg_jax.resize import (
    torch_bilinear_align_corners,
    torch_bilinear_align_corners_u8,
    torch_nearest,
    torch_nearest_index,
)
from data_pipelines.imageops import (
    crop_cumsum,
    decode_image,
    decode_mask,
    pick_square_crop,
)
from data_pipelines.pcplus import PCPlus, PCPlusIterator, eval_dataset
from data_pipelines.sources import (
    CachedSource,
    OwnDataSource,
    Source,
    TfdsSource,
    build_cache,
)


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
    # a batch is a pure function of its step: the numpy `batch(step)` is the iterator's batch
    direct = PCPlus(source, seed=7, **kw).batch(2)
    for k in direct:
        np.testing.assert_array_equal(direct[k], a[k][8:12])


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


class _ArraySource(Source):
    """In-memory tasks (image, mask, phrase) for pipeline unit tests."""

    def __init__(self, items):
        self._items = items
        self.phrases = [p for _, _, p in items]
        self.image_keys = [str(i) for i in range(len(items))]

    def read(self, index):
        image, mask, _ = self._items[index]
        return image, mask


def _textured(rng, h, w):
    base = torch_bilinear_align_corners(rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3)), (h, w))
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", VISUAL_PROMPT_MODES)
def test_support_rendering_matches_reference(mode):
    """The batches' supports (crop search, resize of only the pixels the renderer reads, uint8 render) ==
    render_visual_prompt of the fully resized crop window that the batch's plan names, within 1 level; every task
    serves as a valid support at least once."""
    rng = np.random.default_rng(0)
    items = []
    for h, w, box in [(130, 170, (30, 70, 40, 95)), (150, 110, (0, 20, 0, 60)), (120, 120, (100, 120, 90, 120)),
                      (90, 140, (0, 90, 0, 140)), (200, 160, (80, 83, 70, 72))]:
        m = np.zeros((h, w), np.uint8)
        m[box[0]:box[1], box[2]:box[3]] = 1
        items.append((_textured(rng, h, w), m, "thing"))
    pipe = PCPlus(_ArraySource(items), batch_size=len(items), negative_prob=0.0, visual_prompt_mode=mode,
                  image_size=96, process_index=0, process_count=1)
    seen = set()
    for step in range(20):
        plan, batch = pipe.plan(step), pipe.batch(step)
        for i in np.flatnonzero(batch["support_valid"]):
            t = int(plan["support_task"][i])
            win, mwin = pipe.window(t, plan["support_crop_u"][i])
            img = np.clip(np.rint(torch_bilinear_align_corners(win, (96, 96))), 0, 255).astype(np.uint8)
            ref = render_visual_prompt(img, torch_nearest(mwin, (96, 96)), mode, size=96)
            assert np.abs(batch["support_image"][i].astype(int) - ref.astype(int)).max() <= 1, (mode, step, t)
            seen.add(t)
    assert seen == set(range(len(items))), seen


def test_masks_follow_torch_nearest_where_the_old_rule_did_not():
    """208 -> 352 is one of the 23 sizes in 20..799 where exact floor(dst * in / out), the rule this
    pipeline used before, picks other source rows than torch's float32 'nearest'. The masks now equal
    torch's, and differ from the old rule's only in the rows and columns where the two rules disagree."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (208, 208, 3)).astype(np.uint8), (rng.random((208, 208)) < 0.5).astype(np.uint8),
              f"thing {i}") for i in range(3)]
    pipe = PCPlus(_ArraySource(items), batch_size=3, negative_prob=0.0, image_size=352, with_visual=False,
                  process_index=0, process_count=1)
    batch = pipe.batch(0)
    old = np.arange(352) * 208 // 352
    disagree = old != torch_nearest_index(208, 352)
    assert disagree.any()
    for mask, task in zip(batch["mask"], batch["task_index"]):
        m = items[task][1]  # square: the crop is the whole image
        ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), (352, 352), mode="nearest")
        np.testing.assert_array_equal(mask, ref[0, 0].numpy().astype(np.uint8))
        changed = mask != m[old][:, old]
        assert changed.any() and not changed[~disagree][:, ~disagree].any()


def test_crop_rules():
    # find_crop == the original rule on the same random offsets: first window with foreground
    # > 5 % of H*W, else the first window with the most foreground.
    mask = np.zeros((300, 100), np.uint8)
    mask[250:290, 20:80] = 1
    n_ok = 0
    for s in range(20):
        offs = np.random.default_rng(s).integers(0, 201, 5)  # few tries: the fallback is exercised too
        oy, ox, side = pick_square_crop(mask, offs, 0.05)
        sums = np.array([mask[o:o + 100].sum() for o in offs])
        ok = sums > 0.05 * 300 * 100
        assert side == 100 and ox == 0
        assert oy == (offs[np.argmax(ok)] if ok.any() else offs[np.argmax(sums)])
        n_ok += ok.any()
    assert 0 < n_ok < 20
    oy, ox, side = pick_square_crop(mask.T.copy(), offs, 0.05)  # wide: offsets along x
    assert oy == 0 and side == 100


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


def test_prompts_do_not_double_the_phrase_article(tmp_path):
    root = tmp_path / "own"
    lines = _write_own_data(root, 4)
    for x in lines:
        x["phrase"] = "a red mug"
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    b = take(PCPlus(OwnDataSource(root), batch_size=4, seed=0, process_index=0, process_count=1), 8)
    prompts = {p.decode() for p in b["prompt"]}
    assert len(prompts) == 9 and all("red mug" in p for p in prompts), prompts  # all 9 templates drawn
    assert not [p for p in prompts if any(f"{art} a red" in p for art in ("a", "the", "one"))], prompts
    assert "a red mug." in prompts  # the "{}." template keeps the phrase's article


def test_own_data_empty_mask_rule_is_the_readers(tmp_path):
    """Construction skips a mask as empty exactly when the reader would read no object pixel."""
    root = tmp_path / "own"
    lines = _write_own_data(root, 2)
    faint = np.zeros((60, 90, 3), np.uint8)
    faint[5, 7] = (0, 0, 1)  # gray value 0 under PIL's "L" conversion, but non-zero in blue
    Image.fromarray(faint).save(root / "faint.png")
    Image.fromarray(np.zeros((60, 90), np.uint8)).save(root / "empty.png")
    lines += [{"image": "img0.png", "mask": "faint.png", "phrase": "faint"},
              {"image": "img0.png", "mask": "empty.png", "phrase": "nothing"}]
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (root / "zero.png").write_bytes(b"")  # a 0-byte mask: unreadable, skipped, not a crash
    lines.append({"image": "img0.png", "mask": "zero.png", "phrase": "zero"})
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    src = OwnDataSource(root)
    assert src.phrases == ["cat", "cat", "faint"] and src.skipped == {"empty_mask": 1, "unreadable_file": 1}
    m = src.read_mask(2)
    assert m.sum() == 1 and m[5, 7] == 1


def test_own_data_missing_file_names_it(tmp_path):
    root = tmp_path / "own"
    lines = _write_own_data(root, 2)
    lines[1]["mask"] = "nope.png"
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(ValueError, match=r"annotations.jsonl:2: file not found: .*nope.png"):
        OwnDataSource(root)
    (root / "annotations.jsonl").write_text('{"image": "img0.png"}\n')
    with pytest.raises(ValueError, match=r"annotations.jsonl:1: missing"):
        OwnDataSource(root)


def test_cached_source(source, tmp_path):
    cache = build_cache(source, tmp_path / "cache")
    cs = CachedSource(cache)
    assert cs.phrases == source.phrases and cs.pre_resized == 352
    for i in (0, len(source) - 1):
        img, m = cs.read(i)
        assert min(img.shape[:2]) == 352 and img.shape[:2] == m.shape
        oi, om = source.read(i)
        assert abs(img.shape[0] / img.shape[1] - oi.shape[0] / oi.shape[1]) < 0.02
        assert abs(m.mean() - om.mean()) < 0.01
        np.testing.assert_array_equal(img, torch_bilinear_align_corners_u8(oi, *img.shape[:2]))
    n = len(cs)
    b = take(PCPlus(cs, batch_size=1, seed=0, process_index=0, process_count=1), n)
    assert sorted(b["task_index"]) == list(range(n))
    assert b["support_valid"].any()


def test_eval_dataset(source):
    batches = list(eval_dataset(source, batch_size=8, process_index=0, process_count=1).as_numpy_iterator())
    idx = np.concatenate([b["task_index"] for b in batches])
    assert list(idx) == list(range(len(source)))
    assert batches[0]["image"].shape[1:] == (352, 352, 3)
    # the view of the evaluation protocol (clipseg_jax.evaluate.phrasecut), rounded to uint8
    from clipseg_jax.evaluate.phrasecut import eval_view

    for i in (0, len(source) - 1):
        want_image, want_mask = eval_view(*source.read(i))
        b, j = batches[i // 8], i % 8
        np.testing.assert_array_equal(b["image"][j], np.clip(np.rint(want_image), 0, 255).astype(np.uint8))
        np.testing.assert_array_equal(b["mask"][j], want_mask)
        assert b["phrase"][j].decode() == source.phrases[i]


def test_pipelines_set_their_own_parallelism_without_autotuning(source):
    """Deleting a tf.data iterator whose autotuning thread runs waits for that thread's next round (0-38 s at the
    end of a 200-step training run): the training and evaluation datasets run without it."""
    kw = dict(batch_size=2, process_index=0, process_count=1)
    assert PCPlus(source, **kw).prefetch_depth == 2 and PCPlus(source, prefetch=3, **kw).prefetch_depth == 3
    for ds in (PCPlus(source, **kw).dataset(), PCPlus(source, num_parallel_calls=1, prefetch=1, **kw).dataset(),
               eval_dataset(source, batch_size=8, process_index=0, process_count=1)):
        assert ds.options().autotune.enabled is False


def test_make_pcplus_from_config(data_dir, tmp_path):
    from configs.data_phrasecut import get_config
    from data_pipelines import make_pcplus
    from data_pipelines.own_data import main as own_main

    cfg = get_config()
    cfg.data_dir = str(data_dir)
    pipe = make_pcplus(cfg, batch_size=2, process_index=0, process_count=1, image_size=SMALL)
    b = next(pipe.iterator(0, 1))
    assert b["image"].shape == (2, SMALL, SMALL, 3) and pipe.negative_prob == 0.2 and pipe.workers == 0
    assert pipe.templates == TEMPLATES_SHUFFLE_PLUS  # templates = () -> the paper's
    cfg.templates = ("{}", "picture of {}")
    pipe = make_pcplus(cfg, batch_size=4, process_index=0, process_count=1, image_size=SMALL)
    b = next(pipe.iterator(0, 1))
    assert pipe.templates == ("{}", "picture of {}")
    assert all(p.decode() in (ph.decode(), f"picture of {ph.decode()}") for p, ph in zip(b["prompt"], b["phrase"]))
    cfg.templates = ()
    cfg.workers = 2
    assert make_pcplus(cfg, batch_size=2, process_index=0, process_count=1).workers == 2
    cfg.workers = 0
    cfg.source = "nope"
    with pytest.raises(ValueError, match="config.source"):
        make_pcplus(cfg)
    root = tmp_path / "own"
    lines = _write_own_data(root, 3)
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    own_main([str(root)])


def _square_windows(full, fmask):
    """Every min(H, W) square window along the long axis: (oy, ox, image window, mask window)."""
    h, w = fmask.shape
    side = min(h, w)
    for off in range(max(h, w) - side + 1):
        oy, ox = (off, 0) if h > w else (0, off)
        yield oy, ox, full[oy:oy + side, ox:ox + side], fmask[oy:oy + side, ox:ox + side]


def test_query_is_a_square_crop_of_the_original_resized(source):
    """End to end: image/mask == bilinear/nearest resize of some min(H,W) window of the fully
    decoded original (so the window-only JPEG decoding is exact), and the window keeps > 5 % of
    the image as foreground whenever every window does."""
    b = take(PCPlus(source, batch_size=8, seed=3, process_index=0, process_count=1, negative_prob=0.0,
                    image_size=SMALL), 3)
    for img, msk, t in zip(b["image"], b["mask"], b["task_index"]):
        full, fmask = source.read(int(t))
        h, w = fmask.shape
        side = min(h, w)
        errs = []
        for oy, ox, win, _ in _square_windows(full, fmask):
            ref = np.clip(np.rint(torch_bilinear_align_corners(win, (SMALL, SMALL))), 0, 255)
            errs.append((np.abs(ref - img.astype(float)).max(), oy, ox))
        err, oy, ox = min(errs)
        assert err <= 1, err
        mcrop = fmask[oy:oy + side, ox:ox + side]
        np.testing.assert_array_equal(msk, torch_nearest(mcrop, (SMALL, SMALL)))
        windows = [fmask[o:o + side].sum() if h > w else fmask[:, o:o + side].sum() for o in range(max(h, w) - side + 1)]
        if min(windows) > 0.05 * h * w:
            assert mcrop.sum() > 0.05 * h * w


def test_decoding_matches_pil(manual_dir, tmp_path):
    """OpenCV's libjpeg-turbo decode == PIL's (what the original's loader uses) pixel for pixel
    (TF's decode_jpeg differs from both by a few levels at chroma edges); masks of any channel
    layout become {0,1}; undecodable bytes name the file."""
    for path in sorted((manual_dir / "images").glob("*.jpg"))[:6]:
        ours = decode_image(path.read_bytes())
        np.testing.assert_array_equal(ours, np.asarray(Image.open(path).convert("RGB")))
    m = np.zeros((5, 7), np.uint8)
    m[1:3, 2:5] = 200
    for arr in (m, np.stack([m, 0 * m, 0 * m], -1), np.stack([m, m], -1)):
        p = tmp_path / f"m{arr.ndim}{arr.shape[-1]}.png"
        Image.fromarray(arr).save(p)
        np.testing.assert_array_equal(decode_mask(p.read_bytes()), (m > 0).astype(np.uint8))
    with pytest.raises(ValueError, match="broken.jpg: cannot decode"):
        decode_image(b"\xff\xd8 nope", "broken.jpg")


def test_support_is_rendered_from_a_square_crop_of_the_support_task(source):
    b = take(PCPlus(source, batch_size=8, seed=5, process_index=0, process_count=1, image_size=SMALL), 2)
    checked = 0
    for sup_img, valid, sidx in zip(b["support_image"], b["support_valid"], b["support_index"]):
        if not valid:
            continue
        errs = []
        for _, _, win, mwin in _square_windows(*source.read(int(sidx))):
            m = torch_nearest(mwin, (SMALL, SMALL))
            if not m.any():
                continue
            img = np.clip(np.rint(torch_bilinear_align_corners(win, (SMALL, SMALL))), 0, 255).astype(np.uint8)
            ref = render_visual_prompt(img, m, "crop_blur_highlight352", size=SMALL)
            errs.append(np.abs(ref.astype(int) - sup_img.astype(int)).max())
        assert min(errs) <= 1
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("scale", [255, "bool"])
def test_cache_normalises_mask_values(tmp_path, scale):
    """A source whose masks are 0/255 or bool still gives {0,1} cached masks and matching profiles."""
    rng = np.random.default_rng(2)
    items = []
    for i, (h, w) in enumerate([(40, 70), (90, 50), (60, 60)]):
        m = np.zeros((h, w), np.uint8)
        m[5:25, 10:30] = 1
        m = m.astype(bool) if scale == "bool" else m * np.uint8(scale)
        items.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), m, "thing"))
    cs = CachedSource(build_cache(_ArraySource(items), tmp_path / "cache", size=32))
    for i in range(len(items)):
        m = cs.read_mask(i)
        assert set(np.unique(m)) == {0, 1}
        np.testing.assert_array_equal(cs.crop_cumsum(i), crop_cumsum(m))


def test_cache_crop_profiles(source, tmp_path):
    """The cache's stored crop profiles equal the masks' own, so PC+ picks the same windows."""
    cs = CachedSource(build_cache(source, tmp_path / "cache"))
    for i in range(len(cs)):
        np.testing.assert_array_equal(cs.crop_cumsum(i), crop_cumsum(cs.read_mask(i)))

    class Unprofiled(Source):  # the same cache without its stored profiles
        phrases, image_keys = cs.phrases, cs.image_keys
        pre_resized = cs.pre_resized
        read, read_mask = staticmethod(cs.read), staticmethod(cs.read_mask)

    kw = dict(batch_size=4, seed=3, process_index=0, process_count=1)
    for step in range(3):
        a, b = PCPlus(cs, **kw).batch(step), PCPlus(Unprofiled(), **kw).batch(step)
        for k in ("image", "mask", "support_image"):
            np.testing.assert_array_equal(a[k], b[k])
    m = cs.read_mask(0)
    with pytest.raises(ValueError, match="cumsum has shape"):
        pick_square_crop(m, np.zeros(3, np.int64), 0.05, cumsum=np.zeros(3, np.int64))


def test_cache_errors_and_atomic_build(source, tmp_path):
    cache = build_cache(source, tmp_path / "cache")
    with pytest.raises(FileExistsError, match="exists"):
        build_cache(source, cache)
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"size": 352, "phrases": []}))
    with pytest.raises(ValueError, match="cache format 1, expected 3; rebuild"):
        CachedSource(old)
    with open(cache / "images.u8", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"images.u8: expected \d+ bytes .* found 1000"):
        CachedSource(cache)

    class Broken(_ArraySource):
        def read(self, index):
            if index == 2:
                raise ValueError("task 2: cannot decode image")
            return super().read(index)

    items = [(np.zeros((40, 50, 3), np.uint8), np.ones((40, 50), np.uint8), "x")] * 3
    with pytest.raises(ValueError, match="task 2"):
        build_cache(Broken(items), tmp_path / "broken", size=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "old"]  # nothing half-written


def test_open_iterator_at_exit_does_not_abort(data_dir):
    """An infinite iterator still running at interpreter exit: closed by an atexit hook
    (a tf.data `numpy_function` running during finalisation aborts the process)."""
    code = ("from data_pipelines.sources import TfdsSource\n"
            "from data_pipelines.pcplus import PCPlus\n"
            f"pipe = PCPlus(TfdsSource('train', {str(data_dir)!r}), batch_size=2, image_size=32, "
            "process_index=0, process_count=1)\n"
            "it = pipe.iterator()\nnext(it)\nprint('ok')\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_device_support_rendering_equals_host(source):
    """support_render="device": raw support squares + masks that, rendered on device with
    `render_visual_prompts_jax`, give the host pipeline's supports (same tasks, same crops)."""
    import jax

    from clipseg_jax.prompts_jax import render_visual_prompts_jax

    kw = dict(batch_size=8, seed=12, process_index=0, process_count=1, image_size=SMALL)
    host = next(PCPlus(source, **kw).iterator(0, 1))
    dev_pipe = PCPlus(source, support_render="device", **kw)
    dev = next(dev_pipe.iterator(0, 1))
    assert set(dev) == set(host) | {"support_mask"} and dev["support_mask"].shape == (8, SMALL, SMALL)
    for k in host:
        if k != "support_image":
            np.testing.assert_array_equal(dev[k], host[k])
    assert dev["support_valid"].any()
    assert (dev["support_mask"][dev["support_valid"]].reshape(-1, SMALL * SMALL).max(1) == 1).all()
    rendered = np.asarray(jax.jit(render_visual_prompts_jax, static_argnums=3)(
        dev["support_image"], dev["support_mask"], dev["support_valid"], dev_pipe.mode))
    diff = np.abs(rendered.astype(int) - host["support_image"].astype(int))
    # host: support resized only where the renderer reads (warpAffine sub-rectangle), uint8 render;
    # device: full resize, float render. Each is within 1 level of the exact reference.
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    with pytest.raises(ValueError, match="support_render"):
        PCPlus(source, support_render="gpu", **kw)


def test_batch_arrays_are_adopted_by_tf_without_copy():
    """The design relies on TF adopting a 64-byte-aligned `numpy_function` result (no copy under
    the GIL): check the alignment helper and that TF's yielded array is our buffer."""
    import tensorflow as tf

    from data_pipelines.pcplus import _empty_aligned

    bufs = []

    def make(i):
        b = _empty_aligned((4, 64, 64, 3))
        b[...] = i
        bufs.append(b)
        return b

    assert all(_empty_aligned((3, 5, 7)).ctypes.data % 64 == 0 for _ in range(20))
    ds = tf.data.Dataset.range(1, 3).map(lambda i: tf.numpy_function(make, [i], tf.uint8))
    outs = list(ds.as_numpy_iterator())
    assert [int(o[0, 0, 0, 0]) for o in outs] == [1, 2]
    assert all(np.shares_memory(o, b) for o, b in zip(outs, bufs))


def test_batch_buffers_recycled_only_when_unreferenced(source):
    """Batch arrays are reused once nothing references them, and never while a batch (or a view
    of one, or the numpy array the tf.data iterator yielded) is still held."""
    kw = dict(batch_size=3, seed=5, process_index=0, process_count=1)
    ref = PCPlus(source, **kw)
    expected = [ref.batch(s) for s in range(8)]
    pipe = PCPlus(source, num_parallel_calls=2, prefetch=1, **kw)

    b0 = pipe.batch(0)
    image_id = id(b0["image"])  # the pool keeps the object alive, so its id stays unique to it
    view = b0["support_image"][1]
    del b0
    b1 = pipe.batch(1)
    assert id(b1["image"]) == image_id  # recycled: the previous batch was dropped
    assert not np.shares_memory(b1["support_image"], view)  # a live view keeps its buffer
    np.testing.assert_array_equal(view, expected[0]["support_image"][1])

    held = list(pipe.iterator(0, 8))  # every yielded batch kept while later ones are built
    for got, want in zip(held, expected):
        for k in ("image", "mask", "support_image"):
            np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(view, expected[0]["support_image"][1])

    for s, got in enumerate(pipe.iterator(0, 8)):  # consumed one at a time, buffers recycled
        for k in ("image", "mask", "support_image"):
            np.testing.assert_array_equal(got[k], expected[s][k])
        del got
