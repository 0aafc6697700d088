"""Jitted inference: each image is encoded once for any number of text and visual prompts.

Host side: decode, convert to RGB uint8, resize to 352x352 exactly as the HF processor does (PIL bilinear), tokenize.
Device side (jitted, bucketed static shapes): uint8 -> ImageNet normalisation, the 10 ViT blocks the decoder needs,
the decoder for every (image, prompt) pair, sigmoid. Text embeddings are cached per prompt string.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from clipseg_jax._placement import place
# Re-exported: the loaders live in a module without jax, so the CLI checks its inputs before jax loads.
from clipseg_jax.images import ImageLike, load_image, load_mask  # noqa: F401
from clipseg_jax.model.clipseg import CLIPSeg
from clipseg_jax.model.decoder import resolve_pair_chunk
from clipseg_jax.prompts import IMAGENET_MEAN, IMAGENET_STD
from clipseg_jax.resize import pil_bilinear, torch_bilinear_matrix
from clipseg_jax.tokenizer import CLIPTokenizer

PROMPT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def normalize(pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., 3) -> ImageNet-normalised float, on device (what the HF processor does after its resize)."""
    x = pixels.astype(jnp.float32) * (1.0 / 255.0)
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x.astype(dtype)


def resize_probs(p: np.ndarray, h: int, w: int) -> np.ndarray:
    """(K, S, S) -> (K, h, w) bilinear, as two small matmuls on the host (no recompilation per image size)."""
    if p.shape[-2:] == (h, w):
        return p
    mh, mw = torch_bilinear_matrix(p.shape[-2], h), torch_bilinear_matrix(p.shape[-1], w)
    return np.clip(np.einsum("hi,kij,wj->khw", mh, p, mw, optimize=True), 0.0, 1.0)


def _resize_probs_device(p: jax.Array, mh: jax.Array, mw: jax.Array) -> jax.Array:
    """(N, K, S, S) -> (N, K, h, w): `resize_probs` on device; full f32 matmuls (no TF32/bf16 passes)."""
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("hi,nkij->nkhj", mh, p, precision=hp)
    return jnp.clip(jnp.einsum("nkhj,wj->nkhw", x, mw, precision=hp), 0.0, 1.0)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


class Predictor:
    """Text- and visual-prompted segmentation with one image encoding per image.

    >>> pred = Predictor.from_pretrained("CIDAS/clipseg-rd64-refined")
    >>> probs = pred.predict(["cats.jpg"], ["a cat", "a remote"])   # (1, 2, H, W) float32 in [0, 1]
    """

    def __init__(self, model: CLIPSeg, tokenizer: CLIPTokenizer | None = None, image_size: int = 352,
                 text_cache_size: int = 4096, max_images_per_call: int | None = None,
                 resize_on_device: bool | None = None, host_threads: int | None = None,
                 device: jax.Device | None = None, pair_chunk: int | None | str = "auto"):
        """device: where the model runs (its parameters are committed there); default: the device holding them.
        The defaults below depend on that device's platform.
        max_images_per_call: images encoded per jitted call. Default: 1 on CPU, where a batch of 4 ViT-B/16
        passes at 352 takes ~1.7x longer than 4 single passes (working set out of cache; transformers shows the
        same), 64 on accelerators.
        resize_on_device: resize probabilities back to the image size in a jitted matmul next to the model (default
        on accelerators, where the host einsum would cost more than the network) instead of on the host.
        host_threads: threads for decoding/resizing inputs on the host (PIL releases the GIL); default: CPU count,
        at most 16.
        pair_chunk: (image, prompt) pairs the decoder decodes at a time (`CLIPSegDecoder`); "auto": 1 on CPU,
        all at once (None) on accelerators."""
        self._graphdef, state = nnx.split(model)
        self._state, self.device = place(state, device)
        on_cpu = self.device.platform == "cpu"
        self._pair_chunk = resolve_pair_chunk(pair_chunk, self.device)
        if max_images_per_call is None:
            max_images_per_call = 1 if on_cpu else IMAGE_BUCKETS[-1]
        self.image_chunk = _bucket(max_images_per_call, IMAGE_BUCKETS)
        self.resize_on_device = (not on_cpu) if resize_on_device is None else resize_on_device
        self._host_threads = host_threads or min(16, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.model = model
        self.tokenizer = tokenizer or CLIPTokenizer.from_pretrained(None)
        self.image_size = image_size
        self.dtype = model.dtype
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._jit_text = jax.jit(self._text_fn)
        self._jit_image_features = jax.jit(self._image_features_fn)
        # Bound now, not read at trace time: the compiled calls and `pair_chunk` cannot disagree.
        self._jit_segment = jax.jit(functools.partial(self._segment_fn, pair_chunk=self._pair_chunk))
        self._jit_segment_pairs = jax.jit(functools.partial(self._segment_pairs_fn, pair_chunk=self._pair_chunk))
        self._jit_resize = jax.jit(_resize_probs_device)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype=jnp.float32, **kwargs) -> "Predictor":
        from clipseg_jax.loading import from_pretrained, resolve

        path = resolve(name_or_path)
        return cls(from_pretrained(path, dtype=dtype), CLIPTokenizer.from_pretrained(path), **kwargs)

    @property
    def pair_chunk(self) -> int | None:
        """(image, prompt) pairs the decoder decodes at a time; None: all of a call's pairs in one pass."""
        return self._pair_chunk

    # -- jitted pieces (pure functions of the split model state) ------------------------------------------
    def _text_fn(self, state, ids, mask):
        return nnx.merge(self._graphdef, state).get_text_features(ids, mask).astype(jnp.float32)

    def _image_features_fn(self, state, pixels_u8):
        return nnx.merge(self._graphdef, state).get_image_features(normalize(pixels_u8, self.dtype)).astype(jnp.float32)

    def _segment_fn(self, state, pixels_u8, cond, pair_chunk):
        """pixels (N, S, S, 3) uint8, cond (K, P): all N*K pairs -> probabilities (N, K, S, S)."""
        model = nnx.merge(self._graphdef, state)
        acts = model.encode_image(normalize(pixels_u8, self.dtype))
        n, k = pixels_u8.shape[0], cond.shape[0]
        cond_pairs = jnp.tile(cond, (n, 1))  # image-major, prompt-minor: pair i*K + j
        logits = model.decode(acts, cond_pairs, prompts_per_image=k, pair_chunk=pair_chunk)
        return jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(n, k, *logits.shape[1:])

    def _segment_pairs_fn(self, state, pixels_u8, cond, pair_chunk):
        """One condition per image: pixels (N, S, S, 3), cond (N, P) -> (N, S, S)."""
        model = nnx.merge(self._graphdef, state)
        logits = model.decode(model.encode_image(normalize(pixels_u8, self.dtype)), cond, pair_chunk=pair_chunk)
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    def clear_cache(self) -> None:
        """Forget cached text embeddings (benchmarks use this to time the text encoder on every call)."""
        self._text_cache.clear()

    # -- conditions -----------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """(K, projection_dim) text embeddings; cached per string, new ones encoded in bucketed batches."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one text (or visual) prompt")
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for start in range(0, len(todo), PROMPT_BUCKETS[-1]):
            chunk = todo[start:start + PROMPT_BUCKETS[-1]]
            ids, mask = self.tokenizer(chunk)
            kb = _bucket(len(chunk), PROMPT_BUCKETS)
            pad = kb - len(chunk)
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
            emb = np.asarray(self._jit_text(self._state, ids, mask))
            for p, e in zip(chunk, emb):
                self._text_cache[p] = e
                if len(self._text_cache) > self._text_cache_size:
                    self._text_cache.popitem(last=False)
        return np.stack([self._text_cache[p] for p in prompts])

    def encode_visual(self, visual_prompts: Sequence[tuple[ImageLike, ImageLike]], mode: str = "crop_blur_highlight352") -> np.ndarray:
        """(K, projection_dim) embeddings of visual prompts given as (image, mask) pairs, rendered the paper's way."""
        from clipseg_jax.prompts import render_visual_prompt

        rendered = []
        for i, (img, msk) in enumerate(visual_prompts):
            img = load_image(img)
            m = load_mask(msk, img.shape[:2], f"visual prompt {i} mask")
            rendered.append(render_visual_prompt(img, m, mode=mode, size=self.image_size))
        return self.encode_rendered(np.stack(rendered))

    def encode_rendered(self, supports_u8: np.ndarray) -> np.ndarray:
        """(K, S, S, 3) uint8 already-rendered prompt images -> (K, projection_dim)."""
        out = []
        for start in range(0, len(supports_u8), self.image_chunk):
            chunk = supports_u8[start:start + self.image_chunk]
            nb = _bucket(len(chunk), IMAGE_BUCKETS)
            padded = np.concatenate([chunk, np.zeros((nb - len(chunk), *chunk.shape[1:]), np.uint8)])
            out.append(np.asarray(self._jit_image_features(self._state, padded))[: len(chunk)])
        return np.concatenate(out)

    # -- segmentation ---------------------------------------------------------------------------------
    def predict_batch(self, pixels_u8: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """pixels (N, S, S, 3) uint8 at the model resolution, cond (K, P) -> probabilities (N, K, S, S)."""
        return np.concatenate([np.asarray(p) for p in self._predict_chunks(pixels_u8, cond)])

    def _predict_chunks(self, pixels_u8: np.ndarray, cond: np.ndarray) -> list[jax.Array]:
        """predict_batch's result as device arrays, one (n_i, K, S, S) per chunk of images (not yet on the host)."""
        pixels_u8 = np.asarray(pixels_u8, np.uint8)
        n, k = len(pixels_u8), len(cond)
        kb = _bucket(k, PROMPT_BUCKETS)
        out = []
        for start in range(0, n, self.image_chunk):
            chunk = pixels_u8[start:start + self.image_chunk]
            nb = _bucket(len(chunk), IMAGE_BUCKETS)
            padded = np.concatenate([chunk, np.zeros((nb - len(chunk), *chunk.shape[1:]), np.uint8)])
            per_prompt = []
            for ks in range(0, k, kb):
                c = cond[ks:ks + kb]
                c = np.concatenate([c, np.repeat(c[-1:], kb - len(c), 0)]).astype(np.float32)
                per_prompt.append(self._jit_segment(self._state, padded, c)[: len(chunk), : min(kb, k - ks)])
            out.append(per_prompt[0] if len(per_prompt) == 1 else jnp.concatenate(per_prompt, axis=1))
        return out

    def predict_texts(self, pixels_u8: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """pixels (N, S, S, 3) uint8, K text prompts -> (N, K, S, S) probabilities at the model resolution."""
        return self.predict_batch(pixels_u8, self.encode_text(prompts))

    def predict_visual(self, pixels_u8: np.ndarray, supports_u8: np.ndarray) -> np.ndarray:
        """One rendered support per query: pixels (N, S, S, 3), supports (N, S, S, 3), both uint8 -> (N, S, S)."""
        cond = self.encode_rendered(np.asarray(supports_u8, np.uint8))
        return self.predict_pairs(pixels_u8, cond)

    def predict_pairs(self, pixels_u8: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """One condition per image: pixels (N, S, S, 3) uint8, cond (N, P) -> (N, S, S)."""
        pixels_u8 = np.asarray(pixels_u8, np.uint8)
        out = []
        for start in range(0, len(pixels_u8), self.image_chunk):
            chunk, c = pixels_u8[start:start + self.image_chunk], cond[start:start + self.image_chunk]
            nb = _bucket(len(chunk), IMAGE_BUCKETS)
            pad = nb - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
            c = np.concatenate([c, np.zeros((pad, c.shape[1]), np.float32)]).astype(np.float32)
            out.append(np.asarray(self._jit_segment_pairs(self._state, chunk, c))[: nb - pad])
        return np.concatenate(out)

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """-> (N, S, S, 3) uint8 resized like the HF processor, and each image's original (H, W)."""
        def one(im):
            a = load_image(im)
            return pil_bilinear(a, (self.image_size, self.image_size)), a.shape[:2]

        if len(images) > 1 and self._host_threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._host_threads, thread_name_prefix="clipseg-preprocess")
            done = list(self._pool.map(one, images))
        else:
            done = [one(im) for im in images]
        return np.stack([d[0] for d in done]), [d[1] for d in done]

    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompts: Sequence[str] = (),
        visual_prompts: Sequence[tuple[ImageLike, ImageLike]] = (),
        visual_prompt_mode: str = "crop_blur_highlight352",
    ) -> np.ndarray | list[np.ndarray]:
        """Probabilities for every (image, prompt) pair, resized back to each image's size.

        images: paths, PIL images or HxWx3 uint8 arrays; prompts: K texts; visual_prompts: (image, mask) pairs, which
        come after the texts. Returns float32 (N, K, H, W) in [0, 1] when all images share a size, else a list of
        (K, H_i, W_i) arrays.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is empty: give at least one image")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts and not visual_prompts:
            raise ValueError("no prompts: give at least one text prompt or visual prompt")
        conds = []
        if prompts:
            conds.append(self.encode_text(list(prompts)))
        if visual_prompts:
            conds.append(self.encode_visual(list(visual_prompts), visual_prompt_mode))
        cond = np.concatenate(conds)
        pixels, sizes = self.preprocess(images)
        out = self.predict_resized(pixels, sizes, cond)
        if len(set(sizes)) == 1:
            return out[0][None] if len(out) == 1 else np.stack(out)
        return out

    def predict_resized(self, pixels_u8: np.ndarray, sizes: Sequence[tuple[int, int]], cond: np.ndarray) -> list[np.ndarray]:
        """Preprocessed images (N, S, S, 3) uint8 and their original sizes, conditions (K, P) -> per image the
        (K, H_i, W_i) float32 probabilities at its original size."""
        sizes = list(sizes)
        if self.resize_on_device:
            return self._resize_on_device(self._predict_chunks(pixels_u8, cond), sizes)
        return [resize_probs(p, h, w) for p, (h, w) in zip(self.predict_batch(pixels_u8, cond), sizes)]

    def _resize_on_device(self, chunks: list[jax.Array], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Per image (K, H_i, W_i) float32, resized next to the model; runs of equal sizes share one jitted call."""
        out: list[np.ndarray] = []
        i = 0
        for probs in chunks:
            start = 0
            while start < len(probs):
                h, w = sizes[i + start]
                end = start + 1
                while end < len(probs) and sizes[i + end] == (h, w):
                    end += 1
                part = probs[start:end]
                if part.shape[-2:] != (h, w):
                    mh, mw = torch_bilinear_matrix(part.shape[-2], h), torch_bilinear_matrix(part.shape[-1], w)
                    part = self._jit_resize(part, mh, mw)
                out.extend(np.asarray(part))
                start = end
            i += len(probs)
        return out
