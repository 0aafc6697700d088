"""Dataset readers, ground truth and preprocessing of the evaluation protocols (no model)."""

import json

import numpy as np
import pytest

from clipseg_jax.evaluate import DatasetError
from clipseg_jax.evaluate import _image as im
from clipseg_jax.evaluate import pascal5i, pascal_zs, phrasecut

from clipseg_jax.resize import torch_nearest
from eval_fixtures import VOC_IMAGES, voc_label, write_phrasecut, write_voc


def one_line(e):
    s = str(e.value)
    assert s and "\n" not in s
    return s


# ---------------------------------------------------------------------------------------
# PFENet's resize (the resizes themselves: tests/test_resize.py)
# ---------------------------------------------------------------------------------------


def test_pfenet_new_hw():
    assert im.pfenet_new_hw(375, 500, 352) == (264, 352)
    assert im.pfenet_new_hw(500, 375, 352) == (352, 264)
    assert im.pfenet_new_hw(333, 500, 352) == (232, 352)  # int(234.4) = 234 -> floored to 232
    assert im.pfenet_new_hw(200, 300, 352) == (200, 300)  # not larger than 352: kept
    img = np.full((200, 300, 3), 100, np.float32)
    lab = np.ones((200, 300), np.float32)
    canvas, lcanvas = im.pfenet_test_resize(img, lab, 352)
    assert canvas.shape == (352, 352, 3) and (canvas[:200, :300] == 100).all() and (canvas[200:] == 0).all()
    assert (lcanvas[:200, :300] == 1).all() and (lcanvas[:, 300:] == 255).all()


# ---------------------------------------------------------------------------------------
# PhraseCut
# ---------------------------------------------------------------------------------------


def _closed_convex(points, shape):
    """Independent test for a convex polygon given counter-/clockwise: a grid point (x=c, y=r)
    is in when it is on the same side of (or on) every edge."""
    H, W = shape
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    pts = np.asarray(points, np.float64)
    crosses = []
    for a, b in zip(pts, np.roll(pts, -1, axis=0)):
        crosses.append((b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0]))
    c = np.stack(crosses)
    return (c >= 0).all(0) | (c <= 0).all(0)


def test_polygon_mask_rectangle_includes_boundary():
    m = phrasecut.polygon_mask((48, 64), [[4, 6], [23, 6], [23, 21], [4, 21]])
    expected = np.zeros((48, 64), bool)
    expected[6:22, 4:24] = True
    np.testing.assert_array_equal(m, expected)


def test_polygon_mask_l_shape_and_clipping():
    L = [[0, 0], [10, 0], [10, 4], [4, 4], [4, 10], [0, 10]]
    m = phrasecut.polygon_mask((12, 12), L)
    expected = np.zeros((12, 12), bool)
    expected[0:5, 0:11] = True
    expected[0:11, 0:5] = True
    np.testing.assert_array_equal(m, expected)
    # partly outside the image: clipped, no error
    m2 = phrasecut.polygon_mask((5, 5), [[-3, -3], [8, -3], [8, 8], [-3, 8]])
    assert m2.all()


def test_polygon_mask_convex_vs_half_planes():
    from scipy.spatial import ConvexHull

    rng = np.random.default_rng(5)
    for k in range(30):
        pts = rng.integers(0, 30, (6, 2)) if k % 2 else rng.random((6, 2)) * 30
        try:
            hull = ConvexHull(pts)
        except Exception:
            continue
        poly = pts[hull.vertices].tolist()
        np.testing.assert_array_equal(phrasecut.polygon_mask((32, 32), poly), _closed_convex(poly, (32, 32)))


def _point_in_polygon(xp, yp, x, y):
    """Point-by-point transcription of the crossing test of skimage's point_in_polygon
    (O'Rourke): 0 outside, 1 inside, 2 vertex, 3 edge."""
    n = len(xp)
    x1, y1 = xp[-1] - x, yp[-1] - y
    r_cross = l_cross = 0
    for i in range(n):
        x0, y0 = xp[i] - x, yp[i] - y
        if -1e-12 < x0 < 1e-12 and -1e-12 < y0 < 1e-12:
            return 2
        if (y0 > 0) != (y1 > 0) and (x0 * y1 - x1 * y0) / (y1 - y0) > 0:
            r_cross += 1
        if (y0 < 0) != (y1 < 0) and (x0 * y1 - x1 * y0) / (y1 - y0) < 0:
            l_cross += 1
        x1, y1 = x0, y0
    if (r_cross & 1) != (l_cross & 1):
        return 3
    return 1 if r_cross & 1 else 0


def test_polygon_mask_random_nonconvex_vs_pointwise():
    rng = np.random.default_rng(7)
    H, W = 24, 28
    for k in range(12):
        n = int(rng.integers(3, 12))
        pts = rng.integers(-3, 30, (n, 2)).astype(float) if k % 3 == 0 else rng.random((n, 2)) * 32 - 3
        m = phrasecut.polygon_mask((H, W), pts.tolist())
        minr, maxr = int(max(0, pts[:, 1].min())), min(H - 1, int(np.ceil(pts[:, 1].max())))
        minc, maxc = int(max(0, pts[:, 0].min())), min(W - 1, int(np.ceil(pts[:, 0].max())))
        ref = np.zeros((H, W), bool)
        for r in range(minr, maxr + 1):
            for c in range(minc, maxc + 1):
                ref[r, c] = _point_in_polygon(pts[:, 0], pts[:, 1], float(c), float(r)) != 0
        np.testing.assert_array_equal(m, ref)


def test_read_tasks_and_samples(pc_root):
    root, tasks, skipped = phrasecut.read_tasks(pc_root.parent, "test")  # parent dir also accepted
    assert root == pc_root and skipped == 1
    assert [t.task_id for t in tasks] == ["1__11", "1__12_13", "2__21", "2__22"]
    assert [t.index for t in tasks] == [0, 1, 2, 3]
    # two instances: union
    m = phrasecut.task_mask(tasks[1])
    assert m[2:12, 30:40].all() and m[30, 40:60].all() and m.sum() > 100
    # grayscale image -> 3 channels; target at 352 is the nearest-resized mask
    px, tgt = phrasecut.load_sample(root, tasks[2])
    assert px.shape == (352, 352, 3) and px.dtype == np.float32 and tgt.shape == (352, 352)
    raw = px * im.IMAGENET_STD + im.IMAGENET_MEAN  # grayscale replicated: equal channels before normalisation
    np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)
    np.testing.assert_array_equal(tgt, torch_nearest(phrasecut.task_mask(tasks[2]).astype(np.uint8), (352, 352)))
    # the full-image task covers everything
    _, tgt_all = phrasecut.load_sample(root, tasks[3])
    assert tgt_all.all()


def test_joined_splits(tmp_path):
    d = write_phrasecut(tmp_path)
    (d / "refer_val.json").write_text((d / "refer_test.json").read_text())
    _, tasks, skipped = phrasecut.read_tasks(d, "test_val")
    assert len(tasks) == 8 and skipped == 2 and [t.index for t in tasks] == list(range(8))


def test_phrasecut_bad_input(tmp_path, pc_root):
    with pytest.raises(DatasetError, match="no such directory") as e:
        phrasecut.read_tasks(tmp_path / "nope")
    one_line(e)
    with pytest.raises(DatasetError, match="no image_data_split.json") as e:
        phrasecut.read_tasks(tmp_path)
    assert "download_dataset.py" in one_line(e)
    with pytest.raises(DatasetError, match=r"refer_val.json"):
        phrasecut.read_tasks(pc_root, "val")
    with pytest.raises(DatasetError, match="PhraseCut splits"):
        phrasecut.read_tasks(pc_root, "dev")

    d = write_phrasecut(tmp_path / "empty", tasks=[])
    with pytest.raises(DatasetError, match="no tasks to evaluate") as e:
        phrasecut.read_tasks(d)
    one_line(e)

    d = write_phrasecut(tmp_path / "badjson")
    (d / "refer_test.json").write_text("[{")
    with pytest.raises(DatasetError, match=r"refer_test.json: invalid JSON"):
        phrasecut.read_tasks(d)

    bad = json.loads((pc_root / "refer_test.json").read_text())
    bad[0]["Polygons"] = [[[[1, 2], [3]]]]
    d = write_phrasecut(tmp_path / "badpoly", tasks=bad)
    with pytest.raises(DatasetError, match=r"task 1__11: Polygons\[0\]\[0\]\[1\] = \[3\]"):
        phrasecut.read_tasks(d)

    d = write_phrasecut(tmp_path / "noimg")
    (d / "images" / "2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"2.jpg: image of refer_test.json not found"):
        phrasecut.read_tasks(d)

    d = write_phrasecut(tmp_path / "size")
    info = json.loads((d / "image_data_split.json").read_text())
    info[0]["width"] = 65
    (d / "image_data_split.json").write_text(json.dumps(info))
    root, tasks, _ = phrasecut.read_tasks(d)
    with pytest.raises(DatasetError, match=r"1.jpg: image is 64x48 but image_data_split.json says 65x48"):
        phrasecut.load_sample(root, tasks[0])


# ---------------------------------------------------------------------------------------
# Pascal-5i
# ---------------------------------------------------------------------------------------


def test_pascal5i_list_and_episodes(voc_root):
    pairs, source = pascal5i.read_list(pascal5i.find_voc_root(voc_root.parent))
    assert source.endswith("lists/pascal/val.txt") and len(pairs) == len(VOC_IMAGES)
    eps = pascal5i.make_episodes(pairs, fold=0, seed=0)
    names = [e.query[0].stem for e in eps]
    assert names == ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]  # 2007_000005: bird < 2048 px
    for e in eps:
        lab = np.asarray(im.load_label(e.query[1]))
        assert e.class_id in (1, 2, 3, 4, 5) and (lab == e.class_id).any()
        assert e.fold_index == e.class_id - 1
        assert e.support != e.query
        assert (np.asarray(im.load_label(e.support[1])) == e.class_id).sum() >= 2048
    assert eps == pascal5i.make_episodes(pairs, fold=0, seed=0)  # seeded: reproducible
    chosen = {tuple(e.class_id for e in pascal5i.make_episodes(pairs, 0, seed=s)) for s in range(20)}
    assert len(chosen) > 1  # 2007_000002 holds two fold classes: the draw varies with the seed
    for fold in (1, 2, 3):
        assert pascal5i.make_episodes(pairs, fold, seed=0)


def test_pascal5i_episode_tensors(voc_root):
    pairs, _ = pascal5i.read_list(voc_root)
    ep = [e for e in pascal5i.make_episodes(pairs, 0, seed=0) if e.query[0].stem == "2007_000003"][0]
    q, s, tgt, ign = pascal5i.load_episode(ep, "visual")
    assert q.shape == (352, 352, 3) and s.shape == (352, 352, 3)
    # 300x400 -> 264x352 pasted top-left on black: padding is normalised black
    black = (0 - im.IMAGENET_MEAN * 255) / (im.IMAGENET_STD * 255)
    np.testing.assert_allclose(q[264:, :], np.broadcast_to(black, q[264:, :].shape), atol=1e-5)
    # ground truth: original label in a 400x400 canvas padded with 255 (ignored)
    lab = voc_label((300, 400), dict((n, o) for n, _, o in VOC_IMAGES)["2007_000003"])
    assert tgt.shape == (400, 400) and ign[300:].all() and not tgt[300:].any()
    np.testing.assert_array_equal(tgt[:300], (lab == ep.class_id).astype(np.uint8))
    np.testing.assert_array_equal(ign[:300], lab == 255)
    q2, s2, _, _ = pascal5i.load_episode(ep, "text")
    assert s2 is None and np.array_equal(q, q2)
    assert pascal5i.text_prompt(11) == "a photo of a diningtable."


def test_pascal5i_fallback_list_and_errors(tmp_path, voc_root):
    d = write_voc(tmp_path / "nolist")
    (d / "lists" / "pascal" / "val.txt").unlink()
    pairs, source = pascal5i.read_list(d)
    assert "ImageSets/Segmentation/val.txt" in source and pairs[0][1].parent.name == "SegmentationClassAug"
    with pytest.raises(DatasetError, match="folds are 0, 1, 2, 3") as e:
        pascal5i.make_episodes(pairs, fold=4)
    one_line(e)
    with pytest.raises(DatasetError, match="no JPEGImages"):
        pascal5i.find_voc_root(tmp_path)
    only_bird = [n for n in VOC_IMAGES if n[0] == "2007_000005"]
    d = write_voc(tmp_path / "bird", images=only_bird)
    with pytest.raises(DatasetError, match=r"fold 0: no image of the val list holds a fold class"):
        pascal5i.make_episodes(pascal5i.read_list(d)[0], 0)
    d = write_voc(tmp_path / "single", images=[n for n in VOC_IMAGES if n[0] == "2007_000004"])
    with pytest.raises(DatasetError, match=r"no other image holds >= 2048 pixels of 'bicycle'"):
        pascal5i.make_episodes(pascal5i.read_list(d)[0], 0)
    (d / "SegmentationClassAug" / "2007_000004.png").unlink()
    with pytest.raises(DatasetError, match=r"2007_000004.png: label of the val list not found"):
        pascal5i.read_list(d)


# ---------------------------------------------------------------------------------------
# Pascal zero-shot
# ---------------------------------------------------------------------------------------


def test_zero_shot_sets_and_metrics():
    assert [pascal_zs.JOEM_VOC[i] for i in pascal_zs.UNSEEN[4]] == ["airplane", "cow", "motorbike", "sofa"]
    assert sorted(pascal_zs.JOEM_VOC[i] for i in pascal_zs.UNSEEN[10]) == sorted(
        ["airplane", "cow", "motorbike", "sofa", "cat", "tvmonitor", "train", "bottle", "chair", "pottedplant"])
    assert 0 in pascal_zs.seen_classes(4) and len(pascal_zs.seen_classes(10)) == 11
    cm = np.zeros((21, 21), np.int64)
    cm[0, 0], cm[0, 1] = 8, 2  # background: 8 right, 2 called airplane
    cm[1, 1], cm[1, 0] = 3, 1  # airplane
    cm[10, 10] = 5  # cow perfect
    iou = pascal_zs.iou_per_class(cm)
    assert iou[0] == pytest.approx(8 / (10 + 9 - 8)) and iou[1] == pytest.approx(3 / (4 + 5 - 3))
    assert iou[10] == 1.0 and iou[2] == 0.0  # absent class: 0/0 -> 0
    m = pascal_zs.zs_metrics(cm)
    assert m["unseen-4"]["unseen"] == pytest.approx((iou[1] + 1.0) / 4)
    assert m["unseen-4"]["seen"] == pytest.approx(iou[0] / 17)
    assert m["overall"] == pytest.approx(iou.sum() / 21)
    s, u = m["unseen-4"]["seen"], m["unseen-4"]["unseen"]
    assert m["unseen-4"]["harmonic"] == pytest.approx(2 * s * u / (s + u))
    # the released script: 'seen' = mean over get_unseen_idx(2) = {cow, motorbike}
    assert m["as_released_score_py"]["zs2"]["seen"] == pytest.approx(0.5)
    assert m["as_released_score_py"]["zs5"]["seen"] == pytest.approx(0.0)


def test_zero_shot_reader(voc_root, tmp_path):
    _, items = pascal_zs.read_split(voc_root)
    assert len(items) == len(VOC_IMAGES)
    px, lab = pascal_zs.load_sample(items[2])
    assert px.shape == (352, 352, 3) and lab.shape == (352, 352) and lab.dtype == np.uint8
    full = voc_label((300, 400), VOC_IMAGES[2][2])
    np.testing.assert_array_equal(lab, torch_nearest(full, (352, 352)))  # palette PNG read as indices
    with pytest.raises(DatasetError, match="uses VOC2012 val"):
        pascal_zs.read_split(voc_root, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no JPEGImages") as e:
        pascal_zs.read_split(tmp_path / "empty")
    assert "Pascal zero-shot needs VOC2012" in str(e.value) and "Pascal-5i" not in str(e.value)
    d = write_voc(tmp_path / "v")
    (d / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match="the list is empty"):
        pascal_zs.read_split(d)
