"""Pascal-5i one-shot protocol of CLIPSeg (paper Table 5; with text prompts Table 7).

The original (``score.py`` ``test_dataset: pascal`` → ``datasets/pfe_dataset.PFEPascalWrapper``
→ PFENet ``SemData(split=fold, mode='val', shot=1)``), reproduced here:

* Images: PFENet's ``lists/pascal/val.txt`` (the 1,449 VOC2012 val images, labels from
  ``SegmentationClassAug``).  Fold k tests classes 5k+1 ... 5k+5 (VOC order).  An image
  is used when it holds a fold class with >= 2·32·32 pixels; one pass over that list.
* Episode per image: a fold class present in the image (any pixel count) is drawn, then a
  support image of that class (from the images holding >= 2048 pixels of it), not the
  query.  PFENet draws with the unseeded global ``random``; here a ``random.Random(seed)``
  (seed 0 + fold by default) makes episodes reproducible, drawn with the same calls
  (``randint(1, n) - 1``).
* Query and support: PFENet ``test_Resize(352)``: longer side to 352, both sides floored
  to multiples of 8 (bilinear, half-pixel), pasted top-left on a black 352×352 canvas,
  ImageNet-normalised; the support label is nearest-resized and padded with 255.
* Support prompt: ``crop_blur_highlight352`` of the support (``clipseg_jax.prompts.
  render_visual_prompt``, which works on uint8, so the resized support is rounded to
  uint8 first: <= 0.5/255 per channel), or the text ``"a photo of a {name}."`` with the
  names of CLIPSeg's ``pascal_classes.json`` (``--support text``, Table 7).
* Ground truth: the original-resolution label pasted top-left into an L×L canvas
  (L = max(H, W)) filled with 255; 255 pixels are ignored.  The 352×352 probability map is
  resized to L×L (bilinear, align_corners) by the metric.
* Metric: ``FixedThresholdMetrics``, class = index of the class within the fold (mIoU over
  the 5 fold classes), IoU_BIN and AP pooled.  Paper columns: ``miou_0.3``,
  ``biniou_0.3``, ``ap``; over folds the original averages each value (``--fold -1``).

Not reproducible with one checkpoint: the paper evaluates fold k with a model trained on
PhraseCut **without** fold k's classes (``rd64-uni-phrasepas5i-k``).  The published
CIDAS weights saw all classes, so their Pascal-5i numbers are not the Table 5 protocol.

Layout (``--data-dir`` = the ``VOC2012`` directory, or ``VOCdevkit`` above it)::

    VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClassAug/<id>.png        grayscale class ids, 255 = ignore (SBD "aug" labels)
      lists/pascal/val.txt                 PFENet's list ("JPEGImages/x.jpg SegmentationClassAug/x.png")
                                           optional: else built from ImageSets/Segmentation/val.txt
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipseg_jax.evaluate._common import DatasetError, batched, prefetch_map, progress, require_dir
from clipseg_jax.evaluate._image import load_label, load_rgb, normalize01, normalize255, pfenet_test_resize

IMAGE_SIZE = 352
MIN_PIXELS = 2 * 32 * 32

#: CLIPSeg ``datasets/pascal_classes.json`` (id 1..20 -> name), used in "a photo of a {name}.".
PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

INSTRUCTIONS = (
    "Pascal-5i needs VOC2012 (JPEGImages/) with the SBD-augmented labels SegmentationClassAug/ "
    "(as for PFENet/HSNet) and optionally PFENet's lists/pascal/val.txt copied into the VOC2012 directory; "
    "pass --data-dir .../VOCdevkit/VOC2012"
)


def fold_classes(fold: int) -> list[int]:
    """PFENet ``sub_val_list``: the 5 test classes of a fold (VOC ids)."""
    if fold not in (0, 1, 2, 3):
        raise DatasetError(f"--fold {fold}: Pascal-5i folds are 0, 1, 2, 3 (or -1 for all four)")
    return list(range(5 * fold + 1, 5 * fold + 6))


def find_voc_root(data_dir, instructions: str = INSTRUCTIONS) -> Path:
    """The VOC2012 folder: `data_dir` itself, or VOC2012/ or VOCdevkit/VOC2012/ below it. `instructions`: what
    the calling protocol needs, for the error."""
    d = require_dir(data_dir)
    for cand in (d, d / "VOC2012", d / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"--data-dir {d}: no JPEGImages/ in it or in VOC2012/ below it. {instructions}")


def read_list(root: Path) -> tuple[list[tuple[Path, Path]], str]:
    """(image path, label path) pairs of the val list, and where the list came from."""
    pfe = root / "lists" / "pascal" / "val.txt"
    if pfe.is_file():
        pairs = []
        for n, line in enumerate(pfe.read_text().splitlines(), 1):
            parts = line.strip().split(" ")
            if not line.strip():
                continue
            if len(parts) != 2:
                raise DatasetError(f"{pfe}:{n}: expected 'image_path label_path', got {line.strip()!r}")
            pairs.append((root / parts[0], root / parts[1]))
        source = str(pfe)
    else:
        ids_file = root / "ImageSets" / "Segmentation" / "val.txt"
        if not ids_file.is_file():
            raise DatasetError(f"{root}: neither lists/pascal/val.txt nor ImageSets/Segmentation/val.txt found. {INSTRUCTIONS}")
        label_dir = "SegmentationClassAug"
        if not (root / label_dir).is_dir():
            if (root / "SegmentationClass").is_dir():
                label_dir = "SegmentationClass"
            else:
                raise DatasetError(f"{root}: no SegmentationClassAug/ (or SegmentationClass/) label directory. {INSTRUCTIONS}")
        ids = [s.strip() for s in ids_file.read_text().splitlines() if s.strip()]
        pairs = [(root / "JPEGImages" / f"{i}.jpg", root / label_dir / f"{i}.png") for i in ids]
        source = f"{ids_file} with {label_dir}/"
    if not pairs:
        raise DatasetError(f"{source}: the list is empty")
    for img, lab in pairs:
        if not img.is_file():
            raise DatasetError(f"{img}: image of the val list not found. {INSTRUCTIONS}")
        if not lab.is_file():
            raise DatasetError(f"{lab}: label of the val list not found. {INSTRUCTIONS}")
    return pairs, source


@dataclass(frozen=True)
class Episode:
    index: int
    query: tuple[Path, Path]
    support: tuple[Path, Path]
    class_id: int  # VOC id 1..20
    fold_index: int  # 0..4 within the fold (the metric's class)


def _class_pixels(label_path: Path) -> np.ndarray:
    lab = load_label(label_path)
    return np.bincount(lab.reshape(-1), minlength=256)


def make_episodes(pairs: list[tuple[Path, Path]], fold: int, seed: int = 0, workers: int = 4,
                  counts: list[np.ndarray] | None = None) -> list[Episode]:
    """PFENet ``make_dataset`` + ``SemData.__getitem__`` episode sampling for one fold."""
    classes = fold_classes(fold)
    if counts is None:
        counts = list(prefetch_map(lambda p: _class_pixels(p[1]), pairs, workers=workers))
    data_list: list[int] = []
    class_files: dict[int, list[int]] = {c: [] for c in classes}
    for i, cnt in enumerate(counts):
        big = [c for c in classes if cnt[c] >= MIN_PIXELS]
        if big:
            data_list.append(i)
            for c in big:
                class_files[c].append(i)
    if not data_list:
        raise DatasetError(
            f"fold {fold}: no image of the val list holds a fold class ({', '.join(PASCAL_CLASSES[c - 1] for c in classes)}) "
            f"with >= {MIN_PIXELS} pixels"
        )
    rng = random.Random(seed)
    episodes = []
    for i in data_list:
        present = [c for c in classes if counts[i][c] > 0]  # np.unique order = ascending ids
        chosen = present[rng.randint(1, len(present)) - 1]
        files = class_files[chosen]
        if not any(j != i for j in files):
            raise DatasetError(
                f"{pairs[i][0]}: no other image holds >= {MIN_PIXELS} pixels of "
                f"'{PASCAL_CLASSES[chosen - 1]}', so it has no support"
            )
        rng.randint(1, len(files))  # PFENet draws once before its loop and discards the draw
        j = i
        while j == i:
            j = files[rng.randint(1, len(files)) - 1]
        episodes.append(Episode(len(episodes), pairs[i], pairs[j], chosen, classes.index(chosen)))
    return episodes


def load_episode(ep: Episode, support_mode: str, size: int = IMAGE_SIZE):
    """(query pixel values (S,S,3), support pixel values (S,S,3) or None, target (L,L) uint8,
    ignore (L,L) bool)."""
    from clipseg_jax.prompts import render_visual_prompt

    img = load_rgb(ep.query[0])
    lab = load_label(ep.query[1])
    if img.shape[:2] != lab.shape:
        raise DatasetError(f"{ep.query[0]}: image {img.shape[:2]} and label {lab.shape} sizes differ")
    q, _ = pfenet_test_resize(img.astype(np.float32), lab.astype(np.float32), size)
    L = max(lab.shape)
    canvas = np.full((L, L), 255, np.uint8)
    canvas[: lab.shape[0], : lab.shape[1]] = lab
    target = (canvas == ep.class_id).astype(np.uint8)
    ignore = canvas == 255
    support = None
    if support_mode == "visual":
        s_img = load_rgb(ep.support[0])
        s_lab = load_label(ep.support[1])
        if s_img.shape[:2] != s_lab.shape:
            raise DatasetError(f"{ep.support[0]}: image {s_img.shape[:2]} and label {s_lab.shape} sizes differ")
        binary = np.where(s_lab == 255, 255, (s_lab == ep.class_id).astype(np.uint8)).astype(np.float32)
        s, s_y = pfenet_test_resize(s_img.astype(np.float32), binary, size)
        s_u8 = np.clip(np.rint(s), 0, 255).astype(np.uint8)
        prompt = render_visual_prompt(s_u8, s_y == 1, mode="crop_blur_highlight352", size=size)
        support = normalize01(prompt.astype(np.float32) / 255.0)
    return normalize255(q), support, target, ignore


def text_prompt(class_id: int) -> str:
    return f"a photo of a {PASCAL_CLASSES[class_id - 1]}."


def evaluate_fold(engine, data_dir, fold: int, support: str = "visual", limit: int | None = None, seed: int | None = None,
                  show_progress: bool = True, workers: int = 4, _cache: dict | None = None) -> dict:
    from clipseg_jax.metrics import FixedThresholdMetrics

    if support not in ("visual", "text"):
        raise DatasetError(f"--support {support!r}: expected 'visual' or 'text'")
    root = find_voc_root(data_dir)
    if _cache is not None and "pairs" in _cache:
        pairs, source, counts = _cache["pairs"], _cache["source"], _cache["counts"]
    else:
        pairs, source = read_list(root)
        counts = list(prefetch_map(lambda p: _class_pixels(p[1]), pairs, workers=workers))
        if _cache is not None:
            _cache.update(pairs=pairs, source=source, counts=counts)
    seed = fold if seed is None else seed
    episodes = make_episodes(pairs, fold, seed=seed, counts=counts)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        episodes = episodes[:limit]
    metric = FixedThresholdMetrics()
    bar = progress(len(episodes), f"Pascal-5i fold {fold} ({support})", show_progress)
    try:
        loaded = prefetch_map(lambda e: (e, *load_episode(e, support)), episodes, workers=workers,
                              ahead=max(32, 3 * engine.batch_size))
        for batch in batched(loaded, engine.batch_size):
            eps = [b[0] for b in batch]
            px = np.stack([b[1] for b in batch])
            if support == "visual":
                probs = engine.visual_probs(px, np.stack([b[2] for b in batch]))
            else:
                probs = engine.text_probs(px, [text_prompt(e.class_id) for e in eps])
            for k, (e, _, _, tgt, ign) in enumerate(batch):
                metric.add(probs[k : k + 1], tgt[None], [e.fold_index], ignore=ign[None])
            bar.update(len(batch))
    finally:
        bar.close()
    return {
        "metrics": metric.result(),
        "n_samples": len(episodes),
        "fold": fold,
        "fold_classes": [PASCAL_CLASSES[c - 1] for c in fold_classes(fold)],
        "seed": seed,
        "list": source,
    }


def evaluate(engine, data_dir, fold: int = 0, support: str = "visual", limit: int | None = None,
             seed: int | None = None, show_progress: bool = True, workers: int = 4) -> dict:
    """One fold (0..3), or ``fold=-1``: all four folds and their mean (as ``score.py``)."""
    if fold != -1:
        fold_classes(fold)  # validates
        out = evaluate_fold(engine, data_dir, fold, support, limit, seed, show_progress, workers)
        out["support"] = support
        return out
    cache: dict = {}
    per_fold = [evaluate_fold(engine, data_dir, k, support, limit, seed, show_progress, workers, cache) for k in range(4)]
    keys = [
        k for k, v in per_fold[0]["metrics"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("n_")
    ]
    mean = {k: float(np.mean([f["metrics"][k] for f in per_fold])) for k in keys}
    return {
        "metrics": mean,
        "n_samples": sum(f["n_samples"] for f in per_fold),
        "fold": -1,
        "folds": per_fold,
        "support": support,
        "list": per_fold[0]["list"],
    }
