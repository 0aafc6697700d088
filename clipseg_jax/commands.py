"""What the CLI subcommands do (`main.py` only parses arguments and calls these)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def parse_visual_prompt(spec: str) -> tuple[str, str]:
    """'IMG:MASK' -> (IMG, MASK); the split is at the last ':' so Windows drive letters and odd names survive."""
    img, sep, mask = spec.rpartition(":")
    if not sep or not img or not mask:
        raise ValueError(f"--visual-prompt {spec!r}: expected IMAGE:MASK (two file paths joined by ':')")
    return img, mask


def run_predict(
    checkpoint: str, images: Sequence[str], prompts: Sequence[str], visual_prompts: Sequence[str], out: str,
    dtype: str = "float32", threshold: float = 0.5, mode: str = "crop_blur_highlight352", batch_size: int = 8,
    overwrite: bool = False, save_probs: str | None = None, no_overlay: bool = False, progress: bool = True,
):
    """`main.py predict`: every input checked before the model loads, then `predict_files.run_stream` (outputs
    written as they finish, atomically; images whose outputs all exist are skipped unless `overwrite`).
    Returns the `predict_files.Summary`."""
    from clipseg_jax import predict_files as pf
    from clipseg_jax.images import load_image, load_mask
    from clipseg_jax.prompts import VISUAL_PROMPT_MODES

    if not images:
        raise ValueError("--image: give at least one image")
    if not prompts and not visual_prompts:
        raise ValueError("--prompt / --visual-prompt: give at least one prompt")
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt: empty prompt text")
    if mode not in VISUAL_PROMPT_MODES:
        raise ValueError(f"--visual-prompt-mode {mode!r}: expected one of {', '.join(VISUAL_PROMPT_MODES)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected a positive number of images")
    if save_probs not in (None, "png", "npy"):
        raise ValueError(f"--save-probs {save_probs!r}: expected png or npy")
    threshold = pf.validate_threshold(threshold)
    texts = list(dict.fromkeys(prompts))  # the same text twice is one prompt
    vps = list(dict.fromkeys(parse_visual_prompt(v) for v in visual_prompts))
    visual_arrays = []
    for img, mask in vps:  # small, few: read now so a wrong mask size fails before the model loads
        a = load_image(img)
        visual_arrays.append((a, load_mask(mask, a.shape[:2])))
    paths = pf.expand_images(images, exclude=out)
    for p in paths:
        pf.check_image_file(p)
    out_dir = pf.prepare_out_dir(out)
    pf.remove_partials(out_dir)

    values: list[object] = [*texts, *({"image": i, "mask": m} for i, m in vps)]
    bases = [pf.slug(t) for t in texts] + [f"visual-{pf.slug(Path(m).stem)}" for _, m in vps]
    existing = pf.read_prompts_file(out_dir)
    names = pf.prompt_names(values, bases, existing)
    jobs = pf.plan(paths, names, out_dir, no_overlay=no_overlay, save_probs=save_probs)
    todo, skipped = pf.iter_pending(jobs, overwrite)
    pf.write_prompts_file(out_dir, {**existing, **dict(zip(names, values))})
    if not todo:
        return pf.Summary(skipped=skipped)

    from clipseg_jax.compile_cache import enable_compilation_cache
    from clipseg_jax.loading import DTYPES
    from clipseg_jax.predict import Predictor

    enable_compilation_cache()
    pred = Predictor.from_pretrained(checkpoint, dtype=DTYPES[dtype])
    conds = []
    if texts:
        conds.append(pred.encode_text(texts))
    if vps:
        conds.append(pred.encode_visual(visual_arrays, mode))
    summary = pf.run_stream(pred, todo, np.concatenate(conds), threshold, batch_size=batch_size,
                            no_overlay=no_overlay, save_probs=save_probs, progress=progress)
    summary.skipped = skipped
    return summary


def run_convert(
    checkpoint: str | None, out: str, to_hf: bool = False, original_decoder: str | None = None,
    clip_weights: str | None = None, extract_layers: Sequence[int] | None = None, allow_torchscript: bool = False,
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
        sd, cfg = original_to_hf(load_torch_state_dict(original_decoder, allow_torchscript=allow_torchscript),
                                 load_torch_state_dict(clip_weights, allow_torchscript=allow_torchscript), **kwargs)
        model = hf.model_from_state_dict(sd, CLIPSegConfig.from_dict(cfg), source=str(original_decoder))
    elif checkpoint:
        src_dir = resolve(checkpoint)
        model = from_pretrained(src_dir)
    else:
        raise ValueError("give --checkpoint, or --original-decoder with --clip-weights")
    if to_hf:
        extra: dict = {}
        if src_dir is not None:
            extra = {n: src_dir / n for n in store.PROCESSOR_FILES if (src_dir / n).is_file()}
        # CLIPSegProcessor.from_pretrained(out) must work: fill in what the source lacked
        defaults = hf.default_processor_files()
        if not any(n in extra for n in ("tokenizer.json", "vocab.json")):
            extra.update({n: defaults[n] for n in ("vocab.json", "merges.txt", "tokenizer_config.json",
                                                   "special_tokens_map.json")})
        if not any(n in extra for n in ("processor_config.json", "preprocessor_config.json")):
            extra["processor_config.json"] = defaults["processor_config.json"]
        return hf.write_hf_directory(model, out, extra)
    return store.save(model, out, tokenizer_dir=src_dir)


def run_compare(checkpoint: str, images: Sequence[str] = (), prompts: Sequence[str] = (), size: int = 352) -> bool:
    """Print max |Δ| of logits and conditional embeddings, ours vs transformers, for the three condition paths."""
    from clipseg_jax import compare as cmp
    from clipseg_jax.images import load_image
    from clipseg_jax.loading import from_pretrained, resolve
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

    from clipseg_jax.train.config import load_config

    # The config is checked before jax, flax and TensorFlow load: a mistyped override fails in a fraction of a second.
    config = load_config(config_path, overrides)
    from clipseg_jax.compile_cache import enable_compilation_cache
    from clipseg_jax.train.loop import TrainingError, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    enable_compilation_cache()  # a resumed run does not compile its step again
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
