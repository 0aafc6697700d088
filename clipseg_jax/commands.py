"""What the CLI subcommands do (`main.py` only parses arguments and calls these)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-") or "prompt")


def parse_visual_prompt(spec: str) -> tuple[str, str]:
    """'IMG:MASK' -> (IMG, MASK); the split is at the last ':' so Windows drive letters and odd names survive."""
    img, sep, mask = spec.rpartition(":")
    if not sep or not img or not mask:
        raise ValueError(f"--visual-prompt {spec!r}: expected IMAGE:MASK (two file paths joined by ':')")
    return img, mask


def overlay(image: np.ndarray, prob: np.ndarray, threshold: float, color=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """The image with the thresholded mask tinted in `color` and the probability as tint strength."""
    a = (alpha * np.clip(prob, 0, 1) * (prob > threshold))[..., None]
    return (image.astype(np.float32) * (1 - a) + np.asarray(color, np.float32) * a).round().astype(np.uint8)


def run_predict(
    checkpoint: str, images: Sequence[str], prompts: Sequence[str], visual_prompts: Sequence[str], out: str,
    dtype: str = "float32", threshold: float = 0.5, mode: str = "crop_blur_highlight352",
) -> list[Path]:
    """Write `<image>__<prompt>_mask.png` (0/255 at `threshold`) and `_overlay.png` for every (image, prompt).

    Every input is read and every output computed before anything is written; outputs are moved into `out` only
    once all of them exist, so a failure leaves `out` as it was.
    """
    from clipseg_jax.predict import Predictor, load_image

    if not images:
        raise ValueError("--image: give at least one image")
    if not prompts and not visual_prompts:
        raise ValueError("--prompt / --visual-prompt: give at least one prompt")
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt: empty prompt text")
    arrays = [load_image(p) for p in images]  # fail fast on a bad image, before loading the model
    vps = [parse_visual_prompt(v) for v in visual_prompts]
    for img, mask in vps:
        for f in (img, mask):
            if not Path(f).is_file():
                raise FileNotFoundError(f"--visual-prompt: {f}: no such file")
    pred = Predictor.from_pretrained(checkpoint, dtype=DTYPES[dtype])
    names = [_slug(p) for p in prompts] + [f"visual{j}-{_slug(Path(m).stem)}" for j, (_, m) in enumerate(vps)]
    probs = pred.predict(arrays, list(prompts), visual_prompts=vps, visual_prompt_mode=mode)
    results = list(zip(images, arrays, probs))

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
    written = []
    try:
        stems: dict[str, int] = {}
        for path, arr, probs in results:
            stem = _slug(Path(path).stem, 40)
            stems[stem] = stems.get(stem, 0) + 1
            if stems[stem] > 1:
                stem = f"{stem}-{stems[stem]}"
            for name, p in zip(names, probs):
                base = f"{stem}__{name}"
                Image.fromarray(((p > threshold) * 255).astype(np.uint8), "L").save(tmp / f"{base}_mask.png")
                Image.fromarray(overlay(arr, p, threshold)).save(tmp / f"{base}_overlay.png")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
            written.append(out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def run_convert(
    checkpoint: str | None, out: str, to_hf: bool = False, original_decoder: str | None = None,
    clip_weights: str | None = None, extract_layers: Sequence[int] | None = None,
) -> Path:
    """HF dir / hub id / original `.pth` + OpenAI CLIP weights -> our orbax checkpoint, or (`to_hf`) an HF directory."""
    from clipseg_jax.config import CLIPSegConfig
    from clipseg_jax.loading import from_pretrained, resolve
    from clipseg_jax.weights import hf, store

    src_dir = None
    if original_decoder or clip_weights:
        if not (original_decoder and clip_weights):
            raise ValueError("--original-decoder and --clip-weights go together (decoder .pth + OpenAI ViT-B/16 weights)")
        from clipseg_jax.weights.original import load_torch_state_dict, original_to_hf

        kwargs = {"extract_layers": list(extract_layers)} if extract_layers else {}
        sd, cfg = original_to_hf(load_torch_state_dict(original_decoder), load_torch_state_dict(clip_weights), **kwargs)
        model = hf.model_from_state_dict(sd, CLIPSegConfig.from_dict(cfg), source=str(original_decoder))
    elif checkpoint:
        src_dir = resolve(checkpoint)
        model = from_pretrained(src_dir)
    else:
        raise ValueError("give --checkpoint, or --original-decoder with --clip-weights")
    if to_hf:
        extra = {}
        if src_dir is not None:
            extra = {n: src_dir / n for n in (*store.TOKENIZER_FILES, "preprocessor_config.json") if (src_dir / n).is_file()}
        return hf.write_hf_directory(model, out, extra)
    return store.save(model, out, tokenizer_dir=src_dir)


def run_compare(checkpoint: str, images: Sequence[str] = (), prompts: Sequence[str] = (), size: int = 352) -> bool:
    """Print max |Δ| of logits and conditional embeddings, ours vs transformers, for the three condition paths."""
    from clipseg_jax import compare as cmp
    from clipseg_jax.loading import from_pretrained, resolve
    from clipseg_jax.predict import load_image
    from clipseg_jax.tokenizer import CLIPTokenizer
    from clipseg_jax.weights import store

    path = resolve(checkpoint)
    model = from_pretrained(path)
    keep = None
    ref_dir = path
    if store.is_checkpoint(path):
        keep = cmp.export_for_reference(model)
        ref_dir = Path(keep.name) / "hf"
    reference = cmp.torch_model(ref_dir)
    tok = CLIPTokenizer.from_pretrained(path)
    imgs = [load_image(p) for p in images]
    x, ids, mask, cx = cmp.standard_inputs(model, tok, imgs, tuple(prompts) or cmp.DEFAULT_PROMPTS, size)
    diffs = cmp.compare(model, reference, x, ids, mask, cx)
    print(f"{'path':<10} {'max|Δlogits|':>13} {'max|logits|':>12} {'max|Δcond|':>11} {'max|cond|':>10}  verdict (tol 1e-4·max(1,|ref|))")
    for d in diffs:
        print(f"{d.path:<10} {d.logits:13.3e} {d.logits_scale:12.3e} {d.cond:11.3e} {d.cond_scale:10.3e}  "
              f"{'OK' if d.ok() else 'MISMATCH'}")
    if keep is not None:
        keep.cleanup()
    return all(d.ok() for d in diffs)


def run_train(config_path: str, overrides: Sequence[str], workdir: str) -> int:
    """`main.py train`: load and check the config, train (or resume) in `workdir`. Exit code 0 when training ended
    or stopped on a signal with a checkpoint saved, 1 when it failed (a non-finite loss)."""
    import logging

    from clipseg_jax.train import TrainingError, load_config, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(config_path, overrides)
    try:
        summary = train(config, workdir)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["start_step"]:
        print(f"resumed from step {summary['start_step']}")
    if summary.get("preempted"):
        print(f"stopped at step {summary['step']}; checkpoint saved in {workdir}/checkpoints (rerun to resume)")
    else:
        ev = summary["eval"]
        print(f"trained to step {summary['step']}: validation fgiou {ev['fgiou']:.4f} miou {ev['miou']:.4f} "
              f"ap {ev['ap']:.4f} (threshold {ev['threshold']}); model in {summary['model']}; trained parameters "
              f"{summary['params_fingerprint']}")
    return 0
