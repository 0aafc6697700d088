"""Pascal-VOC generalised zero-shot protocol of CLIPSeg (paper Table 4).

The original (``score.py`` ``test_dataset: pascal_zs`` → ``datasets/pascal_zeroshot.
PascalZeroShot('val', ...)`` on JoEm's ``VOCSegmentation`` + ``models.clipseg.
CLIPSegMultiLabel`` + JoEm's ``Evaluator``), reproduced here:

* Images: VOC2012 ``ImageSets/Segmentation/val.txt`` (1,449), ``JPEGImages/<id>.jpg`` and
  ``SegmentationClass/<id>.png`` (palette PNG, read as class indices, 255 = ignore).
* Image: /255, ImageNet mean/std, then resized to 352×352 without keeping the aspect ratio
  (torchvision ``Resize`` on a tensor: bilinear, half-pixel, no antialiasing).  Label:
  nearest to 352×352.  Evaluation happens at 352×352.
* Prediction: for each of JoEm's 21 class names (``background``, ``airplane``, ...,
  ``tvmonitor``; raw names, no template) the sigmoid of CLIPSeg's logits; the background
  score is multiplied by 3; per-pixel argmax (the original's -10 offset does not change it).
  The image is encoded once and decoded with all 21 prompts.
* Metric: JoEm ``Evaluator(21)``: confusion matrix without 255 pixels; per-class IoU =
  diag / (row + col − diag), a class that never occurs (0/0) counts as 0;
  mIoU over the seen classes, over the unseen classes, their harmonic mean, and over all 21.

Seen/unseen sets (JoEm ``get_unseen_idx`` / ``get_seen_idx``, background is seen):

* unseen-4  = cow, motorbike, airplane, sofa  (training removed pairs ``['zs', 2]``)
* unseen-10 = unseen-4 + cat, tvmonitor, train, bottle, chair, pottedplant  (``['zs', 5]``)

The released ``score.py`` has two bugs (spec §7 items 1–2): it passes ``n_unseen =
remove_classes[1]`` (2 or 5, a number of *pairs*) to ``get_unseen_idx``, which expects 4 or
10 (``get_unseen_idx(2)`` = {cow, motorbike}, ``get_unseen_idx(5)`` = SPNet's {pottedplant,
sheep, sofa, train, tvmonitor}); and it calls ``Evaluator(21, unseen, seen)`` although the
signature is ``Evaluator(num_class, seen, unseen)``, swapping the two columns.  This module
reports the correct sets (``unseen-4`` / ``unseen-10``) and, for comparison with the paper's
Table 4, also what the released script computes from the same confusion matrix
(``as_released_score_py``).

Not reproducible with one checkpoint: Table 4 uses models trained on PhraseCut without the
unseen classes (``rd64-uni-zs2`` / ``-zs5``); the CIDAS weights saw all classes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clipseg_jax.evaluate._common import DatasetError, batched, prefetch_map, progress
from clipseg_jax.evaluate._image import load_label, load_rgb, normalize01
from clipseg_jax.resize import torch_bilinear, torch_nearest
from clipseg_jax.evaluate.pascal5i import find_voc_root
from clipseg_jax.metrics import _confusion_kernel

IMAGE_SIZE = 352
BACKGROUND_FACTOR = 3.0

#: JoEm ``data_loader.VOC``: the 21 class names, used verbatim as prompts.
JOEM_VOC = (
    "background",
    "airplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: JoEm ``get_unseen_idx(n)`` for the ZS3 settings used by CLIPSeg's Table 4.
UNSEEN = {
    4: (1, 10, 14, 18),
    10: (1, 5, 8, 9, 10, 14, 16, 18, 19, 20),
}
#: What the released score.py passes to ``get_unseen_idx`` (pairs 2 and 5): JoEm's sets for 2 and 5.
RELEASED_UNSEEN = {
    2: (10, 14),
    5: (16, 17, 18, 19, 20),
}

INSTRUCTIONS = (
    "Pascal zero-shot needs VOC2012 (ImageSets/Segmentation/val.txt, JPEGImages/, SegmentationClass/); "
    "pass --data-dir .../VOCdevkit/VOC2012"
)


def seen_classes(n_unseen: int) -> tuple[int, ...]:
    return tuple(i for i in range(21) if i not in UNSEEN[n_unseen])


def read_split(data_dir, split: str = "val") -> tuple[Path, list[tuple[str, Path, Path]]]:
    if split not in ("val", "test"):
        raise DatasetError(f"--split {split!r}: the Pascal zero-shot protocol uses VOC2012 val (pass val or test)")
    root = find_voc_root(data_dir, INSTRUCTIONS)
    ids_file = root / "ImageSets" / "Segmentation" / "val.txt"
    if not ids_file.is_file():
        raise DatasetError(f"{ids_file}: not found. {INSTRUCTIONS}")
    if not (root / "SegmentationClass").is_dir():
        raise DatasetError(f"{root / 'SegmentationClass'}: label directory not found. {INSTRUCTIONS}")
    ids = [s.strip() for s in ids_file.read_text().splitlines() if s.strip()]
    if not ids:
        raise DatasetError(f"{ids_file}: the list is empty")
    items = []
    for i in ids:
        img, lab = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
        if not img.is_file():
            raise DatasetError(f"{img}: image of {ids_file.name} not found")
        if not lab.is_file():
            raise DatasetError(f"{lab}: label of {ids_file.name} not found")
        items.append((i, img, lab))
    return root, items


def load_sample(item, size: int = IMAGE_SIZE):
    """(pixel values (S,S,3) float32, label (S,S) uint8 with 255 kept)."""
    _, img_path, lab_path = item
    img = load_rgb(img_path)
    lab = load_label(lab_path)
    if img.shape[:2] != lab.shape:
        raise DatasetError(f"{img_path}: image {img.shape[:2]} and label {lab.shape} sizes differ")
    px = torch_bilinear(normalize01(img.astype(np.float32) / 255.0), (size, size))
    return px, torch_nearest(lab, (size, size))


@partial(jax.jit, static_argnames=("num_classes",))
def _predict_and_count(probs, labels, num_classes: int = 21):
    fac = jnp.ones((num_classes,), jnp.float32).at[0].set(BACKGROUND_FACTOR)
    pred = jnp.argmax(probs * fac[None, :, None, None], axis=1)
    return _confusion_kernel(labels, pred, num_classes=num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """JoEm: diag / (row + col - diag), 0/0 -> 0 (``np.nan_to_num``)."""
    cm = np.asarray(cm, np.float64)
    inter = np.diag(cm)
    union = cm.sum(1) + cm.sum(0) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(inter / union)


def _harmonic(s: float, u: float) -> float:
    return 0.0 if s + u == 0 else 2 * s * u / (s + u)


def zs_metrics(cm: np.ndarray) -> dict:
    iou = iou_per_class(cm)
    out: dict = {
        "overall": float(iou.mean()),
        "per_class_iou": {name: float(v) for name, v in zip(JOEM_VOC, iou)},
    }
    for n in (4, 10):
        s = float(iou[list(seen_classes(n))].mean())
        u = float(iou[list(UNSEEN[n])].mean())
        out[f"unseen-{n}"] = {
            "seen": s, "unseen": u, "harmonic": _harmonic(s, u),
            "unseen_classes": [JOEM_VOC[i] for i in UNSEEN[n]],
        }
    released = {}
    for pairs, idx in RELEASED_UNSEEN.items():
        rest = [i for i in range(21) if i not in idx]
        s = float(iou[list(idx)].mean())  # score.py's "seen" column = mean over get_unseen_idx(pairs)
        u = float(iou[rest].mean())
        released[f"zs{pairs}"] = {"seen": s, "unseen": u, "harmonic": _harmonic(s, u)}
    released["note"] = (
        "what the released score.py reports for remove_classes ['zs', 2] / ['zs', 5]: "
        "get_unseen_idx(2 or 5) and seen/unseen swapped in the Evaluator call (spec section 7 items 1-2)"
    )
    out["as_released_score_py"] = released
    return out


def evaluate(engine, data_dir, split: str = "val", limit: int | None = None, show_progress: bool = True,
             workers: int = 4) -> dict:
    _, items = read_split(data_dir, "val" if split == "test" else split)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    cond = engine.text_embeddings(list(JOEM_VOC))
    cm = jnp.zeros((21, 21), jnp.int32)
    bar = progress(len(items), "Pascal zero-shot", show_progress)
    try:
        loaded = prefetch_map(load_sample, items, workers=workers, ahead=max(32, 3 * engine.batch_size))
        for batch in batched(loaded, engine.batch_size):
            px = np.stack([b[0] for b in batch])
            labels = np.stack([b[1] for b in batch])
            probs = engine.multi_prompt_probs(px, cond)
            cm = cm + _predict_and_count(probs, jnp.asarray(labels))
            bar.update(len(batch))
    finally:
        bar.close()
    cm_np = np.asarray(cm).astype(np.int64)
    return {
        "metrics": zs_metrics(cm_np),
        "confusion_matrix": cm_np.tolist(),
        "n_samples": len(items),
        "prompts": list(JOEM_VOC),
    }
