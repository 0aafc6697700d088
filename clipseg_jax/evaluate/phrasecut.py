"""PhraseCut test protocol of CLIPSeg (paper Table 3) and its reader for VGPhraseCut_v0.

What the original does (``score.py`` with ``test_dataset: phrasecut`` →
``datasets.phrasecut.PhraseCut('test', image_size=352, mask='text', aug_crop=False)``),
and what is reproduced here:

* Samples: every task of ``refer_test.json`` whose image is not one of CLIPSeg's 17
  ``invalid_img_ids`` (annotated size != real size).  One sample = one (image, phrase).
* Ground truth: each polygon of each instance rasterised with
  ``skimage.draw.polygon2mask((H, W), [(y, x) ...])`` (pixel (r, c) is in when the point
  (c, r) is inside the polygon or on its boundary; skimage's O'Rourke crossing test,
  re-implemented without skimage in ``clipseg_jax.polygons``, which the PhraseCut training
  builder uses too), union over all polygons, at the size given by
  ``image_data_split.json``; then resized to 352×352 with PyTorch's 'nearest'.
* Image: RGB (grayscale replicated), resized to 352×352 **without keeping the aspect
  ratio** (bilinear, ``align_corners=True``, on 0..255 floats), /255, ImageNet mean/std.
* Prompt: the raw phrase, no template.
* Metric: ``FixedThresholdMetrics`` at 352×352; each sample is its own class, so mIoU is
  the mean per-phrase IoU and IoU_FG the pooled (cumulative) IoU; the paper's columns are
  ``miou_0.3``, ``fgiou_0.3``, ``ap``.  These are **not** the official PhraseCut
  evaluator's numbers (that one works at the original resolution, without the +1).

Deviations: samples are evaluated in file order (the original shuffles images unseeded;
the metric does not depend on the order).  An image whose real size differs from the
annotation and is not in the 17-id list is an error here (the original would silently
resize mask and image independently).

Layout (``--data-dir`` is ``VGPhraseCut_v0/`` or a directory containing it, e.g.
``PhraseCutDataset/data``)::

    VGPhraseCut_v0/
      image_data_split.json      [{"image_id", "width", "height", "split", ...}, ...]
      refer_test.json            [{"task_id", "image_id", "phrase", "Polygons", ...}, ...]
      images/<image_id>.jpg
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipseg_jax.evaluate._common import DatasetError, batched, prefetch_map, progress, read_json, require_dir
from clipseg_jax.evaluate._image import load_rgb, normalize01
from clipseg_jax.resize import torch_bilinear_align_corners, torch_nearest
from clipseg_jax.polygons import polygon_mask, polygons_mask  # noqa: F401  (polygon_mask: public here too)

IMAGE_SIZE = 352

#: ``invalid_img_ids`` of CLIPSeg's ``datasets/phrasecut.py``: annotated size != image size.
INVALID_IMAGE_IDS = frozenset(
    {150417, 285665, 498246, 61564, 285743, 498269, 498010, 150516, 150344, 286093, 61530,
     150333, 286065, 285814, 498187, 285761, 498042}
)

SPLITS = ("train", "val", "test", "miniv")

INSTRUCTIONS = (
    "PhraseCut is a manual download: run `python download_dataset.py -s test` of "
    "github.com/ChenyunWu/PhraseCutDataset (annotations + Visual Genome images) and pass "
    "--data-dir PhraseCutDataset/data/VGPhraseCut_v0 (needs image_data_split.json, refer_<split>.json, images/)"
)


@dataclass(frozen=True)
class PhraseCutTask:
    index: int  # position among the evaluated samples (the mIoU "class")
    task_id: str
    image_id: int
    phrase: str
    polygons: tuple  # instances -> polygons -> ((x, y), ...)
    width: int
    height: int


def find_root(data_dir) -> Path:
    """The VGPhraseCut_v0 directory: ``data_dir`` itself or ``data_dir/VGPhraseCut_v0`` or
    ``data_dir/data/VGPhraseCut_v0``."""
    d = require_dir(data_dir)
    for cand in (d, d / "VGPhraseCut_v0", d / "data" / "VGPhraseCut_v0"):
        if (cand / "image_data_split.json").is_file():
            return cand
    raise DatasetError(f"--data-dir {d}: no image_data_split.json in it or in VGPhraseCut_v0/ below it. {INSTRUCTIONS}")


def _check_polygons(polys: Any, where: str) -> tuple:
    if not isinstance(polys, list) or len(polys) == 0:
        raise DatasetError(f"{where}: 'Polygons' must be a non-empty list of instances")
    out = []
    for i, inst in enumerate(polys):
        if not isinstance(inst, list):
            raise DatasetError(f"{where}: Polygons[{i}] must be a list of polygons")
        inst_out = []
        for j, poly in enumerate(inst):
            if not isinstance(poly, list):
                raise DatasetError(f"{where}: Polygons[{i}][{j}] must be a list of [x, y] points")
            pts = []
            for k, pt in enumerate(poly):
                if (
                    not isinstance(pt, (list, tuple))
                    or len(pt) != 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pt)
                ):
                    raise DatasetError(f"{where}: Polygons[{i}][{j}][{k}] = {pt!r} is not an [x, y] pair of numbers")
                pts.append((float(pt[0]), float(pt[1])))
            if pts:
                inst_out.append(tuple(pts))
        out.append(tuple(inst_out))
    if not any(out):
        raise DatasetError(f"{where}: 'Polygons' holds no points")
    return tuple(out)


def read_tasks(data_dir, split: str = "test") -> tuple[Path, list[PhraseCutTask], int]:
    """Read and validate ``refer_<split>.json``.  Returns (root, tasks, n_skipped_invalid).
    Like PhraseCut's RefVGLoader, ``split`` may join splits with '_' (``val_miniv``)."""
    parts = split.split("_") if isinstance(split, str) else [split]
    bad = [p for p in parts if p not in SPLITS]
    if bad or not parts:
        raise DatasetError(f"--split {split!r}: PhraseCut splits are {', '.join(SPLITS)} (joined with '_')")
    root = find_root(data_dir)
    info_path = root / "image_data_split.json"
    infos = read_json(info_path, "image info")
    if not isinstance(infos, list):
        raise DatasetError(f"{info_path}: expected a list of image-info objects, got {type(infos).__name__}")
    size: dict[int, tuple[int, int]] = {}
    for k, im in enumerate(infos):
        try:
            size[int(im["image_id"])] = (int(im["width"]), int(im["height"]))
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{info_path}: entry {k} lacks an integer image_id/width/height") from None
    tasks: list[PhraseCutTask] = []
    skipped = 0
    for part in parts:
        skipped += _read_refer(root / f"refer_{part}.json", part, size, info_path, tasks)
    if not tasks:
        files = ", ".join(f"refer_{p}.json" for p in parts)
        raise DatasetError(f"{root}: no tasks to evaluate in {files} (empty, or only invalid images)")
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir}: images directory not found. {INSTRUCTIONS}")
    for image_id in sorted({t.image_id for t in tasks}):
        if not (img_dir / f"{image_id}.jpg").is_file():
            raise DatasetError(f"{img_dir / f'{image_id}.jpg'}: image of refer_{split}.json not found. {INSTRUCTIONS}")
    return root, tasks, skipped


def _read_refer(refer_path: Path, split: str, size: dict, info_path: Path, tasks: list) -> int:
    """Append the validated tasks of one refer file; returns the number skipped (invalid images)."""
    raw = read_json(refer_path, f"the {split} annotations (refer_{split}.json)")
    if not isinstance(raw, list):
        raise DatasetError(f"{refer_path}: expected a list of tasks, got {type(raw).__name__}")
    skipped = 0
    for k, t in enumerate(raw):
        if not isinstance(t, dict):
            raise DatasetError(f"{refer_path}: task {k} is not an object")
        missing = [key for key in ("task_id", "image_id", "phrase", "Polygons") if key not in t]
        if missing:
            raise DatasetError(f"{refer_path}: task {k} ({t.get('task_id', '?')}) lacks {', '.join(missing)}")
        where = f"{refer_path}: task {t['task_id']}"
        try:
            image_id = int(t["image_id"])
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: image_id {t['image_id']!r} is not an integer") from None
        if image_id in INVALID_IMAGE_IDS:
            skipped += 1
            continue
        if image_id not in size:
            raise DatasetError(f"{where}: image_id {image_id} is not in {info_path.name}")
        if not isinstance(t["phrase"], str) or not t["phrase"].strip():
            raise DatasetError(f"{where}: phrase {t['phrase']!r} is not a non-empty string")
        w, h = size[image_id]
        tasks.append(
            PhraseCutTask(
                index=len(tasks), task_id=str(t["task_id"]), image_id=image_id, phrase=t["phrase"],
                polygons=_check_polygons(t["Polygons"], where), width=w, height=h,
            )
        )
    return skipped


# ----------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------


def task_mask(task: PhraseCutTask) -> np.ndarray:
    """Union of all polygons of all instances at the annotated (height, width), bool."""
    return polygons_mask(task.polygons, task.height, task.width).view(bool)


def eval_view(image: np.ndarray, mask: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """CLIPSeg's PhraseCut test transform, the one definition of it (this protocol and the trainer's validation,
    `data_pipelines.pcplus.eval_dataset`, use it): the whole image squashed to size x size without keeping the
    aspect ratio (torch bilinear, align_corners=True, float32 0..255) and the mask resized with torch's nearest
    (uint8)."""
    return (torch_bilinear_align_corners(image.astype(np.float32), (size, size)),
            torch_nearest(np.asarray(mask).astype(np.uint8), (size, size)))


def load_sample(root: Path, task: PhraseCutTask, size: int = IMAGE_SIZE):
    """(pixel_values float32 (size, size, 3) normalised, target uint8 (size, size))."""
    path = root / "images" / f"{task.image_id}.jpg"
    img = load_rgb(path)
    if img.shape[:2] != (task.height, task.width):
        raise DatasetError(
            f"{path}: image is {img.shape[1]}x{img.shape[0]} but image_data_split.json says "
            f"{task.width}x{task.height} (task {task.task_id})"
        )
    image, target = eval_view(img, task_mask(task), size)
    return normalize01(image / 255.0), target


# ----------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------


def evaluate(engine, data_dir, split: str = "test", limit: int | None = None, show_progress: bool = True,
             workers: int = 4) -> dict:
    """Run the PhraseCut protocol; returns {'metrics': FixedThresholdMetrics.result(), ...}."""
    from clipseg_jax.metrics import FixedThresholdMetrics

    root, tasks, skipped = read_tasks(data_dir, split)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        tasks = tasks[:limit]
    metric = FixedThresholdMetrics()
    bar = progress(len(tasks), f"PhraseCut {split}", show_progress)
    try:
        loaded = prefetch_map(lambda t: (t, *load_sample(root, t)), tasks, workers=workers,
                              ahead=max(32, 3 * engine.batch_size))
        for batch in batched(loaded, engine.batch_size):
            ts = [b[0] for b in batch]
            px = np.stack([b[1] for b in batch])
            tgt = np.stack([b[2] for b in batch])
            probs = engine.text_probs(px, [t.phrase for t in ts])
            metric.add(probs, tgt, np.array([t.index for t in ts]))
            bar.update(len(batch))
    finally:
        bar.close()
    return {
        "metrics": metric.result(),
        "n_samples": len(tasks),
        "n_skipped_invalid_images": skipped,
        "protocol": "CLIPSeg PhraseCut: 352x352 squashed image, raw phrase, skimage polygon2mask ground truth "
        "resized nearest, FixedIntervalMetrics (49 thresholds, +1 smoothing, sample = class)",
    }
