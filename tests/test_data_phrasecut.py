"""TFDS `phrasecut` builder on datasets written in the official VGPhraseCut_v0 layout."""
import json
import logging
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_pipelines  # noqa: F401  (registers `phrasecut`)
from clipseg_jax.polygons import polygon_mask, polygons_mask
from data_pipelines import phrasecut, synthetic
from data_fixtures import reference_mask, refer


def brute_force_mask(instances, height: int, width: int) -> np.ndarray:
    """Independent reference for skimage's polygon2mask: every pixel centre (x=col, y=row) is
    tested against every edge; it is in when it lies on a closed edge segment (exact
    collinearity + bounding box) or inside by even-odd ray casting. Union over polygons."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((height, width), bool)
    for polys in instances:
        for poly in polys:
            p = np.asarray(poly, np.float64)
            inside = np.zeros((height, width), bool)
            on_edge = np.zeros((height, width), bool)
            for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):
                on_edge |= (((x1 - x0) * (yy - y0) == (y1 - y0) * (xx - x0))
                            & (min(x0, x1) <= xx) & (xx <= max(x0, x1)) & (min(y0, y1) <= yy) & (yy <= max(y0, y1)))
                if y0 != y1:
                    inside ^= ((y0 > yy) != (y1 > yy)) & (xx < x0 + (yy - y0) * (x1 - x0) / (y1 - y0))
            out |= inside | on_edge
    return out.astype(np.uint8)


def test_registered_and_splits(data_dir, manual_dir):
    builder = tfds.builder("phrasecut", data_dir=str(data_dir))
    assert set(builder.info.splits) == {"train", "validation", "test", "miniv"}
    for split, suffix in phrasecut.SPLIT_FILES.items():
        assert builder.info.splits[split].num_examples == len(refer(manual_dir, suffix))
        assert builder.info.metadata[split]["task_id"] == [t["task_id"] for t in sorted(
            refer(manual_dir, suffix), key=lambda t: t["image_id"])]
    assert "17 image ids" in builder.info.description


def test_examples_match_annotations_and_reference_rasterisation(data_dir, manual_dir):
    tasks = {t["task_id"]: t for t in refer(manual_dir)}
    ds = tfds.data_source("phrasecut", split="train", data_dir=str(data_dir))
    ious, gray_seen = [], False
    for i in range(len(ds)):
        ex = ds[i]
        t = tasks[ex["task_id"].decode()]
        img = np.asarray(Image.open(manual_dir / "images" / f"{t['image_id']}.jpg"))
        gray_seen |= img.ndim == 2
        assert ex["image"].shape[:2] == img.shape[:2] and ex["image"].shape[2] == 3
        assert ex["image_id"] == t["image_id"] and ex["phrase"].decode() == t["phrase"]
        assert len(ex["instance_boxes"]) == len(t["instance_boxes"])
        m = ex["mask"][:, :, 0]
        assert set(np.unique(m)) <= {0, 1}
        # independent rasterisations: skimage's rule (boundary in) exactly; centre-inside
        # ray casting (boundary out) up to border pixels
        np.testing.assert_array_equal(m, brute_force_mask(t["Polygons"], *img.shape[:2]))
        ref = reference_mask(t["Polygons"], *img.shape[:2])
        if ref.sum() >= 200:  # non-tiny
            inter, union = (m & ref).sum(), (m | ref).sum()
            ious.append(inter / union)
        assert ex["phrase_structure"]["name"].decode() == t["phrase_structure"]["name"]
    assert gray_seen, "fixture should contain a grayscale JPEG"
    assert len(ious) > 10 and min(ious) >= 0.98


def test_pixels_exactly_on_edges_and_vertices_are_included():
    # rectangle with integer corners: all four sides are in (skimage's polygon2mask)
    m = polygons_mask([[[[2, 3], [10, 3], [10, 8], [2, 8]]]], 12, 14)
    expected = np.zeros((12, 14), np.uint8)
    expected[3:9, 2:11] = 1
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m, expected)
    # right triangle: the pixels on the diagonal hypotenuse are in
    tri = [[1, 1], [9, 9], [1, 9]]
    expected = np.zeros((12, 12), bool)
    for r in range(1, 10):
        expected[r, 1:r + 1] = True
    np.testing.assert_array_equal(polygon_mask((12, 12), tri), expected)
    # a polygon that only touches a lattice point at a vertex (tip at x=5, y=2)
    m = polygon_mask((8, 8), [[5, 2], [5.5, 4.5], [4.5, 4.5]])
    assert m[2, 5] and m[3, 5] and m[4, 5] and m.sum() == 3  # the tip (a vertex), then two inside
    # and the independent reference agrees
    for poly, (h, w) in [([[2, 3], [10, 3], [10, 8], [2, 8]], (12, 14)), (tri, (12, 12))]:
        np.testing.assert_array_equal(polygon_mask((h, w), poly), brute_force_mask([[poly]], h, w).astype(bool))


def test_concave_self_touching_and_random_polygons_vs_brute_force():
    H, W = 20, 24
    polys = [
        # concave comb with integer vertices and diagonal edges through lattice points
        [[1, 1], [17, 1], [17, 15], [13, 11], [11, 15], [9, 5], [7, 15], [5, 11], [1, 15]],
        # self-touching: two squares joined at the lattice point (8, 8), one ring
        [[2, 2], [8, 2], [8, 8], [14, 8], [14, 14], [8, 14], [8, 8], [2, 8]],
        # self-intersecting bowtie (even-odd) crossing at a non-lattice point, partly off the image
        [[-2.5, 0.5], [21.5, 17.5], [21.5, 0.5], [-2.5, 17.5]],
        # star pentagram: the centre is outside by the even-odd rule
        [[12, 1], [17.5, 18], [3, 7.5], [21, 7.5], [6.5, 18]],
    ]
    for poly in polys:
        np.testing.assert_array_equal(polygons_mask([[poly]], H, W), brute_force_mask([[poly]], H, W), str(poly))
    assert polygons_mask([[polys[3]]], H, W)[10, 12] == 0  # the pentagram's hole
    rng = np.random.default_rng(11)
    for _ in range(40):  # random, mostly self-intersecting, float polygons, several per instance
        inst = [[(rng.random((int(rng.integers(3, 12)), 2)) * [W + 8, H + 8] - 4).tolist()
                 for _ in range(int(rng.integers(1, 3)))] for _ in range(int(rng.integers(1, 3)))]
        np.testing.assert_array_equal(polygons_mask(inst, H, W), brute_force_mask(inst, H, W))
    assert polygons_mask([], 3, 4).shape == (3, 4) and not polygons_mask([], 3, 4).any()


def test_invalid_ids_corrupt_images_and_bad_polygons_are_skipped_and_counted(tmp_path, caplog):
    man = synthetic.generate(tmp_path / "m", {"train": 5, "val": 1, "test": 1, "miniv": 1}, seed=5)
    info = json.load(open(man / "image_data_split.json"))
    train = json.load(open(man / "refer_train.json"))
    # image 1 -> one of CLIPSeg's 17 invalid ids
    for d in info:
        if d["image_id"] == 1:
            d["image_id"] = 150417
    for t in train:
        if t["image_id"] == 1:
            t["image_id"] = 150417
    (man / "images" / "1.jpg").rename(man / "images" / "150417.jpg")
    n_invalid = sum(t["image_id"] == 150417 for t in train)
    # image 2: corrupt JPEG (truncated)
    raw = (man / "images" / "2.jpg").read_bytes()
    (man / "images" / "2.jpg").write_bytes(raw[: len(raw) // 3])
    n_corrupt = sum(t["image_id"] == 2 for t in train)
    # a 2-point polygon added to a task of image 3; a task of image 4 with only bad polygons
    t3 = next(t for t in train if t["image_id"] == 3)
    t3["Polygons"][0].append([[1, 1], [5, 5]])
    t4 = next(t for t in train if t["image_id"] == 4)
    t4["Polygons"] = [[[[1, 1], [9, 9]]]]
    json.dump(info, open(man / "image_data_split.json", "w"))
    json.dump(train, open(man / "refer_train.json", "w"))
    with caplog.at_level(logging.WARNING):
        b = phrasecut.build(man, tmp_path / "d")
    skipped = b.info.metadata["skipped"]["train"]
    assert skipped == {"invalid_image_id_tasks": n_invalid, "corrupt_image_tasks": n_corrupt, "bad_polygons": 2,
                       "tasks_without_valid_polygon": 1}
    assert b.info.splits["train"].num_examples == len(train) - n_invalid - n_corrupt - 1
    assert any("2.jpg" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert any("skipped" in r.getMessage() and "bad_polygons" in r.getMessage() for r in caplog.records)
    ids = set(b.info.metadata["train"]["image_id"])
    assert 150417 not in ids and 2 not in ids


def test_missing_image_names_the_file(tmp_path):
    man = synthetic.generate(tmp_path / "m", {"train": 2, "val": 1, "test": 1, "miniv": 1}, seed=6)
    (man / "images" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/2\.jpg"):
        phrasecut.build(man, tmp_path / "d")


def test_missing_manual_dir_gives_instructions(tmp_path):
    with pytest.raises(Exception, match="download_dataset.py"):
        phrasecut.build(tmp_path / "nope", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="download_dataset.py"):
        phrasecut.build(tmp_path / "empty", tmp_path / "d2")


def test_manual_dir_may_contain_the_folder_itself(tmp_path, manual_dir):
    shutil.copytree(manual_dir, tmp_path / "manual" / "VGPhraseCut_v0")
    b = phrasecut.build(tmp_path / "manual", tmp_path / "d")
    assert b.info.splits["miniv"].num_examples == len(refer(manual_dir, "miniv"))


def test_miniv_is_optional(tmp_path, caplog):
    """PhraseCut's download script can be run with -s train_val_test: no refer_miniv.json."""
    man = synthetic.generate(tmp_path / "m", {"train": 2, "val": 1, "test": 1}, seed=7)
    (man / "refer_miniv.json").unlink()
    with caplog.at_level(logging.WARNING):
        b = phrasecut.build(man, tmp_path / "d")
    assert set(b.info.splits) == {"train", "validation", "test"}
    assert any("refer_miniv.json not found" in r.getMessage() for r in caplog.records)
    (man / "refer_val.json").unlink()
    with pytest.raises(FileNotFoundError, match="refer_val.json not found"):
        phrasecut.build(man, tmp_path / "d2")


def test_synthetic_shapes_apart_have_exact_masks_and_the_default_stream_is_unchanged(tmp_path):
    """overlap=False: no pixel belongs to two objects' masks, and the interior of each mask (2 px in) shows its
    phrase's colour; the default (overlap=True) writes what it wrote before the option existed."""
    from skimage.morphology import disk, erosion

    apart = synthetic.generate(tmp_path / "a", {"train": 30}, seed=3, overlap=False, grayscale_every=0)
    tasks = json.loads((apart / "refer_train.json").read_text())
    by_image: dict[int, list] = {}
    for t in tasks:
        if t["phrase_structure"]["type"] == "attribute":
            by_image.setdefault(t["image_id"], []).append(t)
    assert sum(len(v) for v in by_image.values()) > 60
    for image_id, ts in by_image.items():
        img = np.asarray(Image.open(apart / "images" / f"{image_id}.jpg").convert("RGB"), np.int32)
        h, w = img.shape[:2]
        masks = [polygons_mask(t["Polygons"], h, w) for t in ts]
        assert (np.sum(masks, axis=0) <= 1).all(), image_id
        for t, m in zip(ts, masks):
            colour = np.array(synthetic.COLORS[t["phrase_structure"]["attributes"][-1]])
            core = erosion(m.astype(np.uint8), disk(2)).astype(bool)  # off the edges (rasteriser rule, JPEG ringing)
            inside = np.abs(img[core] - colour).max(-1) < 60
            assert core.sum() == 0 or inside.mean() > 0.97, (image_id, t["phrase"], inside.mean())
    import hashlib

    default = synthetic.generate(tmp_path / "d", {"train": 3}, seed=3)
    digest = {f: hashlib.sha256((default / f).read_bytes()).hexdigest()[:16] for f in ("refer_train.json",
                                                                                        "images/1.jpg")}
    # written by the generator as it was before `overlap` existed (commit 6206e65)
    assert digest == {"refer_train.json": "4c5b2312d8d78d60", "images/1.jpg": "e65e17284b8c5022"}, digest
