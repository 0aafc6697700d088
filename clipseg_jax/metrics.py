"""CLIPSeg's fixed-threshold segmentation metrics, with the counting done on device.

This reproduces ``metrics.FixedIntervalMetrics`` of the released CLIPSeg code
(timojl/clipseg ``metrics.py`` at 77c4e2d, used by ``score.py`` with
``sigmoid=True, resize_pred=True, n_values=51``).  The definitions kept exactly:

* **Thresholds.** ``np.linspace(0, 1, 51)[1:-1]``: the 49 values 0.02, 0.04, ... 0.98.
  A pixel is foreground at threshold ``t`` when ``p > t`` (strictly), compared in
  float32 like the original (a float32 torch tensor compared with a Python float
  is evaluated in float32), so a probability equal to ``float32(t)`` is background.
* **Input.** Probabilities, not logits (the original applies the sigmoid inside
  the metric; here the caller does).  Predictions are resized to the ground-truth
  size with bilinear interpolation, ``align_corners=True`` (PyTorch's index and
  weight formulas), when ``resize_pred`` is set.  The resized values agree with PyTorch's CPU result
  to about one float32 ulp (summation order / fused multiply-adds), so a pixel lying within
  that rounding of a threshold may fall on the other side (effect on the metrics < 1e-5).
  Ground truths are padded internally to multiples of 64 (as ignored pixels) so that many
  ground-truth sizes share a few compilations.
* **Ignore mask.** Pixels with ``ignore=True`` are removed before counting (the
  original keeps the pixels where its ``gt[1]`` mask is 1; Pascal uses it for 255).
* **Per-sample counts.** tp, fp, fn, tn for each of the 49 thresholds, per sample,
  accumulated (summed) over the whole dataset and, separately, per class.
* **IoU_FG(t)** = Σtp / (1 + Σtp + Σfp + Σfn), pooled over all samples.
* **IoU_BIN(t)** = 0.5·IoU_FG(t) + 0.5·Σtn / (1 + Σtn + Σfn + Σfp), pooled.
* **mIoU(t)** = mean over classes c of tp_c / (1 + tp_c + fp_c + fn_c), with the
  counts summed within the class.  For PhraseCut every sample is its own class
  (the original passes the dataset index), for Pascal-5i it is the fold class.
  A class whose samples have no foreground and no false positives scores 0.
* **AP** = Simpson integral of the pooled precision/recall curve:
  precision_t = Σtp / (1 + Σtp + Σfp), recall_t = Σtp / (1 + Σtp + Σfn), only for
  thresholds with Σtp + Σfp > 0, duplicate (recall, precision) pairs removed,
  sorted by recall, integrated over recall (no normalisation to the recall range).
  The integral is ``scipy.integrate.simps(precisions, recalls)`` with the default
  of the SciPy of 2022 (``even='avg'``: for an even number of points, the mean of
  "Simpson on the first N-1 points + trapezoid on the last interval" and "trapezoid
  on the first interval + Simpson on the last N-1 points").  SciPy >= 1.11 changed
  that default, so the rule is implemented here (``simpson_avg``) instead of
  calling SciPy.
* ``*_best`` is the maximum over the 49 thresholds, ``*_best_t`` the first
  threshold reaching it (``np.argmax``).

Two corner cases where the original is undefined and this module chooses:

* Ties in recall with different precision (only possible when Σtp is the same at
  two thresholds but Σfp differs): the original sorts by recall alone and keeps the
  set's iteration order for ties, and SciPy 1.x divided by the zero interval width
  (nan).  Here pairs are sorted by (recall, precision) and zero-width intervals use
  modern SciPy's zero-safe Simpson weights.  On real datasets (millions of pixels)
  Σtp changes at every threshold and this never happens.
* No pixel predicted foreground at any threshold: the original raises
  ``AssertionError('no predictions is made')``; here ``ap`` is 0.0.

Usage::

    m = FixedThresholdMetrics()
    m.add(probs, targets, class_ids, ignore=None)   # (B,h,w) [0,1], (B,H,W) {0,1}, (B,), (B,H,W) bool
    m.result()   # {'ap', 'fgiou_0.3', 'miou_0.3', 'biniou_0.3', 'fgiou_best', 'fgiou_best_t', ...}
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipseg_jax.resize import bilinear_with_taps_jax, torch_bilinear_align_corners_taps

__all__ = [
    "THRESHOLDS",
    "FixedThresholdMetrics",
    "threshold_counts",
    "simpson_avg",
    "confusion_matrix",
]

#: The 49 thresholds of the original, float64 as in ``np.linspace(0, 1, 51)[1:-1]``.
THRESHOLDS: np.ndarray = np.linspace(0, 1, 51)[1:-1]
#: Thresholds at which values are reported by name (all lie exactly on the grid).
REPORTED_THRESHOLDS = (0.1, 0.2, 0.3, 0.5)

_COUNT_NAMES = ("tp", "fp", "fn", "tn")


def _thresholds(n_values: int) -> np.ndarray:
    return np.linspace(0, 1, n_values)[1:-1]


def _threshold_index(grid: np.ndarray, t: float) -> int:
    """Index of ``t`` on the grid (exact within 1e-9), else ValueError."""
    hits = np.nonzero(np.abs(grid - float(t)) < 1e-9)[0]
    if len(hits) != 1:
        raise ValueError(
            f"threshold {t!r} is not on the grid of {len(grid)} thresholds "
            f"{grid[0]:.4g}...{grid[-1]:.4g} (step {grid[1] - grid[0]:.4g})"
        )
    return int(hits[0])


# ----------------------------------------------------------------------------------------
# Resize taps padded to size buckets (one compiled kernel per bucket, not per image size)
# ----------------------------------------------------------------------------------------


_BUCKET = 64


def _bucket(n: int) -> int:
    return -(-n // _BUCKET) * _BUCKET


@functools.lru_cache(maxsize=256)
def _padded_taps(n_in: int, n_out: int, n_pad: int):
    """``torch_bilinear_align_corners_taps`` extended to ``n_pad`` outputs (extra outputs: index 0, weight 0)."""
    i0, i1, l0, l1 = torch_bilinear_align_corners_taps(n_in, n_out)
    extra = n_pad - n_out
    if extra == 0:
        return i0, i1, l0, l1
    zi = np.zeros(extra, np.int32)
    zf = np.zeros(extra, np.float32)
    return (np.concatenate([i0, zi]), np.concatenate([i1, zi]), np.concatenate([l0, zf]), np.concatenate([l1, zf]))


# ----------------------------------------------------------------------------------------
# Device-side counting
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("resize",))
def _count_kernel(probs, targets, valid, thresholds, ty, tx, resize: bool):
    """Per-sample tp/fp/fn/tn at each threshold.

    probs (B,h,w) float32; targets (B,H,W) bool; valid (B,H,W) bool.
    Returns counts (B, 4, T) int32 in the order tp, fp, fn, tn, and the number of
    prediction values outside [0, 1] or NaN (B,) int32.
    """
    probs = probs.astype(jnp.float32)
    bad = jnp.sum(~((probs >= 0.0) & (probs <= 1.0)), axis=(1, 2)).astype(jnp.int32)
    if resize:
        probs = bilinear_with_taps_jax(probs, ty, tx)
    return threshold_counts(probs, targets, valid, thresholds), bad


def threshold_counts(probs, targets, valid=None, thresholds=None) -> jax.Array:
    """Per-sample tp, fp, fn, tn at each threshold, (B, 4, T) int32, for same-sized probs (B, H, W) float and
    targets (B, H, W) bool; `valid` (B, H, W) bool leaves pixels out; `thresholds` default: `THRESHOLDS`.

    Traceable (no resize, no checks): for use inside a jitted step, e.g. a trainer's validation, whose counts then
    go to `FixedThresholdMetrics.add_counts`.
    """
    thresholds = jnp.asarray((THRESHOLDS if thresholds is None else thresholds), jnp.float32)
    B = probs.shape[0]
    p = probs.astype(jnp.float32).reshape(B, 1, -1)
    g = targets.astype(bool).reshape(B, 1, -1)
    v = jnp.ones_like(g) if valid is None else valid.reshape(B, 1, -1)
    fg = p > thresholds.reshape(1, -1, 1)  # (B, T, N)
    pos = g & v
    neg = (~g) & v
    tp = jnp.sum(fg & pos, axis=2, dtype=jnp.int32)
    fp = jnp.sum(fg & neg, axis=2, dtype=jnp.int32)
    n_pos = jnp.sum(pos, axis=2, dtype=jnp.int32)
    n_neg = jnp.sum(neg, axis=2, dtype=jnp.int32)
    fn = n_pos - tp
    tn = n_neg - fp
    return jnp.stack([tp, fp, fn, tn], axis=1)


def simpson_avg(y, x) -> float:
    """``scipy.integrate.simps(y, x)`` as in SciPy < 1.11 (``even='avg'``), with the
    zero-safe weights of newer SciPy for zero-width intervals.  0.0 for < 2 points."""
    y = np.asarray(y, np.float64)
    x = np.asarray(x, np.float64)
    n = len(y)
    if n != len(x):
        raise ValueError(f"simpson_avg: y has {n} points, x has {len(x)}")
    if n < 2:
        return 0.0
    if n % 2 == 1:
        return float(_simpson_odd(y, x))
    first = _simpson_odd(y[:-1], x[:-1]) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    last = _simpson_odd(y[1:], x[1:]) + 0.5 * (x[1] - x[0]) * (y[1] + y[0])
    return float(0.5 * (first + last))


def _simpson_odd(y: np.ndarray, x: np.ndarray) -> float:
    """Composite Simpson over an odd number of (possibly unevenly spaced) points."""
    if len(y) < 3:
        return 0.0
    h = np.diff(x)
    h0, h1 = h[0::2], h[1::2]
    y0, y1, y2 = y[0:-2:2], y[1:-1:2], y[2::2]
    hsum = h0 + h1
    hprod = h0 * h1
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(h1 != 0, h0 / np.where(h1 != 0, h1, 1.0), 0.0)
        inv_r = np.where(r != 0, 1.0 / np.where(r != 0, r, 1.0), 0.0)
        mid = np.where(hprod != 0, hsum / np.where(hprod != 0, hprod, 1.0), 0.0)
    return float(np.sum(hsum / 6.0 * (y0 * (2.0 - inv_r) + y1 * hsum * mid + y2 * (2.0 - r))))


class FixedThresholdMetrics:
    """CLIPSeg's ``FixedIntervalMetrics`` (see the module docstring for the definitions).

    Args:
      n_values: number of grid points of ``np.linspace(0, 1, n_values)``; the end
        points 0 and 1 are dropped, so the default 51 gives the original's 49
        thresholds.
      resize_pred: resize predictions bilinearly (align_corners) to the target size.
        When False, predictions and targets must have the same shape.
      custom_threshold: optional extra threshold (must lie on the grid) reported as
        ``*_ct`` (the original's ``custom_threshold``; Pascal-5i configs use 0.24).
    """

    def __init__(self, n_values: int = 51, resize_pred: bool = True, custom_threshold: float | None = None):
        if n_values < 3:
            raise ValueError(f"n_values must be >= 3, got {n_values}")
        self.thresholds = _thresholds(n_values)
        self._thr32 = jnp.asarray(self.thresholds.astype(np.float32))
        self.resize_pred = bool(resize_pred)
        self.custom_threshold = custom_threshold
        self._ct_index = None if custom_threshold is None else _threshold_index(self.thresholds, custom_threshold)
        self._named_index = {}
        for t in REPORTED_THRESHOLDS:
            try:
                self._named_index[t] = _threshold_index(self.thresholds, t)
            except ValueError:
                pass
        self.reset()

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        T = len(self.thresholds)
        self._total = np.zeros((4, T), np.int64)
        self._per_class: dict[Any, np.ndarray] = {}
        self._pending: list[tuple[jax.Array, jax.Array, np.ndarray, int]] = []
        self._n_samples = 0
        self._n_add = 0

    @property
    def n_samples(self) -> int:
        return self._n_samples + sum(len(c) for _, _, c, _ in self._pending)

    # -- adding --------------------------------------------------------------------------

    def add(self, probs, targets, class_ids, ignore=None) -> None:
        """Add a batch.

        probs: (B, h, w) probabilities in [0, 1] (numpy or jax; any float dtype).
        targets: (B, H, W) ground truth, bool or numbers in {0, 1} (values at ignored
          pixels are not checked).
        class_ids: (B,) class of each sample (ints; any hashable scalars work).
        ignore: optional (B, H, W) bool, True = pixel left out of every count.
        """
        self._n_add += 1
        call = f"FixedThresholdMetrics.add() call #{self._n_add}"
        p_shape = tuple(np.shape(probs))
        t_shape = tuple(np.shape(targets))
        if len(p_shape) != 3:
            raise ValueError(f"{call}: probs must have shape (B, h, w), got {p_shape}")
        if len(t_shape) != 3:
            raise ValueError(f"{call}: targets must have shape (B, H, W), got {t_shape}")
        if p_shape[0] != t_shape[0]:
            raise ValueError(f"{call}: probs {p_shape} and targets {t_shape} have different batch sizes")
        if p_shape[0] == 0:
            raise ValueError(f"{call}: empty batch (B = 0)")
        if not self.resize_pred and p_shape != t_shape:
            raise ValueError(f"{call}: probs {p_shape} and targets {t_shape} differ in shape (resize_pred=False)")
        if min(p_shape[1:]) < 1 or min(t_shape[1:]) < 1:
            raise ValueError(f"{call}: zero-sized image: probs {p_shape}, targets {t_shape}")
        cls = np.asarray(class_ids)
        if cls.shape != (p_shape[0],):
            raise ValueError(f"{call}: class_ids must have shape ({p_shape[0]},), got {cls.shape}")
        if cls.dtype.kind == "f":
            raise ValueError(f"{call}: class_ids must be integers, got dtype {cls.dtype}")

        tgt = np.asarray(targets)
        if ignore is None:
            valid = np.ones(t_shape, bool)
        else:
            ign = np.asarray(ignore)
            if ign.shape != t_shape:
                raise ValueError(f"{call}: ignore must have the targets' shape {t_shape}, got {ign.shape}")
            if ign.dtype != np.bool_:
                raise ValueError(f"{call}: ignore must be bool (True = pixel left out), got dtype {ign.dtype}")
            valid = ~ign
        if tgt.dtype == np.bool_:
            tgt_b = tgt
        else:
            if tgt.dtype.kind not in "biuf":
                raise ValueError(f"{call}: targets must be bool or numeric, got dtype {tgt.dtype}")
            nonbin = valid & (tgt != 0) & (tgt != 1)
            if nonbin.any():
                bad_vals = np.unique(tgt[nonbin])[:5].tolist()
                raise ValueError(
                    f"{call}: targets must be 0/1 outside ignored pixels, found values {bad_vals} "
                    f"(pass target == class and an ignore mask for 255)"
                )
            tgt_b = tgt == 1

        H, W = t_shape[1], t_shape[2]
        resize = (p_shape[1], p_shape[2]) != (H, W)
        if resize:
            # Targets are padded (as ignored pixels) to multiples of _BUCKET so that
            # ground truths of many sizes (Pascal: original resolution) share a few compilations.
            Hb, Wb = _bucket(H), _bucket(W)
            if (Hb, Wb) != (H, W):
                pad = ((0, 0), (0, Hb - H), (0, Wb - W))
                tgt_b = np.pad(tgt_b, pad)
                valid = np.pad(valid, pad)
            ty = tuple(jnp.asarray(a) for a in _padded_taps(p_shape[1], H, Hb))
            tx = tuple(jnp.asarray(a) for a in _padded_taps(p_shape[2], W, Wb))
        else:
            ty = tx = None
        counts, bad = _count_kernel(
            jnp.asarray(probs), jnp.asarray(tgt_b), jnp.asarray(valid), self._thr32, ty, tx, resize=resize
        )
        self._pending.append((counts, bad, cls, self._n_add))
        if len(self._pending) >= 32:
            self._flush()

    def add_counts(self, counts, class_ids) -> None:
        """Add per-sample counts computed elsewhere (`threshold_counts` at this metric's thresholds):
        counts (B, 4, T) integers in the order tp, fp, fn, tn; class_ids (B,)."""
        c = np.asarray(counts)
        cls = np.asarray(class_ids)
        if c.ndim != 3 or c.shape[1:] != (4, len(self.thresholds)):
            raise ValueError(f"add_counts: counts must have shape (B, 4, {len(self.thresholds)}), got {c.shape}")
        if cls.shape != (c.shape[0],):
            raise ValueError(f"add_counts: class_ids must have shape ({c.shape[0]},), got {cls.shape}")
        self._n_add += 1
        self._pending.append((c, np.zeros(len(cls), np.int32), cls, self._n_add))
        if len(self._pending) >= 32:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for counts, bad, cls, n_add in pending:
            bad = np.asarray(bad)
            if bad.any():
                raise ValueError(
                    f"FixedThresholdMetrics.add() call #{n_add}: probs contain {int(bad.sum())} values outside "
                    f"[0, 1] or NaN; pass probabilities (sigmoid of the logits), not logits"
                )
            c = np.asarray(counts).astype(np.int64)  # (B, 4, T)
            self._total += c.sum(axis=0)
            for k, key in enumerate(cls.tolist()):
                acc = self._per_class.get(key)
                if acc is None:
                    self._per_class[key] = c[k].copy()
                else:
                    acc += c[k]
            self._n_samples += len(cls)

    # -- results -------------------------------------------------------------------------

    def counts(self) -> dict[str, np.ndarray]:
        """Pooled counts: {'tp','fp','fn','tn'} -> (T,) int64."""
        self._flush()
        return {k: self._total[i].copy() for i, k in enumerate(_COUNT_NAMES)}

    def class_counts(self) -> dict[Any, dict[str, np.ndarray]]:
        self._flush()
        return {c: {k: a[i].copy() for i, k in enumerate(_COUNT_NAMES)} for c, a in self._per_class.items()}

    def result(self) -> dict[str, Any]:
        """All metrics as a JSON-serialisable dict (see module docstring)."""
        self._flush()
        if self._n_samples == 0:
            raise ValueError("FixedThresholdMetrics.result(): no samples were added")
        tp, fp, fn, tn = (self._total[i].astype(np.float64) for i in range(4))
        fgiou = tp / (1.0 + tp + fp + fn)
        biniou = 0.5 * fgiou + 0.5 * tn / (1.0 + tn + fn + fp)
        per_cls = np.stack(list(self._per_class.values())).astype(np.float64)  # (C, 4, T)
        ctp, cfp, cfn = per_cls[:, 0], per_cls[:, 1], per_cls[:, 2]
        miou = np.mean(ctp / (1.0 + ctp + cfp + cfn), axis=0)

        made = (tp + fp) > 0
        precision = tp / (1.0 + tp + fp)
        recall = tp / (1.0 + tp + fn)
        pairs = sorted(set(zip(recall[made].tolist(), precision[made].tolist())))
        if pairs:
            rec, prec = zip(*pairs)
            ap = simpson_avg(prec, rec)
        else:
            ap = 0.0

        grid = self.thresholds
        out: dict[str, Any] = {"ap": float(ap)}
        for name, scores in (("fgiou", fgiou), ("miou", miou), ("biniou", biniou)):
            best = int(np.argmax(scores))
            out[f"{name}_best"] = float(scores[best])
            out[f"{name}_best_t"] = round(float(grid[best]), 6)
            for t, i in self._named_index.items():
                out[f"{name}_{t}"] = float(scores[i])
            if self._ct_index is not None:
                out[f"{name}_ct"] = float(scores[self._ct_index])
        if self._ct_index is not None:
            out["ct"] = float(self.custom_threshold)
        out["n_samples"] = int(self._n_samples)
        out["n_classes"] = int(len(self._per_class))
        out["thresholds"] = [round(float(t), 6) for t in grid]
        out["fgiou_scores"] = fgiou.tolist()
        out["miou_scores"] = miou.tolist()
        out["biniou_scores"] = biniou.tolist()
        out["precision_recall_curve"] = [list(p) for p in pairs]
        out["summed"] = {k: self._total[i].tolist() for i, k in enumerate(_COUNT_NAMES)}
        return out


# ----------------------------------------------------------------------------------------
# Multi-class confusion matrix (Pascal zero-shot, JoEm's Evaluator)
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _confusion_kernel(gt, pred, num_classes: int):
    gt = gt.reshape(-1).astype(jnp.int32)
    pred = pred.reshape(-1).astype(jnp.int32)
    valid = (gt >= 0) & (gt < num_classes)
    idx = jnp.where(valid, gt * num_classes + pred, num_classes * num_classes)
    counts = jnp.zeros(num_classes * num_classes + 1, jnp.int32).at[idx].add(1)
    return counts[:-1].reshape(num_classes, num_classes)


def confusion_matrix(gt, pred, num_classes: int) -> jax.Array:
    """JoEm ``Evaluator._generate_matrix``: rows = ground truth, cols = prediction;
    ground-truth values outside [0, num_classes) (e.g. 255) are left out.
    Computed on device; returns (num_classes, num_classes) int32."""
    if tuple(np.shape(gt)) != tuple(np.shape(pred)):
        raise ValueError(f"confusion_matrix: gt {tuple(np.shape(gt))} and pred {tuple(np.shape(pred))} differ in shape")
    return _confusion_kernel(jnp.asarray(gt), jnp.asarray(pred), num_classes=num_classes)
