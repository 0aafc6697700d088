"""Tests of clipseg_jax.metrics against hand-computed cases, an independent NumPy
implementation of CLIPSeg's formulas, PyTorch's interpolate, and bad input."""

import numpy as np
import pytest

from clipseg_jax.metrics import (
    THRESHOLDS,
    FixedThresholdMetrics,
    confusion_matrix,
    simpson_avg,
)


# ---------------------------------------------------------------------------------------
# Independent NumPy reference, written from the formulas of CLIPSeg's metrics.py
# ---------------------------------------------------------------------------------------


def ref_counts(p, g, valid):
    """Per-sample counts at each of the 49 thresholds; p > float32(t) is foreground."""
    p = p[valid].astype(np.float32)
    g = g[valid].astype(bool)
    rows = []
    for t in np.linspace(0, 1, 51)[1:-1]:
        fg = p > np.float32(t)
        rows.append([np.sum(fg & g), np.sum(fg & ~g), np.sum(~fg & g), np.sum(~fg & ~g)])
    return np.array(rows, dtype=np.int64).T  # (4, 49)


def ref_simpson_avg(y, x):
    """SciPy<1.11 ``simps`` default (even='avg'), via modern scipy.integrate.simpson on
    odd-length pieces (identical rule) plus trapezoids."""
    from scipy.integrate import simpson

    y = np.asarray(y, float)
    x = np.asarray(x, float)
    n = len(y)
    if n < 2:
        return 0.0
    if n % 2 == 1:
        return float(simpson(y, x=x))
    a = (simpson(y[:-1], x=x[:-1]) if n > 2 else 0.0) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    b = (simpson(y[1:], x=x[1:]) if n > 2 else 0.0) + 0.5 * (x[1] - x[0]) * (y[1] + y[0])
    return float(0.5 * (a + b))


def ref_metrics(samples):
    """samples: list of (p (H,W) already at target size, g (H,W), valid (H,W), cls)."""
    total = np.zeros((4, 49), np.int64)
    by_cls = {}
    for p, g, v, c in samples:
        cnt = ref_counts(p, g, v)
        total += cnt
        by_cls[c] = by_cls.get(c, 0) + cnt
    tp, fp, fn, tn = total.astype(float)
    fg = tp / (1 + tp + fp + fn)
    binv = 0.5 * fg + 0.5 * tn / (1 + tn + fn + fp)
    miou = np.mean([c[0] / (1 + c[0] + c[1] + c[2]) for c in by_cls.values()], axis=0)
    keep = tp + fp > 0
    prec = tp / (1 + tp + fp)
    rec = tp / (1 + tp + fn)
    pairs = sorted(set(zip(rec[keep], prec[keep])))
    ap = ref_simpson_avg([q for _, q in pairs], [r for r, _ in pairs]) if pairs else 0.0
    return dict(fgiou=fg, biniou=binv, miou=miou, ap=ap)


def check_against_ref(res, ref):
    for name in ("fgiou", "miou", "biniou"):
        np.testing.assert_allclose(res[f"{name}_scores"], ref[name], rtol=0, atol=1e-6)
        np.testing.assert_allclose(res[f"{name}_best"], ref[name].max(), rtol=0, atol=1e-6)
        assert res[f"{name}_best_t"] == pytest.approx(THRESHOLDS[np.argmax(ref[name])])
        for t in (0.1, 0.2, 0.3, 0.5):
            i = int(round(t * 50)) - 1
            assert res[f"{name}_{t}"] == pytest.approx(ref[name][i], abs=1e-6)
    assert res["ap"] == pytest.approx(ref["ap"], abs=1e-6)


# ---------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------


def test_thresholds_grid():
    assert len(THRESHOLDS) == 49
    assert THRESHOLDS[0] == pytest.approx(0.02) and THRESHOLDS[-1] == pytest.approx(0.98)
    for t in (0.1, 0.2, 0.3, 0.5, 0.24, 0.28):
        assert t in THRESHOLDS.tolist()  # exactly on the grid, as the original relies on


def test_hand_single_sample():
    m = FixedThresholdMetrics()
    p = np.array([[[0.1, 0.6], [0.35, 0.9]]], np.float32)
    g = np.array([[[0, 1], [1, 0]]])
    m.add(p, g, [7])
    r = m.result()
    # t=0.3: fg = {0.6, 0.35, 0.9}: tp=2 fp=1 fn=0 tn=1
    assert r["fgiou_0.3"] == pytest.approx(2 / 4)
    assert r["miou_0.3"] == pytest.approx(2 / 4)
    assert r["biniou_0.3"] == pytest.approx(0.5 * 2 / 4 + 0.5 * 1 / 3)
    # t=0.5: fg = {0.6, 0.9}: tp=1 fp=1 fn=1 tn=1
    assert r["fgiou_0.5"] == pytest.approx(1 / 4)
    # t=0.1: fg = {0.6,0.35,0.9} (0.1 is not > 0.1): same as 0.3
    assert r["fgiou_0.1"] == pytest.approx(2 / 4)
    # t=0.02: all fg: tp=2 fp=2 -> 2/5
    assert r["fgiou_scores"][0] == pytest.approx(2 / 5)
    assert r["fgiou_best"] == pytest.approx(0.5) and r["fgiou_best_t"] == pytest.approx(0.1)
    assert r["summed"]["tp"][14] == 2 and r["summed"]["tn"][14] == 1
    # PR points: t<0.1: (r=2/3, p=2/5); 0.1<=t<0.35: (2/3, 2/4); 0.35<=t<0.6: (1/3, 1/3);
    # 0.6<=t<0.9: (0, 0) since tp=0, fp=1 -> kept (tp+fp>0);  t>=0.9: nothing predicted.
    pts = sorted({(2 / 3, 2 / 5), (2 / 3, 2 / 4), (1 / 3, 1 / 3), (0.0, 0.0)})
    got = [v for pair in r["precision_recall_curve"] for v in pair]
    assert got == pytest.approx([v for pair in pts for v in pair])
    y = [b for _, b in pts]
    # 4 points -> even='avg'. First: Simpson on pts 0..2 (h0=h1=1/3) + trapezoid on last
    # interval (zero width); last: trapezoid on first interval + Simpson on pts 1..3
    # (h0=1/3, h1=0: zero-safe weights give hsum/6*(y1*(2-3)+0+y3*2)).
    simpson_first = (2 / 3) / 6 * (y[0] + 4 * y[1] + y[2])
    trap_first = 0.5 * (1 / 3) * (y[0] + y[1])
    # Written out with the zero-safe rule: h0 = 1/3, h1 = 0 -> h0/h1 := 0, 1/(h0/h1) := 0,
    # hsum/hprod := 0, so the term is hsum/6 * (2*y1 + 2*y3).
    simpson_last = (1 / 3) / 6 * (2 * y[1] + 2 * y[3])
    expected = 0.5 * ((simpson_first + 0.0) + (trap_first + simpson_last))
    assert r["ap"] == pytest.approx(expected)


def test_hand_ignore_pixels():
    m = FixedThresholdMetrics()
    p = np.array([[[0.1, 0.6], [0.35, 0.9]]], np.float32)
    g = np.array([[[0, 1], [1, 255]]])  # 255 is fine where ignored
    ign = np.array([[[False, False], [False, True]]])
    m.add(p, g, [0], ignore=ign)
    r = m.result()
    # t=0.3: tp=2 fp=0 fn=0 tn=1
    assert r["fgiou_0.3"] == pytest.approx(2 / 3)
    assert r["biniou_0.3"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 1 / 2)
    assert r["summed"]["fp"][14] == 0 and r["summed"]["tn"][14] == 1


def test_hand_empty_target_and_per_class_pooling():
    m = FixedThresholdMetrics()
    p = np.full((1, 2, 2), 0.1, np.float32)
    g = np.zeros((1, 2, 2))
    m.add(p, g, [0])  # class 0: empty target, nothing predicted at 0.3 -> 0 / 1 = 0
    # class 1 from two samples; counts are summed before the division.
    p1 = np.array([[[0.9, 0.9], [0.1, 0.1]], [[0.9, 0.1], [0.1, 0.9]]], np.float32)
    g1 = np.array([[[1, 1], [0, 0]], [[1, 1], [0, 0]]])
    m.add(p1, g1, [1, 1])
    r = m.result()
    # class 1 at 0.3: sample a tp=2; sample b tp=1 fp=1 fn=1 -> 3 / (1+3+1+1)
    assert r["miou_0.3"] == pytest.approx(0.5 * (0.0 + 3 / 6))
    # pooled: tp=3 fp=1 fn=1 (class 0 adds nothing at 0.3)
    assert r["fgiou_0.3"] == pytest.approx(3 / 6)
    assert r["n_samples"] == 3 and r["n_classes"] == 2
    # t=0.02: class 0 has 4 fp: 0/(1+0+4) = 0
    assert r["miou_scores"][0] == pytest.approx(0.5 * (0 + 4 / (1 + 4 + 4)))


def test_hand_ties_at_threshold():
    """A probability equal to float32(t) is background at t (p > t, float32 compare)."""
    t03 = np.float32(0.3)
    above = np.nextafter(t03, np.float32(1))
    p = np.array([[[t03, above]]], np.float32)
    g = np.array([[[1, 1]]])
    m = FixedThresholdMetrics()
    m.add(p, g, [0])
    r = m.result()
    i = 14  # t = 0.3
    assert r["summed"]["tp"][i] == 1 and r["summed"]["fn"][i] == 1
    assert r["summed"]["tp"][i - 1] == 2  # t = 0.28
    # Same decision as the original's torch comparison of a float32 tensor with 0.3.
    torch = pytest.importorskip("torch")
    assert (torch.from_numpy(p[0, 0]) > 0.3).tolist() == [False, True]


def test_all_background_prediction_ap_zero():
    m = FixedThresholdMetrics()
    m.add(np.zeros((1, 3, 3), np.float32), np.ones((1, 3, 3)), [0])
    r = m.result()
    assert r["ap"] == 0.0 and r["fgiou_best"] == 0.0 and r["precision_recall_curve"] == []


def test_simpson_avg_hand():
    x = np.array([0, 1 / 3, 2 / 3, 1])
    y = x**2
    # first: Simpson on [0, 2/3] (exact for x^2) + trapezoid on [2/3, 1];
    # last: trapezoid on [0, 1/3] + Simpson on [1/3, 1].
    first = (2 / 3) ** 3 / 3 + 0.5 * (1 / 3) * (4 / 9 + 1)
    last = 0.5 * (1 / 3) * (0 + 1 / 9) + (1 - 1 / 27) / 3
    assert simpson_avg(y, x) == pytest.approx(0.5 * (first + last))
    assert simpson_avg([0, 0.25, 1], [0, 0.5, 1]) == pytest.approx(1 / 3)
    assert simpson_avg([2.0, 4.0], [0.0, 0.5]) == pytest.approx(1.5)
    assert simpson_avg([1.0], [0.3]) == 0.0


def test_simpson_avg_random_vs_scipy():
    rng = np.random.default_rng(0)
    for n in range(2, 12):
        x = np.sort(rng.random(n))
        y = rng.random(n)
        assert simpson_avg(y, x) == pytest.approx(ref_simpson_avg(y, x), abs=1e-12)


# ---------------------------------------------------------------------------------------
# Random data vs the NumPy reference
# ---------------------------------------------------------------------------------------


def test_random_vs_numpy_reference_same_size():
    rng = np.random.default_rng(1)
    m = FixedThresholdMetrics()
    samples = []
    for b in range(4):
        B, H, W = 3, 17, 23
        # mixture of smooth-ish and uniform values, some exactly on thresholds
        p = rng.random((B, H, W)).astype(np.float32)
        p[:, :2] = np.float32(THRESHOLDS[rng.integers(0, 49, size=(B, 2, W))])
        g = (rng.random((B, H, W)) < 0.3).astype(np.uint8)
        if b == 2:
            g[0] = 0  # an empty target
        ign = rng.random((B, H, W)) < 0.1
        cls = rng.integers(0, 4, size=B)
        m.add(p, g, cls, ignore=ign)
        samples += [(p[k], g[k], ~ign[k], int(cls[k])) for k in range(B)]
    res = m.result()
    check_against_ref(res, ref_metrics(samples))
    assert res["n_samples"] == 12


def test_random_vs_reference_with_resize():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    m = FixedThresholdMetrics()
    samples = []
    for H, W in [(40, 31), (19, 52)]:
        p = rng.random((2, 11, 13)).astype(np.float32)
        g = (rng.random((2, H, W)) < 0.4).astype(np.int64)
        # the original's resize of the probabilities
        pt = torch.nn.functional.interpolate(
            torch.from_numpy(p)[:, None], size=(H, W), mode="bilinear", align_corners=True
        )[:, 0].numpy()
        # leave out pixels within 1e-5 of a threshold so float rounding differences
        # between two resize implementations cannot flip a decision
        near = np.min(np.abs(pt[..., None] - THRESHOLDS.astype(np.float32)), axis=-1) < 1e-5
        ign = near | (rng.random((2, H, W)) < 0.05)
        cls = np.array([len(samples), len(samples) + 1])  # PhraseCut-style: sample = class
        m.add(p, g, cls, ignore=ign)
        samples += [(pt[k], g[k], ~ign[k], int(cls[k])) for k in range(2)]
    check_against_ref(m.result(), ref_metrics(samples))


def test_custom_threshold_and_reset():
    m = FixedThresholdMetrics(custom_threshold=0.24)
    p = np.array([[[0.25, 0.23]]], np.float32)
    m.add(p, np.array([[[1, 0]]]), [0])
    r = m.result()
    assert r["ct"] == 0.24 and r["fgiou_ct"] == pytest.approx(1 / 2)
    m.reset()
    with pytest.raises(ValueError, match="no samples"):
        m.result()
    with pytest.raises(ValueError, match="not on the grid"):
        FixedThresholdMetrics(custom_threshold=0.25)


def test_confusion_matrix_vs_bincount():
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 21, size=(3, 16, 16))
    gt[0, :3] = 255
    pred = rng.integers(0, 21, size=(3, 16, 16))
    keep = gt < 21
    ref = np.bincount(21 * gt[keep] + pred[keep], minlength=441).reshape(21, 21)
    np.testing.assert_array_equal(np.asarray(confusion_matrix(gt, pred, 21)), ref)


# ---------------------------------------------------------------------------------------
# Bad input: one clear error
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, probs, targets, cls, ignore, match",
    [
        (dict(resize_pred=False), (1, 4, 4), (1, 5, 5), [0], None, r"differ in shape"),
        ({}, (2, 4, 4), (1, 4, 4), [0], None, r"different batch sizes"),
        ({}, (4, 4), (4, 4), [0], None, r"probs must have shape \(B, h, w\)"),
        ({}, (1, 4, 4), (1, 4, 4), [0, 1], None, r"class_ids must have shape"),
        ({}, (1, 4, 4), (1, 4, 4), [0], (1, 3, 4), r"ignore must have the targets' shape"),
        ({}, (0, 4, 4), (0, 4, 4), [], None, r"empty batch"),
    ],
)
def test_bad_shapes(kwargs, probs, targets, cls, ignore, match):
    m = FixedThresholdMetrics(**kwargs)
    ign = None if ignore is None else np.zeros(ignore, bool)
    with pytest.raises(ValueError, match=match) as e:
        m.add(np.zeros(probs, np.float32), np.zeros(targets), cls, ignore=ign)
    assert "\n" not in str(e.value)


def test_bad_values():
    m = FixedThresholdMetrics()
    with pytest.raises(ValueError, match=r"targets must be 0/1 .* \[2\]"):
        m.add(np.zeros((1, 2, 2), np.float32), np.array([[[0, 2], [1, 0]]]), [0])
    m = FixedThresholdMetrics()
    m.add(np.full((1, 2, 2), 3.0, np.float32), np.zeros((1, 2, 2)), [0])  # logits by mistake
    with pytest.raises(ValueError, match=r"outside \[0, 1\] or NaN; pass probabilities"):
        m.result()
    with pytest.raises(ValueError, match="ignore must be bool"):
        FixedThresholdMetrics().add(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), [0], ignore=np.zeros((1, 2, 2)))
