"""TFDS `phrasecut` builder on datasets written in the official VGPhraseCut_v0 layout."""
import json
import logging
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_pipelines  # noqa: F401  (registers `phrasecut`)
from data_pipelines import phrasecut, synthetic
from data_pipelines.polygons import polygons_to_mask
from data_fixtures import data_dir, manual_dir, reference_mask, refer  # noqa: F401


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
        ref = reference_mask(t["Polygons"], *img.shape[:2])
        if ref.sum() >= 200:  # non-tiny
            inter, union = (m & ref).sum(), (m | ref).sum()
            ious.append(inter / union)
        np.testing.assert_array_equal(polygons_to_mask(t["Polygons"], *img.shape[:2]), m)
        assert ex["phrase_structure"]["name"].decode() == t["phrase_structure"]["name"]
    assert gray_seen, "fixture should contain a grayscale JPEG"
    assert len(ious) > 10 and min(ious) >= 0.98


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
