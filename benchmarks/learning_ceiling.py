"""What bounds `configs/synthetic_shapes.py` on its held-out split (docs/benchmarks.md §4.2), in three measurements:

- `oracles`: fgiou (pooled, as `eval_metrics.json`) of rules that never look at shape, applied to the validation
  view of each task (image squashed to 128², raw phrase): *colour* marks every pixel of the phrase's colour
  (within 40 levels per channel of the generator's colour); *colour+size+relation* then keeps, for "small"/"large"
  phrases, the colour's connected components of that size class, and for "X left of Y" the components of X's colour
  on that side of a component of Y's colour. No model; pixel-exact outlines.
- `probe --model DIR`: can the trained ViT's patch tokens tell which shape they belong to? A linear classifier
  (softmax regression, standardised features) per block on the tokens of patches inside an object (≥ 60 % covered by
  a plain task's mask) and on its edge patches (15–60 %), fitted on training-split tasks, scored on validation tasks;
  colour the same way as a control.
- `supervised`: the config's random ViT (same init, same seed) trained on that per-patch shape label directly
  (cross-entropy on a linear head after the last block, AdamW, batch 32): how fast can this architecture learn shape
  when it is the whole training signal?

    XDG_CACHE_HOME=/tmp/shapes_cache python benchmarks/learning_ceiling.py oracles
    XDG_CACHE_HOME=/tmp/shapes_cache python benchmarks/learning_ceiling.py probe --model runs/shapes/model
    XDG_CACHE_HOME=/tmp/shapes_cache python benchmarks/learning_ceiling.py supervised --steps 1500 --lr 1e-3 \
        [--vision hidden_size=128 intermediate_size=256]

The synthetic set is the config's (prepared on first use, `data.data_dir` = `--data-dir`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from learning_diagnostics import colour_pixels  # noqa: E402  (this script's folder is on sys.path)

SIZE_SPLIT = 0.035  # image fraction between the generator's small (r ≤ 0.12 min side) and large (r ≥ 0.16) shapes


def config(data_dir: str):
    """`configs/synthetic_shapes.py` on the synthetic set under `data_dir` ('' = the config's location)."""
    from configs import synthetic_shapes

    cfg = synthetic_shapes.get_config()
    cfg.data.data_dir = data_dir
    return cfg


def sources(cfg):
    """(training source, validation source) of the config (the set is written and prepared on first use)."""
    from data_pipelines import train_and_eval_sources

    return train_and_eval_sources(cfg.data, cfg.eval_data)


def views(source, size: int):
    """(image uint8, mask bool, phrase) of every task in the validation protocol's view."""
    from data_pipelines.pcplus import eval_dataset

    for b in eval_dataset(source, 32, size).as_numpy_iterator():
        for k, p in enumerate(b["phrase"]):
            yield b["image"][k], b["mask"][k] > 0, p.decode()


def colour_components(image: np.ndarray, colour: str) -> list[np.ndarray]:
    from scipy import ndimage

    lab, n = ndimage.label(colour_pixels(image, colour))
    return [c for c in (lab == i for i in range(1, n + 1)) if c.sum() >= 4]


def shape_blind_masks(image: np.ndarray, phrase: str) -> tuple[np.ndarray, np.ndarray]:
    """(colour rule, colour+size+relation rule) predictions for one task."""
    from data_pipelines.synthetic import COLORS

    words = phrase.split()
    comps = colour_components(image, next(w for w in words if w in COLORS))
    empty = np.zeros(image.shape[:2], bool)
    union = lambda cs: np.any(cs, axis=0) if cs else empty  # noqa: E731
    keep = comps
    if words[0] in ("small", "large") and comps:
        want_small = words[0] == "small"
        keep = [c for c in comps if (c.mean() < SIZE_SPLIT) == want_small] or comps
    if " of " in phrase and comps:
        i = words.index("of")
        refs = [np.nonzero(r)[1].mean() for r in colour_components(image, words[i + 1])]
        left = words[i - 1] == "left"
        side = (lambda x, r: x < r) if left else (lambda x, r: x > r)  # strict: a component is not its own reference
        if refs:
            keep = [c for c in comps if any(side(np.nonzero(c)[1].mean(), r) for r in refs)] or comps
    return union(comps), union(keep)


def oracles(args) -> None:
    _, val = sources(config(args.data_dir))
    counts = np.zeros((2, 3))
    n = 0
    for image, mask, phrase in views(val, 128):
        for j, pred in enumerate(shape_blind_masks(image, phrase)):
            counts[j] += [(mask & pred).sum(), (pred & ~mask).sum(), (mask & ~pred).sum()]
        n += 1
    for name, (tp, fp, fn) in zip(("colour", "colour+size+relation"), counts):
        print(f"{name:22s} rule, {n} validation tasks: pooled fgiou {tp / (tp + fp + fn):.4f}")


def patch_coverage(source, size: int, patch: int, limit: int | None = None):
    """(images (N, S, S, 3), the fraction of each patch the task's mask covers (N, patches), shape index (N,),
    colour index (N,)) of the plain and size-word tasks (relations name two objects)."""
    from data_pipelines.synthetic import COLORS, SHAPES

    g = size // patch
    images, covers, shapes, colours = [], [], [], []
    for image, mask, phrase in views(source, size):
        if " of " in phrase:
            continue
        words = phrase.split()
        images.append(image)
        covers.append(mask.reshape(g, patch, g, patch).mean((1, 3)).reshape(-1))
        shapes.append(SHAPES.index(words[-1]))
        colours.append(list(COLORS).index(words[-2]))
        if limit and len(images) >= limit:
            break
    return np.stack(images), np.stack(covers), np.array(shapes, np.int32), np.array(colours, np.int32)


def labels_in(cover: np.ndarray, label: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per-patch labels (N, patches): the task's label where its mask covers a fraction in [lo, hi), else -1."""
    return np.where((cover >= lo) & (cover < hi), label[:, None], -1).astype(np.int32)


def linear_probe(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, steps: int = 600) -> float:
    """Validation accuracy of softmax regression (standardised features, small L2) fitted by full-batch Adam."""
    import jax
    import jax.numpy as jnp
    import optax

    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = jnp.asarray((xtr - mu) / sd), jnp.asarray((xva - mu) / sd)
    k = int(max(ytr.max(), yva.max())) + 1
    params = (jnp.zeros((xtr.shape[1], k)), jnp.zeros(k))

    def loss(p):
        logp = jax.nn.log_softmax(xtr @ p[0] + p[1])
        return -jnp.take_along_axis(logp, jnp.asarray(ytr)[:, None], 1).mean() + 1e-3 * (p[0] ** 2).sum()

    opt = optax.adam(0.05)
    state = opt.init(params)
    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
        updates, state = opt.update(grad(params), state)
        params = optax.apply_updates(params, updates)
    return float(((xva @ params[0] + params[1]).argmax(1) == jnp.asarray(yva)).mean())


def probe(args) -> None:
    import jax
    import jax.numpy as jnp

    import clipseg_jax
    from clipseg_jax.predict import normalize

    train, val = sources(config(args.data_dir))
    model = clipseg_jax.from_pretrained(args.model)
    v = model.config.vision_config
    blocks = tuple(range(v.num_hidden_layers))

    @jax.jit
    def tokens(images):
        out, _ = model.clip.vision_model(normalize(images), extract_layers=blocks)
        return jnp.stack(out)[:, :, 1:]  # (blocks, B, patches, D)

    def features(images):
        return np.concatenate([np.asarray(tokens(jnp.asarray(images[i:i + 64]))) for i in range(0, len(images), 64)],
                              1)

    tr_i, tr_c, tr_s, tr_k = patch_coverage(train, v.image_size, v.patch_size, limit=args.train_tasks)
    va_i, va_c, va_s, va_k = patch_coverage(val, v.image_size, v.patch_size)
    ftr, fva = features(tr_i), features(va_i)
    print(f"{args.model}: linear probes on patch tokens, {v.image_size} px, patch {v.patch_size}")
    for part, lo, hi in (("inside (>= 60 % covered)", 0.6, 1.01), ("edge (15-60 % covered)", 0.15, 0.6)):
        on_tr, on_va = labels_in(tr_c, tr_s, lo, hi) >= 0, labels_in(va_c, va_s, lo, hi) >= 0
        str_, ctr = labels_in(tr_c, tr_s, lo, hi)[on_tr], labels_in(tr_c, tr_k, lo, hi)[on_tr]
        sva, cva = labels_in(va_c, va_s, lo, hi)[on_va], labels_in(va_c, va_k, lo, hi)[on_va]
        prior = np.bincount(sva).max() / len(sva)
        print(f"{part}: {len(str_)} training / {len(sva)} validation patches; majority shape {prior:.3f}")
        for b in blocks:
            print(f"  after block {b}: shape {linear_probe(ftr[b][on_tr], str_, fva[b][on_va], sva):.3f}, "
                  f"colour {linear_probe(ftr[b][on_tr], ctr, fva[b][on_va], cva):.3f}")


def supervised(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from clipseg_jax.predict import normalize
    from clipseg_jax.train.state import build_model

    cfg = config(args.data_dir)
    v = cfg.model.vision
    for kv in args.vision:
        key, value = kv.split("=", 1)
        if key not in v:
            raise SystemExit(f"error: --vision {kv}: model.vision has no field {key!r} (fields: {', '.join(v)})")
        v[key] = type(v[key])(value)
    train, val = sources(cfg)
    tr_i, tr_c, tr_k, _ = patch_coverage(train, v.image_size, v.patch_size)
    va_i, va_c, va_k, _ = patch_coverage(val, v.image_size, v.patch_size)
    tr_s, va_s = labels_in(tr_c, tr_k, 0.5, 1.01), labels_in(va_c, va_k, 0.5, 1.01)
    model, _, _ = build_model(cfg, jnp.float32, jnp.float32)

    class ShapeHead(nnx.Module):
        def __init__(self, vit, rngs: nnx.Rngs):
            self.vit = vit
            self.head = nnx.Linear(v.hidden_size, 3, rngs=rngs)

        def __call__(self, images):
            out, _ = self.vit(normalize(images), extract_layers=(v.num_hidden_layers - 1,))
            return self.head(out[0][:, 1:])

    net = ShapeHead(model.clip.vision_model, nnx.Rngs(cfg.seed))
    opt = nnx.Optimizer(net, optax.adamw(args.lr, weight_decay=0.01), wrt=nnx.Param)

    def loss_fn(net, images, labels):
        logp = jax.nn.log_softmax(net(images))
        on = labels >= 0
        nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
        return (nll * on).sum() / jnp.maximum(on.sum(), 1)

    @nnx.jit
    def step(net, opt, images, labels):
        loss, grads = nnx.value_and_grad(loss_fn)(net, images, labels)
        opt.update(net, grads)
        return loss

    @nnx.jit
    def predict(net, images):
        return net(images).argmax(-1)

    def accuracy(images, labels):
        right = total = 0
        for i in range(0, len(images), 64):
            p, y = np.asarray(predict(net, jnp.asarray(images[i:i + 64]))), labels[i:i + 64]
            right, total = right + (p[y >= 0] == y[y >= 0]).sum(), total + (y >= 0).sum()
        return right / total

    prior = np.bincount(va_s[va_s >= 0]).max() / (va_s >= 0).sum()
    print(f"per-patch shape, supervised: {len(tr_i)} training / {len(va_i)} validation tasks, lr {args.lr}, "
          f"batch 32; majority shape {prior:.3f}")
    rng, t0 = np.random.default_rng(cfg.seed), time.time()
    for s in range(1, args.steps + 1):
        idx = rng.integers(0, len(tr_i), 32)
        loss = step(net, opt, jnp.asarray(tr_i[idx]), jnp.asarray(tr_s[idx]))
        if s % args.every == 0 or s == args.steps:
            print(f"  step {s}: loss {float(loss):.3f}, validation patch accuracy {accuracy(va_i, va_s):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="", help="the synthetic dataset's data_dir (default: the config's)")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("oracles", help="shape-blind rules on the validation split")
    p = sub.add_parser("probe", help="linear probes of a trained model's patch tokens")
    p.add_argument("--model", required=True, help="a trained model directory (WORKDIR/model)")
    p.add_argument("--train-tasks", type=int, default=3000, help="training-split tasks the probe is fitted on")
    s = sub.add_parser("supervised", help="the config's random ViT trained on per-patch shape directly")
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--every", type=int, default=250)
    s.add_argument("--vision", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change the config's ViT, e.g. hidden_size=128 intermediate_size=256")
    args = ap.parse_args()
    {"oracles": oracles, "probe": probe, "supervised": supervised}[args.what](args)


if __name__ == "__main__":
    main()
