"""PhraseCut+ (PC+) training pipeline in tf.data.

Per sample (CLIPSeg `datasets/phrasecut.py`, see docs/data.md for every rule and deviation):
  1. random square crop of side min(H, W) keeping > `min_crop_fg` of the *image* area as
     foreground when one of `crop_iterations` random windows does (the original's `find_crop`),
  2. bilinear (align_corners=True) image / nearest mask resize to `image_size`,
  3. with probability `negative_prob` the phrase becomes a different random phrase and the mask
     is emptied,
  4. a visual support: another task with the (possibly swapped) phrase, cropped and resized the
     same way and rendered with `visual_prompt_mode`; `support_valid` is False when there is none,
  5. a `shuffle+` template applied to the phrase.

Order, sharding and randomness are functions of (seed, epoch, position) only: the per-host
stream position k maps to (epoch, slot) and the slot to a task through a stateless
`index_shuffle` permutation of the whole split. Host p of P takes slots p, p+P, p+2P, ... so
hosts never share a task within an epoch. Every random draw of a sample is seeded by
(seed, epoch, task). Resuming is therefore `pipeline.iterator(start_step=n)`: the checkpoint
state is the number of batches consumed.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import tensorflow as tf

from clipseg_jax import prompts as _prompts
from clipseg_jax.prompts import (
    TEMPLATES_SHUFFLE_PLUS,
    VISUAL_PROMPT_MODES,
    _PREPROCESS_MODES,
    render_visual_prompt_square_u8,
)
from data_pipelines.sources import Source

__all__ = ["PCPlus", "PCPlusIterator", "eval_dataset", "resize_image", "resize_mask"]


# --------------------------------------------------------------------------------------------
# Resizing (TF versions of clipseg_jax.prompts, tested equal to it)
# --------------------------------------------------------------------------------------------

def resize_image(image: tf.Tensor, h, w) -> tf.Tensor:
    """uint8 (H, W, 3) -> uint8 (h, w, 3), bilinear with align_corners=True, rounded."""
    x = tf.raw_ops.ResizeBilinear(images=image[None], size=tf.stack([h, w]),
                                  align_corners=True, half_pixel_centers=False)[0]
    # A convex combination of uint8 values stays within [0, 255] up to float error (< 0.5), so a
    # plain cast of the rounded value equals saturate_cast without its clipping pass.
    return tf.cast(tf.round(x), tf.uint8)


def resize_mask(mask: tf.Tensor, h, w) -> tf.Tensor:
    """(H, W) -> (h, w) with torch's legacy nearest rule floor(dst * in / out)."""
    return tf.raw_ops.ResizeNearestNeighbor(images=mask[None, :, :, None], size=tf.stack([h, w]),
                                            align_corners=False, half_pixel_centers=False)[0, :, :, 0]


# --------------------------------------------------------------------------------------------
# Crop search
# --------------------------------------------------------------------------------------------

def find_square_crop(mask: tf.Tensor, seed: tf.Tensor, iterations: int = 50, min_frac: float = 0.05):
    """(offset_y, offset_x, side) of a random min(H, W) square window, as the original `find_crop`.

    Draws `iterations` random offsets along the long axis; returns the first whose foreground
    count exceeds `min_frac` * H * W (the *full* image area, as in the original), else the first
    with the most foreground.
    """
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    side = tf.minimum(h, w)
    tall = h > w
    # Profile along the long axis; no tf.cond (branches cost ms in tf.data on CPU).
    m32 = tf.cast(mask, tf.int32)
    rows, cols = tf.reduce_sum(m32, axis=1), tf.reduce_sum(m32, axis=0)
    length = tf.maximum(h, w)
    line = tf.where(tall, tf.pad(rows, [[0, length - h]]), tf.pad(cols, [[0, length - w]]))
    cs = tf.concat([[0], tf.cumsum(line)], axis=0)
    offs = tf.random.stateless_uniform([iterations], seed=seed, minval=0, maxval=length - side + 1, dtype=tf.int32)
    sums = tf.gather(cs, offs + side) - tf.gather(cs, offs)
    ok = tf.cast(sums, tf.float64) > min_frac * tf.cast(h * w, tf.float64)
    pick = tf.where(tf.reduce_any(ok), tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32),
                    tf.argmax(sums, output_type=tf.int32))
    off = offs[pick]
    return tf.where(tall, off, 0), tf.where(tall, 0, off), side


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

def _process_info() -> tuple[int, int]:
    try:
        import jax

        return jax.process_index(), jax.process_count()
    except Exception:  # noqa: BLE001  (no jax backend: single host)
        return 0, 1


class PCPlus:
    """The PC+ sampler over a `Source`; see the module docstring.

    Args:
      source: a `TfdsSource`, `OwnDataSource`, `CachedSource` (or any `Source`).
      batch_size: per-host batch size.
      seed: everything random is a function of (seed, epoch, task).
      negative_prob: probability of a negative sample (phrase swapped, mask emptied).
      visual_prompt_mode: one of `clipseg_jax.prompts.VISUAL_PROMPT_MODES`.
      image_size: output side (352).
      templates: text templates, one drawn uniformly per sample.
      support_excludes_query: if True (default) the support is never the query task itself; the
        original may pick the query as its own support (1/n of the time for a phrase with n tasks).
      min_crop_fg, crop_iterations: `find_crop` parameters (0.05 of the image area, 50 tries).
      process_index, process_count: host shard (defaults: jax.process_index()/process_count()).
      num_parallel_calls: tf.data map parallelism (AUTOTUNE).
      threads: size of a private tf.data thread pool (None: TF's global pool).
      prefetch: batches to prefetch (AUTOTUNE when None).
    """

    OUTPUT_KEYS = ("image", "mask", "prompt", "phrase", "negative", "support_image", "support_valid",
                   "task_index", "support_index")

    def __init__(
        self,
        source: Source,
        batch_size: int = 64,
        seed: int = 0,
        negative_prob: float = 0.2,
        visual_prompt_mode: str = "crop_blur_highlight352",
        image_size: int = 352,
        templates: tuple[str, ...] = TEMPLATES_SHUFFLE_PLUS,
        support_excludes_query: bool = True,
        min_crop_fg: float = 0.05,
        crop_iterations: int = 50,
        process_index: int | None = None,
        process_count: int | None = None,
        num_parallel_calls: int | None = tf.data.AUTOTUNE,
        threads: int | None = None,
        prefetch: int | None = None,
    ):
        if visual_prompt_mode not in VISUAL_PROMPT_MODES:
            raise ValueError(f"unknown visual_prompt_mode {visual_prompt_mode!r}; expected one of {VISUAL_PROMPT_MODES}")
        if not 0.0 <= negative_prob <= 1.0:
            raise ValueError(f"negative_prob must be in [0, 1]; got {negative_prob}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        if process_index is None or process_count is None:
            pi, pc = _process_info()
            process_index = pi if process_index is None else process_index
            process_count = pc if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        n = len(source)
        if n // process_count < 1:
            raise ValueError(f"{n} tasks cannot be sharded over {process_count} hosts")
        if visual_prompt_mode in _PREPROCESS_MODES and _prompts._cv2 is not None:
            # tf.data's map supplies the parallelism; OpenCV's own pool (one thread per core by
            # default) would oversubscribe it: ~20 % more CPU per sample measured on 2 cores.
            # Process-wide setting (nothing else in this project uses OpenCV).
            _prompts._cv2.setNumThreads(1)
        self.source = source
        self.batch_size = batch_size
        self.seed = int(seed)
        self.negative_prob = float(negative_prob)
        self.mode = visual_prompt_mode
        self.image_size = int(image_size)
        self.templates = tuple(templates)
        self.support_excludes_query = support_excludes_query
        self.min_crop_fg = float(min_crop_fg)
        self.crop_iterations = int(crop_iterations)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.num_parallel_calls = num_parallel_calls
        self.threads = threads
        self.prefetch = prefetch
        self.num_tasks = n
        # Hosts take the same number of slots per epoch (n // P); the n % P left-over slots of the
        # permutation change every epoch, so no task is dropped systematically.
        self.samples_per_epoch = n // process_count

        # Host-side index: phrase ids and tasks grouped by phrase (CSR).
        uniq, phrase_id = np.unique(np.asarray(source.phrases, dtype=object).astype(str), return_inverse=True)
        self.unique_phrases = uniq
        order = np.argsort(phrase_id, kind="stable")
        counts = np.bincount(phrase_id, minlength=len(uniq))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - offsets[phrase_id[order]]
        self._phrase_id = tf.constant(phrase_id.astype(np.int64))
        self._phrases = tf.constant(uniq.astype(object).astype(bytes))
        self._members = tf.constant(order.astype(np.int64))
        self._offsets = tf.constant(offsets.astype(np.int64))
        self._rank = tf.constant(rank)
        pre, suf = zip(*(t.split("{}") for t in self.templates))
        self._prefix = tf.constant(list(pre))
        self._suffix = tf.constant(list(suf))

    # ---- index arithmetic -------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> float:
        """Batches per epoch on this host (batches may straddle epochs)."""
        return self.samples_per_epoch / self.batch_size

    def _task_of(self, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        epoch = k // self.samples_per_epoch
        slot = (k % self.samples_per_epoch) * self.process_count + self.process_index
        if self.num_tasks == 1:
            return epoch, tf.zeros_like(slot)
        seed = tf.stack([tf.constant(self.seed, tf.int64), epoch])
        task = tf.random.experimental.index_shuffle(slot, seed=seed, max_index=self.num_tasks - 1)
        return epoch, tf.cast(task, tf.int64)

    def _load_square(self, task: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        s = self.image_size
        fetch_square = getattr(self.source, "load_square_window", None)
        if fetch_square is not None and self.source.pre_resized == s:
            # Cache at the output size: the same random offsets as find_square_crop (drawn from the
            # image shape in the index), the crop choice and the window copy in one numpy call.
            hw = self.source.image_shape(task)
            side, length = tf.reduce_min(hw), tf.reduce_max(hw)
            offs = tf.random.stateless_uniform([self.crop_iterations], seed=seed, minval=0, maxval=length - side + 1,
                                               dtype=tf.int32)
            image, mask = fetch_square(task, offs, self.min_crop_fg)
            image.set_shape([s, s, 3])
            mask.set_shape([s, s])
            return image, mask
        data, mask = self.source.load_encoded(task)
        oy, ox, side = find_square_crop(mask, seed, self.crop_iterations, self.min_crop_fg)
        image = self.source.decode_image(data, tf.shape(mask), tf.stack([oy, ox, side, side]))
        mask = mask[oy:oy + side, ox:ox + side]
        if self.source.pre_resized != s:  # the cache's short side is already s: nothing to resize
            image, mask = resize_image(image, s, s), resize_mask(mask, s, s)
        image.set_shape([s, s, 3])
        mask.set_shape([s, s])
        return image, mask

    def _render(self, image: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Visual prompt of a square support (non-empty mask).

        Every mode runs in numpy/OpenCV (`render_visual_prompt_square_u8`: ~1.5 ms for a 352²
        support against 9-14 ms for the same TF ops, whose CPU kernels are unfused; the cheap
        elementwise modes go through `render_visual_prompt` itself).
        """
        out = tf.numpy_function(functools.partial(render_visual_prompt_square_u8, mode=self.mode), [image, mask],
                                tf.uint8, stateful=False)
        out.set_shape([self.image_size, self.image_size, 3])
        return out

    def _sample(self, k: tf.Tensor) -> dict[str, tf.Tensor]:
        s = self.image_size
        epoch, task = self._task_of(k)
        base = tf.constant([self.seed, 0x5C1D], tf.int64)
        base = tf.random.experimental.stateless_fold_in(base, epoch)
        base = tf.random.experimental.stateless_fold_in(base, task)
        seeds = tf.random.experimental.stateless_split(base, num=6)
        image, mask = self._load_square(task, seeds[0])

        pid = tf.gather(self._phrase_id, task)
        n_phrases = int(self._phrases.shape[0])
        negative = tf.random.stateless_uniform([], seeds[1]) < self.negative_prob
        if n_phrases < 2:
            negative = tf.constant(False)
        r = tf.random.stateless_uniform([], seeds[2], minval=0, maxval=max(n_phrases - 1, 1), dtype=tf.int64)
        neg_pid = r + tf.cast(r >= pid, tf.int64)  # uniform over the other phrases
        pid = tf.where(negative, neg_pid, pid)
        mask = mask * (1 - tf.cast(negative, tf.uint8))  # (tf.where on images is slow on CPU)
        phrase = tf.gather(self._phrases, pid)

        # Support: another task with this phrase.
        start, count = tf.gather(self._offsets, pid), tf.gather(self._offsets, pid + 1) - tf.gather(self._offsets, pid)
        if self.support_excludes_query:
            excl = tf.logical_not(negative)  # a negative phrase's tasks never contain the query
            n_cand = count - tf.cast(excl, tf.int64)
            r = tf.random.stateless_uniform([], seeds[3], minval=0, maxval=tf.int64.max, dtype=tf.int64) % tf.maximum(n_cand, 1)
            r = tf.where(excl, r + tf.cast(r >= tf.gather(self._rank, task), tf.int64), r)
            has_support = n_cand >= 1
        else:  # original: any task with the phrase, only if the phrase is not unique
            r = tf.random.stateless_uniform([], seeds[3], minval=0, maxval=tf.int64.max, dtype=tf.int64) % tf.maximum(count, 1)
            has_support = count > 1
        support_task = tf.gather(self._members, start + tf.minimum(r, tf.maximum(count - 1, 0)))

        def render_support():
            s_img, s_mask = self._load_square(support_task, seeds[4])
            nonempty = tf.reduce_any(s_mask > 0)
            empty_u8 = 1 - tf.cast(nonempty, tf.uint8)
            # An object can vanish in the crop/resize; render a full mask then and mark invalid.
            rendered = self._render(s_img, tf.maximum(s_mask, empty_u8))
            return rendered * (1 - empty_u8), nonempty

        # Skip decode + render entirely when there is no support (unique phrases are common).
        support_image, support_valid = tf.cond(
            has_support, render_support, lambda: (tf.zeros([s, s, 3], tf.uint8), tf.constant(False)))
        support_image.set_shape([s, s, 3])

        t = tf.random.stateless_uniform([], seeds[5], minval=0, maxval=len(self.templates), dtype=tf.int32)
        prompt = tf.strings.join([tf.gather(self._prefix, t), phrase, tf.gather(self._suffix, t)])
        return {
            "image": image,
            "mask": mask,
            "prompt": prompt,
            "phrase": phrase,
            "negative": negative,
            "support_image": support_image,
            "support_valid": support_valid,
            "task_index": task,
            "support_index": tf.where(support_valid, support_task, tf.constant(-1, tf.int64)),
        }

    # ---- datasets -----------------------------------------------------------------------------
    def dataset(self, start_step: int = 0, num_steps: int | None = None) -> tf.data.Dataset:
        """Batched, infinite (or `num_steps` long) dataset starting at batch `start_step`."""
        start = int(start_step) * self.batch_size
        stop = np.iinfo(np.int64).max if num_steps is None else start + int(num_steps) * self.batch_size
        ds = tf.data.Dataset.range(start, stop)
        ds = ds.map(self._sample, num_parallel_calls=self.num_parallel_calls, deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=True)
        ds = ds.prefetch(self.prefetch if self.prefetch is not None else tf.data.AUTOTUNE)
        opts = tf.data.Options()
        opts.deterministic = True
        if self.threads:
            opts.threading.private_threadpool_size = self.threads
            opts.threading.max_intra_op_parallelism = 1
        return ds.with_options(opts)

    def iterator(self, start_step: int = 0, num_steps: int | None = None) -> "PCPlusIterator":
        """Numpy batches from `start_step`; `state()` of the iterator is its checkpoint."""
        return PCPlusIterator(self, start_step, num_steps)

    def __iter__(self) -> "PCPlusIterator":
        return self.iterator()


class PCPlusIterator:
    """Yields dicts of numpy arrays; `state()` -> {'step': batches consumed} resumes exactly."""

    def __init__(self, pipeline: PCPlus, start_step: int = 0, num_steps: int | None = None):
        self.pipeline = pipeline
        self.step = int(start_step)
        self._it = pipeline.dataset(start_step, num_steps).as_numpy_iterator()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.step += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.pipeline.seed, "batch_size": self.pipeline.batch_size,
                "process_index": self.pipeline.process_index, "process_count": self.pipeline.process_count}

    @classmethod
    def restore(cls, pipeline: PCPlus, state: dict[str, int]) -> "PCPlusIterator":
        for key in ("seed", "batch_size", "process_index", "process_count"):
            if key in state and state[key] != getattr(pipeline, key):
                raise ValueError(f"checkpoint {key}={state[key]} does not match the pipeline's {getattr(pipeline, key)}")
        return cls(pipeline, state["step"])


def eval_dataset(source: Source, batch_size: int = 32, image_size: int = 352,
                 process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """CLIPSeg's PhraseCut test view: whole image squashed to image_size², raw phrase, in order.

    Finite; host p takes tasks p, p+P, ...; the last batch may be smaller.
    """
    if process_index is None or process_count is None:
        pi, pc = _process_info()
        process_index = pi if process_index is None else process_index
        process_count = pc if process_count is None else process_count
    phrases = tf.constant(np.asarray(source.phrases, dtype=object).astype(bytes))

    def load(i):
        image, mask = source.load(i)
        return {"image": resize_image(image, image_size, image_size),
                "mask": resize_mask(mask, image_size, image_size),
                "phrase": tf.gather(phrases, i), "task_index": i}

    ds = tf.data.Dataset.range(process_index, len(source), process_count)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size).prefetch(2)
