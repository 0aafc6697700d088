"""Jitted model calls used by the evaluation protocols.

The protocols feed float ImageNet-normalised images (the originals never quantise the
resized query back to uint8), so this wraps the model's forward directly instead of the
uint8 ``Predictor``.  Batches are padded to a fixed size so each shape compiles once.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipseg_jax._placement import place
from clipseg_jax.model.decoder import resolve_pair_chunk


def _pad_batch(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return x
    pad = np.repeat(x[-1:], n - len(x), axis=0)
    return np.concatenate([x, pad], axis=0)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, pair_chunk: int | None):
    """The jitted model calls for one model structure and decoder chunking. Cached, so every Engine over the same
    structure (several protocols in one process) reuses one compilation per input shape."""

    def text_fn(state, px, ids, mask):
        m = nnx.merge(graphdef, state)
        out = m(px, input_ids=ids, attention_mask=mask, pair_chunk=pair_chunk)
        return jax.nn.sigmoid(out.logits.astype(jnp.float32))

    def visual_fn(state, px, spx):
        m = nnx.merge(graphdef, state)
        return jax.nn.sigmoid(m(px, conditional_pixel_values=spx, pair_chunk=pair_chunk).logits.astype(jnp.float32))

    def text_emb_fn(state, ids, mask):
        m = nnx.merge(graphdef, state)
        return m.get_text_features(ids, mask).astype(jnp.float32)

    def multi_fn(state, px, cond):
        m = nnx.merge(graphdef, state)
        acts = m.encode_image(px)
        k = cond.shape[0]
        n = px.shape[0]
        c = jnp.tile(cond, (n, 1))  # prompt-major within each image
        logits = m.decode(acts, c, prompts_per_image=k, pair_chunk=pair_chunk).astype(jnp.float32)
        return jax.nn.sigmoid(logits).reshape(n, k, *logits.shape[1:])

    return jax.jit(text_fn), jax.jit(visual_fn), jax.jit(text_emb_fn), jax.jit(multi_fn)


class Engine:
    """Probabilities from a CLIPSeg model for the evaluation protocols.

    model: a ``clipseg_jax`` CLIPSeg module; tokenizer: ``clipseg_jax.tokenizer.CLIPTokenizer``.
    All ``*_probs`` methods return device arrays of sigmoid probabilities (float32).
    device: where the model runs (its parameters are committed there); default: the device holding them.
    pair_chunk: (image, prompt) pairs the decoder decodes at a time (``CLIPSegDecoder``); "auto": 1 on a CPU
    device, all at once (None) on accelerators.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, device: jax.Device | None = None,
                 pair_chunk: int | None | str = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        graphdef, state = nnx.split(model)
        self._state, self.device = place(state, device)
        self._pair_chunk = resolve_pair_chunk(pair_chunk, self.device)
        self._text, self._visual, self._text_emb, self._multi = _compiled(graphdef, self._pair_chunk)

    @property
    def pair_chunk(self) -> int | None:
        """(image, prompt) pairs the decoder decodes at a time (bound into the compiled calls); None: all at once."""
        return self._pair_chunk

    @classmethod
    def load(cls, checkpoint: str, dtype: str = "float32", batch_size: int = 8, **kwargs) -> "Engine":
        """Model + tokenizer from an HF directory, hub id or our checkpoint directory; kwargs: see the class."""
        from clipseg_jax import loading
        from clipseg_jax.tokenizer import CLIPTokenizer

        if dtype not in loading.DTYPES:
            raise ValueError(f"dtype must be one of {sorted(loading.DTYPES)}, got {dtype!r}")
        model = loading.from_pretrained(checkpoint, dtype=loading.DTYPES[dtype])
        path = loading.resolve(checkpoint)
        has_tok = any((path / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        tokenizer = CLIPTokenizer.from_pretrained(path if has_tok else None)
        return cls(model, tokenizer, batch_size=batch_size, **kwargs)

    # -- calls ------------------------------------------------------------------------------

    def text_probs(self, pixel_values: np.ndarray, prompts: Sequence[str]) -> jax.Array:
        """pixel_values (N, H, W, 3) normalised float32, one prompt per image -> (N, H, W)."""
        n = len(pixel_values)
        if len(prompts) != n:
            raise ValueError(f"text_probs: {n} images but {len(prompts)} prompts")
        b = max(n, self.batch_size)
        # Fixed length (CLIP's 77): one compilation per batch shape whatever the phrases.
        ids, mask = self.tokenizer(list(prompts) + [prompts[-1]] * (b - n), length=self.tokenizer.max_length)
        out = self._text(self._state, jnp.asarray(_pad_batch(pixel_values, b)), jnp.asarray(ids), jnp.asarray(mask))
        return out[:n]

    def visual_probs(self, pixel_values: np.ndarray, support_pixel_values: np.ndarray) -> jax.Array:
        """One normalised support image per query -> (N, H, W)."""
        n = len(pixel_values)
        if len(support_pixel_values) != n:
            raise ValueError(f"visual_probs: {n} images but {len(support_pixel_values)} supports")
        b = max(n, self.batch_size)
        out = self._visual(
            self._state, jnp.asarray(_pad_batch(pixel_values, b)), jnp.asarray(_pad_batch(support_pixel_values, b))
        )
        return out[:n]

    def text_embeddings(self, prompts: Sequence[str]) -> jax.Array:
        ids, mask = self.tokenizer(list(prompts))
        return self._text_emb(self._state, jnp.asarray(ids), jnp.asarray(mask))

    def multi_prompt_probs(self, pixel_values: np.ndarray, cond: jax.Array) -> jax.Array:
        """Every image with each of K conditional embeddings (one image encoding per
        image) -> (N, K, H, W)."""
        n = len(pixel_values)
        b = max(n, self.batch_size)
        return self._multi(self._state, jnp.asarray(_pad_batch(pixel_values, b)), cond)[:n]
