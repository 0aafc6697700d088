"""Where a model trained with `configs/synthetic_shapes.py` errs (docs/benchmarks.md §4.2).

On the held-out synthetic split, at the validation protocol of the trainer (image squashed to the model's input
size, the raw phrase as the condition, threshold 0.3) it prints
- the pooled fgiou (what `eval_metrics.json` reports) and its error split into false-positive pixels near the target
  (within 3 px: boundaries) and far from it (other objects), and false negatives;
- how many of the far false positives lie on pixels of the phrase's colour (its first colour word; every channel
  within 40 levels of the generator's colour), beside how common such pixels are far from the target at all;
- the same by phrase kind (plain "red circle", with a size word, with a relation);
- how the model's text and visual-prompt embeddings separate colours and shapes (mean cosine of pairs of plain
  phrases that share the colour and differ in shape, and the other way round).

    python benchmarks/learning_diagnostics.py --model runs/shapes/model [--data-dir DIR]

`--data-dir`: the synthetic dataset's directory (`data.data_dir`; default: the config's cache location).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def colour_pixels(image, colour: str):
    """Pixels of `image` (H, W, 3 uint8) within 40 levels per channel of the generator's `colour`."""
    import numpy as np

    from data_pipelines.synthetic import COLORS

    return np.abs(image.astype(np.int32) - np.asarray(COLORS[colour])).max(-1) <= 40


def mean_cosine(emb, keys, same_colour: bool, same_shape: bool) -> tuple[float, int]:
    """Mean cosine over pairs of (colour, shape) keys with the given equalities (pairs of identical keys excluded
    unless both equalities are asked for)."""
    import numpy as np

    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    vals = [float(e[i] @ e[j]) for i, j in itertools.combinations(range(len(keys)), 2)
            if (keys[i][0] == keys[j][0]) == same_colour and (keys[i][1] == keys[j][1]) == same_shape]
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained model directory (WORKDIR/model)")
    ap.add_argument("--data-dir", default="", help="the synthetic dataset's data_dir (default: the config's)")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from scipy import ndimage

    import clipseg_jax
    from clipseg_jax.predict import normalize
    from clipseg_jax.prompts import render_visual_prompt
    from clipseg_jax.tokenizer import CLIPTokenizer
    from configs import synthetic_shapes
    from data_pipelines import train_and_eval_sources
    from data_pipelines.pcplus import eval_dataset
    from data_pipelines.synthetic import COLORS, SHAPES

    model = clipseg_jax.from_pretrained(args.model)
    tok = CLIPTokenizer.from_pretrained(args.model)
    size = model.config.vision_config.image_size
    cfg = synthetic_shapes.get_config()
    cfg.data.data_dir = args.data_dir
    _, source = train_and_eval_sources(cfg.data, cfg.eval_data)
    length = cfg.eval_data.text_length

    @jax.jit
    def probs(image, ids, mask):
        return jax.nn.sigmoid(model(normalize(image), input_ids=ids, attention_mask=mask).logits)

    counts = {}  # kind -> [tasks, tp, fp_near, fp_far, fn]
    colour_px = [0, 0, 0]  # far false positives of the phrase's colour, far pixels of that colour, far pixels
    supports, support_keys = [], []
    for b in eval_dataset(source, args.batch_size, size).as_numpy_iterator():
        phrases = [p.decode() for p in b["phrase"]]
        n = len(phrases)
        ids, attn = tok(phrases, length=length)
        pad = args.batch_size - n
        p = np.asarray(probs(np.pad(b["image"], [(0, pad), (0, 0), (0, 0), (0, 0)]), np.pad(ids, [(0, pad), (0, 0)]),
                             np.pad(attn, [(0, pad), (0, 0)])))[:n] > args.threshold
        for k in range(n):
            g = b["mask"][k] > 0
            words = phrases[k].split()
            kind = "relation" if " of " in phrases[k] else "size word" if words[0] in ("small", "large") else "plain"
            near = ndimage.binary_dilation(g, iterations=3)
            c = counts.setdefault(kind, [0, 0, 0, 0, 0])
            c[0] += 1
            c[1] += int((g & p[k]).sum())
            c[2] += int((p[k] & ~g & near).sum())
            c[3] += int((p[k] & ~near).sum())
            c[4] += int((g & ~p[k]).sum())
            colour = next((w for w in words if w in COLORS), None)
            if colour is not None:
                same = colour_pixels(b["image"][k], colour)
                colour_px[0] += int((p[k] & ~near & same).sum())
                colour_px[1] += int((~near & same).sum())
                colour_px[2] += int((~near).sum())
            if kind == "plain" and g.any():
                supports.append(render_visual_prompt(b["image"][k], g, size=size))
                support_keys.append(tuple(words))

    def line(name, c):
        tp, fpn, fpf, fn = c[1:]
        return (f"{name:10s} tasks {c[0]:4d}  pooled fgiou {tp / (tp + fpn + fpf + fn):.4f}  TP {tp}  "
                f"FP near {fpn}  FP far {fpf}  FN {fn}")

    total = [sum(c[i] for c in counts.values()) for i in range(5)]
    print(f"{args.model}: {source.__class__.__name__} validation, {size} px, threshold {args.threshold}")
    print(line("all", total))
    tp, fpn, fpf, fn = total[1:]
    print(f"{'':10s} without the far false positives: {tp / (tp + fpn + fn):.4f}")
    print(f"{'':10s} far false positives on pixels of the phrase's colour: {colour_px[0]} of {fpf} "
          f"({colour_px[0] / max(fpf, 1):.1%}); such pixels among all far from the target: "
          f"{colour_px[1] / max(colour_px[2], 1):.1%}")
    for kind in ("plain", "size word", "relation"):
        if kind in counts:
            print(line(kind, counts[kind]))

    keys = [(c, s) for c in COLORS for s in SHAPES]
    ids, attn = tok([f"{c} {s}" for c, s in keys], length=length)
    text = np.asarray(model.get_text_features(ids, attn), np.float64)
    vis = np.concatenate([np.asarray(model.get_image_features(normalize(jnp.asarray(np.stack(supports[i:i + 64])))),
                                     np.float64) for i in range(0, len(supports), 64)])
    for name, emb, ks in (("text", text, keys), ("visual prompt", vis, support_keys)):
        parts = [("same phrase", True, True), ("same colour, other shape", True, False),
                 ("other colour, same shape", False, True), ("other colour and shape", False, False)]
        if name == "text":
            parts = parts[1:]  # one embedding per phrase
        print(f"{name} embeddings, mean cosine: " + "; ".join(
            f"{label} {mean_cosine(emb, ks, c, s)[0]:.3f}" for label, c, s in parts))


if __name__ == "__main__":
    main()
