"""Run the PyTorch (transformers) CLIPSeg and ours on the same inputs and report the differences.

This is how users check converted weights (`python main.py compare --checkpoint DIR`) and how the parity tests and
benchmarks check ours against the reference. Needs the `torch` extra.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipseg_jax.model.clipseg import CLIPSeg
from clipseg_jax.predict import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_PROMPTS = ("a cat", "a remote control on a red sofa", "something to fill")


@dataclasses.dataclass
class Diff:
    path: str  # "text", "visual", "embedding"
    logits: float  # max |Δ logits|
    logits_scale: float  # max |reference logits|
    cond: float  # max |Δ conditional embedding|
    cond_scale: float

    def tolerance(self, rel: float = 1e-4) -> tuple[float, float]:
        return rel * max(1.0, self.logits_scale), rel * max(1.0, self.cond_scale)

    def ok(self, rel: float = 1e-4) -> bool:
        tl, tc = self.tolerance(rel)
        return self.logits <= tl and self.cond <= tc


def torch_model(path: str | os.PathLike):
    """`CLIPSegForImageSegmentation.from_pretrained(path)` in eval mode, float32, eager attention."""
    try:
        import torch  # noqa: F401
        from transformers import CLIPSegForImageSegmentation
    except ImportError:
        raise ImportError("compare needs torch and transformers: pip install 'clipseg-jax[torch]'") from None
    return CLIPSegForImageSegmentation.from_pretrained(str(path), attn_implementation="eager").float().eval()


def compare(
    model: CLIPSeg,
    reference,
    pixel_values: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    conditional_pixel_values: np.ndarray,
) -> list[Diff]:
    """Max abs differences for the text, visual-prompt and given-embedding paths.

    pixel_values / conditional_pixel_values: (B, H, W, 3) normalised float32 NHWC; ids / mask: (B, L).
    """
    import torch

    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))
    pv, cpv = nchw(pixel_values), nchw(conditional_pixel_values)
    ids, am = torch.from_numpy(np.asarray(input_ids, np.int64)), torch.from_numpy(np.asarray(attention_mask, np.int64))
    with jax.default_matmul_precision("highest"), torch.no_grad():
        ref_t = reference(pixel_values=pv, input_ids=ids, attention_mask=am)
        ref_v = reference(pixel_values=pv, conditional_pixel_values=cpv)
        ref_e = reference(pixel_values=pv, conditional_embeddings=ref_t.conditional_embeddings)
        x = jnp.asarray(pixel_values, jnp.float32)
        out_t = model(x, input_ids=jnp.asarray(input_ids), attention_mask=jnp.asarray(attention_mask))
        out_v = model(x, conditional_pixel_values=jnp.asarray(conditional_pixel_values, jnp.float32))
        out_e = model(x, conditional_embeddings=jnp.asarray(ref_t.conditional_embeddings.numpy()))
    diffs = []
    for name, r, o in (("text", ref_t, out_t), ("visual", ref_v, out_v), ("embedding", ref_e, out_e)):
        rl, rc = r.logits.numpy(), r.conditional_embeddings.numpy()
        ol, oc = np.asarray(o.logits, np.float32), np.asarray(o.conditional_embeddings, np.float32)
        if rl.ndim == 2:  # HF squeezes a batch of one
            rl = rl[None]
        diffs.append(Diff(name, float(np.abs(rl - ol).max()), float(np.abs(rl).max()),
                          float(np.abs(rc - oc).max()), float(np.abs(rc).max())))
    return diffs


def standard_inputs(
    model: CLIPSeg, tokenizer, images: Sequence[np.ndarray] | None = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
    size: int = 352, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pixels, ids, mask, conditional pixels) for `compare`: the given images (or smooth random ones) resized like
    the HF processor, one prompt per image (cycled), and the images in reverse order as visual prompts."""
    from clipseg_jax.resize import pil_bilinear

    rng = np.random.default_rng(seed)
    if not images:
        # Smooth random images: low-frequency noise upsampled, so they look like something to the encoder.
        images = [pil_bilinear((rng.random((8, 8, 3)) * 255).astype(np.uint8), (size, size)) for _ in range(len(prompts))]
    n = len(images)
    u8 = np.stack([pil_bilinear(np.asarray(im), (size, size)) for im in images])
    x = (u8.astype(np.float32) / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    texts = [prompts[i % len(prompts)] for i in range(n)]
    ids, mask = tokenizer(texts)
    return x, ids, mask, x[::-1].copy()


def export_for_reference(model: CLIPSeg) -> tempfile.TemporaryDirectory:
    """Our model as a temporary HF directory (for comparing a checkpoint stored in our format)."""
    from clipseg_jax.weights.hf import write_hf_directory

    tmp = tempfile.TemporaryDirectory(prefix="clipseg-compare-")
    write_hf_directory(model, Path(tmp.name) / "hf")
    return tmp
