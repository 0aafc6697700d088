"""Tiny datasets in the official on-disk layouts, written at test time (no copyrighted data).

* ``write_phrasecut(root)``: ``VGPhraseCut_v0/`` (image_data_split.json, refer_test.json,
  images/<id>.jpg) with a grayscale image, a multi-polygon instance, a two-instance task,
  a phrase shared by two images and a task on one of CLIPSeg's 17 invalid image ids.
* ``write_voc(root)``: ``VOC2012/`` with JPEGImages/, SegmentationClassAug/ (grayscale
  class ids, 255 borders), SegmentationClass/ (palette PNGs as VOC ships them),
  ImageSets/Segmentation/val.txt and PFENet's lists/pascal/val.txt.
* ``write_tiny_model(dir)``: a random tiny ``CLIPSegForImageSegmentation`` saved with
  ``save_pretrained`` (config.json + model.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------
# PhraseCut
# ---------------------------------------------------------------------------------------


def _rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _jpeg(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, quality=95)


PHRASECUT_TASKS = [
    # image 1 (64x48, RGB)
    dict(task_id="1__11", image_id=1, ann_ids=[11], instance_boxes=[[4, 6, 20, 16]],
         Polygons=[[_rect(4, 6, 23, 21)]], phrase="red dog",
         phrase_structure=dict(name="dog", attributes=["red"], relation_ids=[], relation_descriptions=[],
                               type="attribute")),
    dict(task_id="1__12_13", image_id=1, ann_ids=[12, 13], instance_boxes=[[30, 2, 10, 10], [40, 30, 20, 15]],
         Polygons=[[_rect(30, 2, 39, 11)], [[[40, 30], [59, 30], [50, 44]]]], phrase="sky",
         phrase_structure=dict(name="sky", attributes=[], relation_ids=[], relation_descriptions=[], type="name")),
    # image 2 (40x56, grayscale): instance with two polygons, phrase shared with image 1
    dict(task_id="2__21", image_id=2, ann_ids=[21], instance_boxes=[[2, 2, 30, 40]],
         Polygons=[[_rect(2, 2, 12, 20), [[15.5, 25.2], [31.7, 25.0], [31.2, 41.9], [15.1, 41.6]]]], phrase="sky",
         phrase_structure=dict(name="sky", attributes=[], relation_ids=[], relation_descriptions=[], type="name")),
    dict(task_id="2__22", image_id=2, ann_ids=[22], instance_boxes=[[0, 0, 40, 56]],
         Polygons=[[_rect(0, 0, 39, 55)]], phrase="the whole picture",
         phrase_structure=dict(name="picture", attributes=[], relation_ids=[], relation_descriptions=[],
                               type="name")),
    # one of CLIPSeg's invalid image ids: skipped by the protocol
    dict(task_id="150417__1", image_id=150417, ann_ids=[1], instance_boxes=[[0, 0, 5, 5]],
         Polygons=[[_rect(0, 0, 5, 5)]], phrase="cat",
         phrase_structure=dict(name="cat", attributes=[], relation_ids=[], relation_descriptions=[], type="name")),
]


def write_phrasecut(root: Path, split: str = "test", tasks=None) -> Path:
    """Write ``root/VGPhraseCut_v0`` and return that directory."""
    d = Path(root) / "VGPhraseCut_v0"
    (d / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {1: (64, 48), 2: (40, 56), 150417: (20, 20)}
    info = [dict(image_id=i, width=w, height=h, split=split, url="", coco_id=None, flickr_id=None)
            for i, (w, h) in sizes.items()]
    (d / "image_data_split.json").write_text(json.dumps(info))
    (d / "name_att_rel_count.json").write_text(
        json.dumps({"cat": [["sky", 2], ["dog", 1]], "att": [["red", 1]], "rel": []}))
    (d / f"refer_{split}.json").write_text(json.dumps(PHRASECUT_TASKS if tasks is None else tasks))
    _jpeg(d / "images" / "1.jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    _jpeg(d / "images" / "2.jpg", rng.integers(0, 256, (56, 40), dtype=np.uint8))  # grayscale
    _jpeg(d / "images" / "150417.jpg", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))  # wrong size
    return d


# ---------------------------------------------------------------------------------------
# VOC2012 (+ SBD-style SegmentationClassAug, PFENet list)
# ---------------------------------------------------------------------------------------

# (id, (H, W), [(class, y0, y1, x0, x1), ...]).  Every fold has queries (a fold class with
# >= 2048 px) and every fold class present in a query has another image with >= 2048 px of it.
VOC_IMAGES = [
    ("2007_000001", (96, 128), [(1, 10, 70, 10, 70), (15, 70, 90, 90, 120)]),  # aeroplane 3600, person 600
    ("2007_000002", (120, 90), [(1, 20, 80, 5, 60), (2, 90, 110, 10, 30)]),  # aeroplane, small bicycle
    ("2007_000003", (300, 400), [(2, 50, 150, 50, 150), (10, 200, 260, 200, 300)]),  # > 352: resized; cow
    ("2007_000004", (80, 80), [(2, 10, 70, 10, 70)]),  # bicycle 3600
    ("2007_000005", (64, 96), [(3, 0, 30, 0, 30)]),  # bird 900 (< 2048): no query
    ("2007_000006", (100, 100), [(20, 5, 95, 5, 95)]),  # tvmonitor
    ("2007_000007", (90, 110), [(16, 10, 80, 10, 100)]),  # pottedplant
    ("2007_000008", (70, 160), [(16, 5, 65, 20, 100), (10, 5, 65, 110, 150)]),  # pottedplant, cow
    ("2007_000009", (100, 120), [(15, 0, 60, 0, 60), (12, 60, 100, 60, 120)]),  # person, dog
    ("2007_000010", (110, 100), [(15, 0, 50, 0, 50), (12, 50, 110, 0, 50), (20, 50, 110, 50, 100)]),
]


def _voc_palette() -> list[int]:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def voc_label(shape, objects) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for c, y0, y1, x0, x1 in objects:
        lab[y0:y1, x0:x1] = c
        # VOC-style 255 outline around each object
        lab[max(y0 - 1, 0), x0:x1] = 255
        lab[min(y1, shape[0] - 1), x0:x1] = 255
    return lab


def write_voc(root: Path, images=None) -> Path:
    """Write ``root/VOC2012`` and return it."""
    images = VOC_IMAGES if images is None else images
    d = Path(root) / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationClass", "ImageSets/Segmentation", "lists/pascal"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    pal = _voc_palette()
    for name, shape, objs in images:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        for c, y0, y1, x0, x1 in objs:  # give objects a class-dependent colour
            img[y0:y1, x0:x1] = (np.array([37 * c % 256, 91 * c % 256, 53 * c % 256]) + img[y0:y1, x0:x1] // 8)
        _jpeg(d / "JPEGImages" / f"{name}.jpg", img)
        lab = voc_label(shape, objs)
        Image.fromarray(lab, mode="L").save(d / "SegmentationClassAug" / f"{name}.png")
        p = Image.fromarray(lab, mode="P")
        p.putpalette(pal)
        p.save(d / "SegmentationClass" / f"{name}.png")
    ids = [n for n, _, _ in images]
    (d / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    (d / "lists" / "pascal" / "val.txt").write_text(
        "\n".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in ids) + "\n")
    return d


# ---------------------------------------------------------------------------------------
# Tiny model
# ---------------------------------------------------------------------------------------


def write_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(seed)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=16, reduce_dim=8, extract_layers=[1, 2], decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    model = CLIPSegForImageSegmentation(cfg).eval()
    model.save_pretrained(out_dir)
    return Path(out_dir)
