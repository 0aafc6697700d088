"""The paper's reference numbers (CVPR'22 / arXiv 2112.10003v2) and paper-style tables."""

from __future__ import annotations

#: Table 3, PhraseCut test: (model, threshold, mIoU, IoU_FG, AP).  "CLIPSeg (PC+)" is rd64-uni
#: (HF: CIDAS/clipseg-rd64); the refined model (CIDAS/clipseg-rd64-refined) postdates the paper.
TABLE3_PHRASECUT = (
    ("CLIPSeg (PC+)", 0.3, 43.4, 54.7, 76.7),
    ("CLIPSeg (PC, D=128)", 0.3, 48.2, 56.5, 78.2),
    ("CLIPSeg (PC)", 0.3, 46.1, 56.2, 78.2),
    ("CLIP-Deconv", 0.3, 37.7, 49.5, 71.2),
    ("ViTSeg (PC+)", 0.1, 28.4, 35.4, 58.3),
    ("ViTSeg (PC)", 0.3, 38.9, 51.2, 74.4),
)

#: Table 5, Pascal-5i one-shot (visual support), mean of folds 0-3: (model, t, mIoU, IoU_BIN, AP).
TABLE5_PASCAL5I_ONESHOT = (
    ("CLIPSeg (PC+)", 0.3, 59.5, 75.0, 82.3),
    ("CLIPSeg (PC)", 0.3, 52.3, 69.5, 72.4),
    ("CLIP-Deconv (PC+)", 0.2, 48.0, 65.8, 68.0),
    ("ViTSeg (PC+)", 0.2, 39.0, 59.0, 62.4),
)

#: Table 7, Pascal-5i with text prompts under the one-shot protocol: (model, t, mIoU, IoU_BIN, AP).
TABLE7_PASCAL5I_TEXT = (
    ("CLIPSeg (PC+)", 0.3, 72.4, 83.1, 93.5),
    ("CLIPSeg (PC)", 0.3, 70.3, 81.6, 84.8),
    ("CLIP-Deconv (PC+)", 0.3, 63.2, 77.3, 85.3),
    ("ViTSeg (PC+)", 0.2, 39.0, 59.0, 62.4),
)

#: Table 4, Pascal-VOC zero-shot: (model, unseen-10 mIoU_S, mIoU_U, unseen-4 mIoU_S, mIoU_U).
#: Computed by the released score.py, whose seen/unseen columns are probably swapped (see pascal_zs).
TABLE4_PASCAL_ZS = (
    ("CLIPSeg (PC+)", 35.7, 43.1, 20.8, 47.3),
    ("CLIP-Deconv", 25.1, 36.7, 25.9, 41.9),
    ("ViTSeg", 4.2, 19.0, 6.0, 24.8),
)


def reference(dataset: str, support: str = "visual") -> dict:
    """The paper's numbers for a protocol (percent), for the JSON output."""
    if dataset == "phrasecut":
        cols, rows, table = ("t", "miou", "fgiou", "ap"), TABLE3_PHRASECUT, "Table 3"
    elif dataset == "pascal5i":
        cols = ("t", "miou", "biniou", "ap")
        rows, table = (TABLE5_PASCAL5I_ONESHOT, "Table 5") if support == "visual" else (TABLE7_PASCAL5I_TEXT, "Table 7")
    elif dataset == "pascal_zs":
        cols = ("unseen10_seen", "unseen10_unseen", "unseen4_seen", "unseen4_unseen")
        rows, table = TABLE4_PASCAL_ZS, "Table 4"
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    return {"table": table, "rows": [{"model": r[0], **dict(zip(cols, r[1:]))} for r in rows]}


def _row(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(title: str, header, rows, note: str | None = None) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, _row(header, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(r, widths) for r in rows]
    if note:
        lines.append(note)
    return "\n".join(lines)


def format_table(dataset: str, result: dict, support: str = "visual") -> str:
    """Paper-style table: this run's numbers (percent) next to the paper's."""
    m = result["metrics"]
    if dataset == "phrasecut":
        header = ["PhraseCut test (Table 3)", "t", "mIoU", "IoU_FG", "AP"]
        rows = [
            ["this run", "0.3", _pct(m["miou_0.3"]), _pct(m["fgiou_0.3"]), _pct(m["ap"])],
            ["this run, best t", f"{m['miou_best_t']:g}/{m['fgiou_best_t']:g}", _pct(m["miou_best"]),
             _pct(m["fgiou_best"]), _pct(m["ap"])],
        ]
        rows += [[f"paper {n}", f"{t:g}", f"{a:.1f}", f"{b:.1f}", f"{c:.1f}"] for n, t, a, b, c in TABLE3_PHRASECUT]
        return _table(header[0], header, rows,
                      f"{result['n_samples']} samples. Paper 'CLIPSeg (PC+)' = rd64-uni (CIDAS/clipseg-rd64); "
                      "the refined weights have no published score.")
    if dataset == "pascal5i":
        ref = TABLE5_PASCAL5I_ONESHOT if support == "visual" else TABLE7_PASCAL5I_TEXT
        tab = "Table 5" if support == "visual" else "Table 7"
        fold = result.get("fold", 0)
        which = "mean of folds 0-3" if fold == -1 else f"fold {fold}"
        header = [f"Pascal-5i one-shot, {support} support ({tab})", "t", "mIoU", "IoU_BIN", "AP"]
        rows = [
            [f"this run ({which})", "0.3", _pct(m["miou_0.3"]), _pct(m["biniou_0.3"]), _pct(m["ap"])],
        ]
        if fold != -1:
            rows.append(["this run, best t", f"{m['miou_best_t']:g}/{m['biniou_best_t']:g}", _pct(m["miou_best"]),
                         _pct(m["biniou_best"]), _pct(m["ap"])])
        rows += [[f"paper {n} (folds 0-3)", f"{t:g}", f"{a:.1f}", f"{b:.1f}", f"{c:.1f}"] for n, t, a, b, c in ref]
        return _table(header[0], header, rows,
                      f"{result['n_samples']} episodes. The paper uses one model per fold trained without the "
                      "fold's classes; a model trained on all classes is not that protocol.")
    if dataset == "pascal_zs":
        u10, u4 = m["unseen-10"], m["unseen-4"]
        rel = m["as_released_score_py"]
        header = ["Pascal-VOC zero-shot (Table 4)", "u10 mIoU_S", "u10 mIoU_U", "u4 mIoU_S", "u4 mIoU_U"]
        rows = [
            ["this run (correct sets)", _pct(u10["seen"]), _pct(u10["unseen"]), _pct(u4["seen"]), _pct(u4["unseen"])],
            ["this run as released score.py", _pct(rel["zs5"]["seen"]), _pct(rel["zs5"]["unseen"]),
             _pct(rel["zs2"]["seen"]), _pct(rel["zs2"]["unseen"])],
        ]
        rows += [[f"paper {n}", f"{a:.1f}", f"{b:.1f}", f"{c:.1f}", f"{d:.1f}"] for n, a, b, c, d in TABLE4_PASCAL_ZS]
        return _table(header[0], header, rows,
                      f"{result['n_samples']} images, overall mIoU (21 classes) {_pct(m['overall'])}. The paper's "
                      "numbers come from the released score.py (wrong class sets, seen/unseen swapped); "
                      "Table 4 models were trained without the unseen classes.")
    raise ValueError(f"unknown dataset {dataset!r}")
