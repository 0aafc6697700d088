"""PhraseCut+ (PC+) training pipeline: tf.data over batches built in numpy/OpenCV.

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
stream position k maps to (epoch, slot) and the slot to a task through a per-epoch permutation
of the whole split (Philox keyed by (seed, epoch)). Host p of P takes slots p, p+P, p+2P, ... so
hosts never share a task within an epoch. Every random draw of a sample is a counter-based hash
of (seed, epoch, task, stream). A batch is therefore a pure function of its step:
`pipeline.batch(step)`; resuming is `pipeline.iterator(start_step=n)`, and the checkpoint state
is the number of batches consumed.

Why numpy inside tf.data: one `tf.numpy_function` call builds a whole batch (planning vectorised
over the batch, then decode / crop / resize / render per sample with OpenCV, which releases the
GIL, so tf.data's parallel map runs batches on all cores). The previous per-sample TF graph
spent more time in TF's per-op overhead (~100 small ops per sample) than in pixel work.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

from clipseg_jax.prompts import (
    TEMPLATES_SHUFFLE_PLUS,
    VISUAL_PROMPT_MODES,
    apply_template,
    render_visual_prompt_square_u8,
    visual_prompt_read_region,
)
from clipseg_jax.resize import torch_bilinear_align_corners_u8, torch_nearest
from data_pipelines.imageops import pick_square_crop
from data_pipelines.sources import Source

__all__ = ["PCPlus", "PCPlusIterator", "eval_dataset"]


def static_parallelism(num_parallel_calls: int | None) -> int:
    """The map parallelism of our tf.data pipelines: `num_parallel_calls` if positive, else (None, or
    tf.data.AUTOTUNE) one per CPU core."""
    if isinstance(num_parallel_calls, int) and num_parallel_calls > 0:
        return num_parallel_calls
    return os.cpu_count() or 1


def static_options():
    """tf.data options without autotuning. Deleting an iterator whose autotuning thread runs waits until that
    thread's next optimisation round, and the rounds grow apart the longer the iterator lives: a 200-step training
    run on 2 cores waited 0-38 s at its end, for the same samples/s (docs/benchmarks.md §3). So our pipelines set
    their parallelism and prefetch depth themselves."""
    import tensorflow as tf

    opts = tf.data.Options()
    opts.autotune.enabled = False
    return opts


# Recycling buffers by reference count needs the GIL: free-threaded builds have no reliable counts.
_REFCOUNTS_RELIABLE = getattr(sys, "_is_gil_enabled", lambda: True)()


# --------------------------------------------------------------------------------------------
# Counter-based randomness: splitmix64 over (seed, epoch, task, stream, j)
# --------------------------------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Streams of per-sample draws.
_CROP, _NEGATIVE, _NEG_PHRASE, _SUPPORT, _SUPPORT_CROP, _TEMPLATE = range(6)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z + _GAMMA).astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _uniform(*keys) -> np.ndarray:
    """Uniform [0, 1) float64 array, a deterministic hash of the broadcast integer `keys`."""
    with np.errstate(over="ignore"):
        h = np.zeros((), np.uint64)
        for k in keys:
            h = _mix(h ^ np.asarray(k).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _below(u: np.ndarray, n) -> np.ndarray:
    """Uniform integers in [0, n) from uniforms u (n >= 1)."""
    return np.minimum((u * n).astype(np.int64), np.asarray(n, np.int64) - 1)


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

def _empty_aligned(shape: tuple[int, ...], dtype=np.uint8, align: int = 64) -> np.ndarray:
    """np.empty aligned to `align` bytes: TF then adopts a `numpy_function` result without a copy
    (an unaligned array is copied, ~0.25 ms per MB, with the GIL held)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


class _ArrayPool:
    """Batch arrays recycled once nothing but the pool references them.

    A fresh ~12 MB array per batch is handed back to the OS by the allocator once tf.data frees
    it (on another thread), so every batch paid page faults and kernel zeroing again (≈ 0.15 ms
    per sample measured). TF adopts a `numpy_function` result without a copy and holds a
    reference to it for as long as the tensor, or a numpy array the consumer got from it,
    lives; any numpy view keeps the buffer owner alive. So an array whose own and owner's
    reference counts are back to the pool's baseline is unused and may be overwritten. (TF may
    drop its reference a little after the tensor dies, deferring decrefs made without the GIL:
    that only delays reuse.)
    """

    def __init__(self, per_shape: int):
        self._arrays: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._per_shape = per_shape
        # Reference counts of an unused pooled array and of its buffer owner, measured through
        # the same code path (interpreter versions count borrowed references differently).
        probe = [_empty_aligned((1,))]
        self._free = self._refs(probe, 0)
        self._enabled = _REFCOUNTS_RELIABLE  # no recycling on free-threaded builds

    @staticmethod
    def _refs(arrays: list[np.ndarray], i: int) -> tuple[int, int]:
        return sys.getrefcount(arrays[i]), sys.getrefcount(arrays[i].base)

    def get(self, field: str, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        """An aligned (64 B) array of `shape` for batch field `field`, uninitialised (possibly an earlier
        batch's values). (A worker's pool hands out the shared-memory array of that field instead.)"""
        if not self._enabled:
            return _empty_aligned(shape, dtype)
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            arrays = self._arrays.setdefault(key, [])
            for i in range(len(arrays)):
                if self._refs(arrays, i) == self._free:
                    return arrays[i]
            a = _empty_aligned(shape, dtype)
            if len(arrays) < self._per_shape:
                arrays.append(a)
            return a


def _host_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """The given (process_index, process_count), missing ones from jax (one host without jax)."""
    if process_index is None or process_count is None:
        try:
            import jax

            pi, pc = jax.process_index(), jax.process_count()
        except Exception:  # noqa: BLE001  (no jax backend: single host)
            pi, pc = 0, 1
        process_index = pi if process_index is None else process_index
        process_count = pc if process_count is None else process_count
    return process_index, process_count


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
      num_parallel_calls: batches built in parallel by tf.data (None: one per CPU core; tf.data's autotuning
        is off, see `static_options`).
      threads: size of a private tf.data thread pool (None: TF's global pool).
      prefetch: batches to prefetch (None: 2).
      support_render: "host" (default): `support_image` is the rendered visual prompt. "device":
        `support_image` is the raw support square and `support_mask` its mask; render them in
        the jitted step with `clipseg_jax.prompts_jax.render_visual_prompts_jax` (takes the
        largest per-sample cost off the input host).
      with_visual: False: no visual supports are built (text-prompt training, the original's
        `with_visual=False`): `support_valid` is all False and the support arrays are zeros.
      workers: 0 (default): `iterator()` runs tf.data's threads in this process, which share one
        GIL (≈ 1.3x from 2 threads on 2 cores). N > 0: `iterator()` builds batches in N worker
        processes instead (one core each, no shared GIL), written into shared memory and handed
        out in step order without a copy; the same batches either way. The source must pickle
        (the built-in ones reopen their files in the worker). `dataset()` always uses threads.
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
        num_parallel_calls: int | None = None,
        threads: int | None = None,
        prefetch: int | None = None,
        support_render: str = "host",
        workers: int = 0,
        with_visual: bool = True,
    ):
        if visual_prompt_mode not in VISUAL_PROMPT_MODES:
            raise ValueError(f"unknown visual_prompt_mode {visual_prompt_mode!r}; expected one of {VISUAL_PROMPT_MODES}")
        if not 0.0 <= negative_prob <= 1.0:
            raise ValueError(f"negative_prob must be in [0, 1]; got {negative_prob}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if support_render not in ("host", "device"):
            raise ValueError(f"support_render must be 'host' or 'device'; got {support_render!r}")
        if image_size < 2:
            raise ValueError(f"image_size must be >= 2; got {image_size}")
        if crop_iterations < 1:
            raise ValueError(f"crop_iterations must be >= 1; got {crop_iterations}")
        if not isinstance(workers, (int, np.integer)) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0; got {workers!r}")
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        process_index, process_count = _host_shard(process_index, process_count)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        n = len(source)
        if n // process_count < 1:
            raise ValueError(f"{n} tasks cannot be sharded over {process_count} hosts")
        # tf.data's parallel map supplies the parallelism; OpenCV's own pool (a thread per core by
        # default) would oversubscribe it (~20 % more CPU per sample measured on 2 cores).
        # Process-wide setting (nothing else in this project uses OpenCV threads).
        cv2.setNumThreads(1)
        self.source = source
        self._crop_cumsum = getattr(source, "crop_cumsum", None)
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
        self.support_render = support_render
        self.workers = int(workers)
        self.with_visual = bool(with_visual)
        self.num_tasks = n
        # Hosts take the same number of slots per epoch (n // P); the n % P left-over slots of the
        # permutation change every epoch, so no task is dropped systematically.
        self.samples_per_epoch = n // process_count

        # Host-side index: phrase ids and tasks grouped by phrase (CSR).
        uniq, phrase_id = np.unique(np.asarray(source.phrases, dtype=object).astype(str), return_inverse=True)
        self.unique_phrases = uniq
        self._phrase_bytes = np.array([p.encode() for p in uniq], dtype=object)
        order = np.argsort(phrase_id, kind="stable")
        counts = np.bincount(phrase_id, minlength=len(uniq))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - offsets[phrase_id[order]]
        self._phrase_id = phrase_id.astype(np.int64)
        self._members = order.astype(np.int64)
        self._offsets = offsets.astype(np.int64)
        self._rank = rank
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()
        # Batches alive at once: parallel map + prefetch buffer + the consumer's (and one spare); two
        # arrays of each shape per batch (image / support_image, mask / support_mask).
        alive = static_parallelism(num_parallel_calls) + self.prefetch_depth + 2
        self._pool = _ArrayPool(2 * alive)

    @property
    def prefetch_depth(self) -> int:
        """Batches tf.data prefetches: `prefetch`, or 2 when None (or negative, as tf.data.AUTOTUNE)."""
        return self.prefetch if isinstance(self.prefetch, int) and self.prefetch >= 0 else 2

    def __getstate__(self) -> dict:
        # What a worker process needs: no locks, caches or pooled arrays (rebuilt there).
        state = self.__dict__.copy()
        for key in ("_pool", "_perm_lock", "_perms"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        cv2.setNumThreads(1)  # one core per worker process (as in __init__)
        self.__dict__.update(state)
        self._perms = {}
        self._perm_lock = threading.Lock()
        self._pool = _ArrayPool(4)

    # ---- index arithmetic -------------------------------------------------------------------
    @property
    def output_keys(self) -> tuple[str, ...]:
        """Keys of a batch: `OUTPUT_KEYS`, plus "support_mask" with device rendering."""
        return self.OUTPUT_KEYS + (("support_mask",) if self.support_render == "device" else ())

    @property
    def steps_per_epoch(self) -> float:
        """Batches per epoch on this host (batches may straddle epochs)."""
        return self.samples_per_epoch / self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                key = np.array([self.seed, epoch], np.uint64)
                perm = np.random.Generator(np.random.Philox(key=key)).permutation(self.num_tasks)
                if len(self._perms) >= 4:  # parallel batches straddle at most a couple of epochs
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def _tasks(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, task) of stream positions k."""
        epoch = k // self.samples_per_epoch
        slot = (k % self.samples_per_epoch) * self.process_count + self.process_index
        task = np.empty_like(k)
        for e in np.unique(epoch):
            sel = epoch == e
            task[sel] = self._permutation(int(e))[slot[sel]]
        return epoch, task

    def plan(self, step: int) -> dict[str, np.ndarray]:
        """Every random decision of batch `step` (no pixels): tasks, negatives, phrases, supports."""
        b = self.batch_size
        k = int(step) * b + np.arange(b, dtype=np.int64)
        epoch, task = self._tasks(k)
        key = (self.seed, epoch, task)
        pid = self._phrase_id[task]
        n_phrases = len(self.unique_phrases)
        negative = _uniform(*key, _NEGATIVE) < self.negative_prob
        if n_phrases < 2:
            negative[:] = False
        r = _below(_uniform(*key, _NEG_PHRASE), max(n_phrases - 1, 1))
        pid = np.where(negative, r + (r >= pid), pid)  # uniform over the other phrases

        # Support: another task with this phrase.
        start = self._offsets[pid]
        count = self._offsets[pid + 1] - start
        u = _uniform(*key, _SUPPORT)
        if self.support_excludes_query:
            excl = ~negative  # a negative phrase's tasks never contain the query
            n_cand = count - excl
            r = _below(u, np.maximum(n_cand, 1))
            r = np.where(excl, r + (r >= self._rank[task]), r)
            has_support = n_cand >= 1
        else:  # original: any task with the phrase, only if the phrase is not unique
            r = _below(u, np.maximum(count, 1))
            has_support = count > 1
        support_task = self._members[start + np.minimum(r, np.maximum(count - 1, 0))]
        template = _below(_uniform(*key, _TEMPLATE), len(self.templates))
        # find_crop's candidate offsets, as uniforms (scaled by each image's free length later).
        # The support's are keyed by the *query* task, so a task drawn twice as a support in one
        # epoch gets independent crops.
        j = np.arange(self.crop_iterations)
        crop_u = _uniform(self.seed, epoch[:, None], task[:, None], _CROP, j)
        support_crop_u = _uniform(self.seed, epoch[:, None], task[:, None], _SUPPORT_CROP, j)
        return {"epoch": epoch, "task": task, "phrase_id": pid, "negative": negative,
                "has_support": has_support, "support_task": support_task, "template": template,
                "crop_u": crop_u, "support_crop_u": support_crop_u}

    # ---- pixels ---------------------------------------------------------------------------------
    def window(self, task: int, u: np.ndarray):
        """The `find_crop` square window of a task for the crop draws `u` (a plan's `crop_u` or `support_crop_u`
        row): (image view, mask view) of the source image, side min(H, W). Queries and supports are this window
        resized to `image_size`."""
        image, mask = self.source.read(task)
        h, w = mask.shape
        side, length = min(h, w), max(h, w)
        cumsum = self._crop_cumsum(task) if self._crop_cumsum is not None else None  # stored by the cache
        oy, ox, side = pick_square_crop(mask, _below(u, length - side + 1), self.min_crop_fg, cumsum)
        return image[oy:oy + side, ox:ox + side], mask[oy:oy + side, ox:ox + side]

    def _query(self, task: int, u: np.ndarray, out_image: np.ndarray, out_mask: np.ndarray) -> None:
        s = self.image_size
        win, mwin = self.window(task, u)
        if win.shape[0] == s:  # cache at the output size: a copy
            out_image[...] = win
            out_mask[...] = mwin
        else:
            torch_bilinear_align_corners_u8(win, s, s, out=out_image)
            out_mask[...] = torch_nearest(mwin, (s, s))

    def _support(self, task: int, u: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> bool:
        """Render the support visual prompt of `task` into `out`; False if its object left the crop."""
        s = self.image_size
        win, mwin = self.window(task, u)
        side = win.shape[0]
        mask = np.ascontiguousarray(mwin) if side == s else torch_nearest(mwin, (s, s))
        if not mask.any():  # an object can vanish in the crop/resize: then no support
            return False
        image = win
        if side != s:
            # Resize only the pixels the renderer reads (crop box + blur margin): the other
            # values of `scratch` are never used.
            y0, y1, x0, x1 = visual_prompt_read_region(mask, self.mode)
            sc = (side - 1) / (s - 1)
            scratch[y0:y1, x0:x1] = torch_bilinear_align_corners_u8(win, y1 - y0, x1 - x0, origin=(y0 * sc, x0 * sc), scale=(sc, sc))
            image = scratch
        render_visual_prompt_square_u8(image, mask, self.mode, out=out)
        return True

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch `step` of this host's stream as a dict of numpy arrays (a pure function of step).

        The pixel arrays come from a pool and are reused once nothing references them (docs/data.md §4).
        """
        p = self.plan(step)
        b, s = self.batch_size, self.image_size
        image = self._pool.get("image", (b, s, s, 3))
        mask = self._pool.get("mask", (b, s, s))
        support = self._pool.get("support_image", (b, s, s, 3))
        support_valid = np.zeros(b, bool)
        scratch = np.empty((s, s, 3), np.uint8)
        device = self.support_render == "device"
        support_mask = self._pool.get("support_mask", (b, s, s)) if device else None
        for i in range(b):
            self._query(int(p["task"][i]), p["crop_u"][i], image[i], mask[i])
            if p["negative"][i]:
                mask[i] = 0
            if self.with_visual and p["has_support"][i]:
                st, u = int(p["support_task"][i]), p["support_crop_u"][i]
                if device:  # the raw support square and its mask; rendered in the jitted step
                    self._query(st, u, support[i], support_mask[i])
                    support_valid[i] = support_mask[i].any()
                else:
                    support_valid[i] = self._support(st, u, support[i], scratch)
            if not support_valid[i]:
                support[i] = 0
                if device:
                    support_mask[i] = 0
        phrase = self._phrase_bytes[p["phrase_id"]]
        prompt = np.array([apply_template(self.templates[t], ph.decode()).encode()
                           for t, ph in zip(p["template"], phrase)], dtype=object)
        out = {
            "image": image,
            "mask": mask,
            "prompt": prompt,
            "phrase": phrase,
            "negative": p["negative"],
            "support_image": support,
            "support_valid": support_valid,
            "task_index": p["task"],
            "support_index": np.where(support_valid, p["support_task"], -1),
        }
        if device:
            out["support_mask"] = support_mask
        return out

    # ---- datasets -----------------------------------------------------------------------------
    def dataset(self, start_step: int = 0, num_steps: int | None = None) -> tf.data.Dataset:
        """Batched, infinite (or `num_steps` long) tf.data.Dataset starting at batch `start_step`."""
        import tensorflow as tf

        start = int(start_step)
        stop = np.iinfo(np.int64).max if num_steps is None else start + int(num_steps)
        b, s = self.batch_size, self.image_size
        image, mask, vector = (tf.uint8, [b, s, s, 3]), (tf.uint8, [b, s, s]), [b]
        spec = {"image": image, "mask": mask, "prompt": (tf.string, vector), "phrase": (tf.string, vector),
                "negative": (tf.bool, vector), "support_image": image, "support_valid": (tf.bool, vector),
                "task_index": (tf.int64, vector), "support_index": (tf.int64, vector), "support_mask": mask}
        keys = self.output_keys
        dtypes = [spec[k][0] for k in keys]
        shapes = [spec[k][1] for k in keys]

        def make(step):
            batch = self.batch(int(step))
            return [batch[k] for k in keys]

        def fn(step):
            outs = tf.numpy_function(make, [step], dtypes, stateful=False)
            for t, shape in zip(outs, shapes):
                t.set_shape(shape)
            return dict(zip(keys, outs))

        ds = tf.data.Dataset.range(start, stop)
        # fn only wraps numpy: autograph would convert it for nothing, leaving a generated file in the temp dir
        ds = ds.map(tf.autograph.experimental.do_not_convert(fn),
                    num_parallel_calls=static_parallelism(self.num_parallel_calls), deterministic=True)
        ds = ds.prefetch(self.prefetch_depth)
        opts = static_options()
        opts.deterministic = True
        if self.threads:
            opts.threading.private_threadpool_size = self.threads
            opts.threading.max_intra_op_parallelism = 1
        return ds.with_options(opts)

    def iterator(self, start_step: int = 0, num_steps: int | None = None) -> PCPlusIterator:
        """Numpy batches from `start_step` (tf.data threads, or `workers` processes); `state()` of the
        iterator is its checkpoint."""
        return PCPlusIterator(self, start_step, num_steps)

    def __iter__(self) -> PCPlusIterator:
        return self.iterator()


_LIVE_ITERATORS: weakref.WeakSet[PCPlusIterator] = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    # A tf.data iterator still running `numpy_function`s when the interpreter finalises aborts
    # the process ("terminate called without an active exception"): close them first.
    for it in list(_LIVE_ITERATORS):
        it.close()


class PCPlusIterator:
    """Yields dicts of numpy arrays; `state()` -> {'step': batches consumed} resumes exactly."""

    def __init__(self, pipeline: PCPlus, start_step: int = 0, num_steps: int | None = None):
        self.pipeline = pipeline
        self.step = int(start_step)
        if pipeline.workers > 0:
            self._it = _ProcessBatches(pipeline, self.step, num_steps)
        else:
            self._it = pipeline.dataset(start_step, num_steps).as_numpy_iterator()
        _LIVE_ITERATORS.add(self)

    def close(self) -> None:
        """Stop the background work (also done at interpreter exit)."""
        it, self._it = self._it, None
        if isinstance(it, _ProcessBatches):
            it.close()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        self.step += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.pipeline.seed, "batch_size": self.pipeline.batch_size,
                "process_index": self.pipeline.process_index, "process_count": self.pipeline.process_count}

    @classmethod
    def restore(cls, pipeline: PCPlus, state: dict[str, int]) -> PCPlusIterator:
        for key in ("seed", "batch_size", "process_index", "process_count"):
            if key in state and state[key] != getattr(pipeline, key):
                raise ValueError(f"checkpoint {key}={state[key]} does not match the pipeline's {getattr(pipeline, key)}")
        return cls(pipeline, state["step"])


class _Slot:
    """One batch's pixel arrays in a shared-memory block, written by a worker, read in place here."""

    def __init__(self, layout: list[tuple[str, tuple[int, ...], int]], size: int):
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(create=True, size=size)
        # The arrays own the mapping: numpy keeps the mmap object alive but takes no buffer export, so
        # SharedMemory.close() (also run by its __del__) would unmap it under arrays still handed out.
        # Made directly on the mmap (not as reshaped views), so that every view of a handed-out array
        # has that array as its base and counts in `free()`.
        mm = self.shm._mmap
        self.arrays = [np.ndarray(shape, np.uint8, buffer=mm, offset=off) for _, shape, off in layout]
        self.shm._buf.release()
        self.shm._buf = self.shm._mmap = None  # close() is now a no-op; unmapped when the arrays go
        self.keys = [key for key, _, _ in layout]
        self.busy = False
        # Reference counts of the arrays while only this slot holds them (same access path as `free`).
        self._baseline = [sys.getrefcount(self.arrays[i]) for i in range(len(self.arrays))]

    def free(self) -> bool:
        """Not being written and no batch handed out from it is referenced any more (views included:
        a view holds its base)."""
        return not self.busy and all(sys.getrefcount(self.arrays[i]) == self._baseline[i]
                                     for i in range(len(self.arrays)))


class _ProcessBatches:
    """`PCPlus.batch(step)` for consecutive steps, built by worker processes (see `PCPlus` workers).

    Up to 2 * workers batches are in flight; results arrive in any order and are handed out in step
    order. A slot is reused once nothing references the arrays of the batch read from it, so a
    consumer may keep batches for as long as it likes (new slots are made meanwhile).
    """

    def __init__(self, pipeline: PCPlus, start: int, num_steps: int | None):
        import multiprocessing as mp

        if not _REFCOUNTS_RELIABLE:
            raise NotImplementedError("workers > 0 needs reference counts to recycle slots; not on a "
                                      "free-threaded Python build (use workers=0)")
        try:
            payload = pickle.dumps(pipeline)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"workers={pipeline.workers} needs a picklable source; "
                             f"{type(pipeline.source).__name__} is not ({e})") from None
        b, s = pipeline.batch_size, pipeline.image_size
        shapes = [("image", (b, s, s, 3)), ("support_image", (b, s, s, 3)), ("mask", (b, s, s))]
        if pipeline.support_render == "device":
            shapes.append(("support_mask", (b, s, s)))
        self._layout, off = [], 0
        for key, shape in shapes:
            self._layout.append((key, shape, off))
            off += -(-int(np.prod(shape)) // 64) * 64  # 64-byte aligned arrays
        self._slot_size = off
        self._keys = pipeline.output_keys
        self._depth = 2 * pipeline.workers
        _check_shared_memory(off * (self._depth + 2))
        self._slots: list[_Slot] = []
        self._next = self._submitted = int(start)
        self._stop = np.iinfo(np.int64).max if num_steps is None else int(start) + int(num_steps)
        self._inflight: dict[int, _Slot] = {}
        self._ready: dict[int, tuple[_Slot, dict]] = {}
        ctx = mp.get_context("spawn")  # fork would copy JAX's / TF's threads' locks
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        from data_pipelines import _pcplus_worker  # imports only the standard library (the packages' inits are light)

        args = (payload, self._tasks, self._results, self._layout)
        self._procs = [ctx.Process(target=_pcplus_worker.main, args=args, name=f"pcplus-worker-{i}", daemon=True)
                       for i in range(pipeline.workers)]
        for proc in self._procs:
            proc.start()
        self._closed = False
        self._error: RuntimeError | None = None
        self._fill()

    def _slot(self) -> _Slot:
        for slot in self._slots:
            if slot.free():
                return slot
        slot = _Slot(self._layout, self._slot_size)
        self._slots.append(slot)
        return slot

    def _fill(self) -> None:
        while self._submitted < self._stop and len(self._inflight) + len(self._ready) < self._depth:
            slot = self._slot()
            slot.busy = True
            self._inflight[self._submitted] = slot
            self._tasks.put((self._submitted, slot.shm.name))
            self._submitted += 1

    def _fail(self, message: str) -> RuntimeError:
        self._error = RuntimeError(message)
        self.close()
        return self._error

    def _check_workers(self) -> None:
        dead = [p for p in self._procs if p.exitcode is not None]
        if dead:
            raise self._fail(f"PC+ worker process {dead[0].name} exited with code {dead[0].exitcode} "
                             f"(batch {self._next} pending); its stderr has the reason")

    def __next__(self) -> dict[str, np.ndarray]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StopIteration
        if self._next >= self._stop:
            self.close()  # nothing more to build: let the workers go
            raise StopIteration
        self._check_workers()
        while self._next not in self._ready:
            try:
                kind, step, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_workers()
                continue
            if kind == "error":
                raise self._fail(f"PC+ worker failed on batch {step}: {payload}" if step >= 0 else
                                 f"PC+ worker failed to start: {payload}")
            self._ready[step] = (self._inflight.pop(step), payload)
        slot, small = self._ready.pop(self._next)
        parts = {**dict(zip(slot.keys, slot.arrays)), **small}
        batch = {k: parts[k] for k in self._keys}  # the order `batch()` and tf.data give
        slot.busy = False  # reusable once `batch` (and views of it) are gone
        self._next += 1
        self._fill()
        return batch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._procs:
            self._tasks.put(None)
        # Drain results meanwhile: a worker whose unread results fill the pipe cannot exit.
        deadline = time.monotonic() + 5.0
        while any(p.is_alive() for p in self._procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty, OSError, EOFError):
                while True:
                    self._results.get_nowait()
            for proc in self._procs:
                proc.join(timeout=0.05)
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for slot in self._slots:
            # Unlink only: batches handed out may still be in use (the mapping lives until they go).
            try:
                slot.shm.unlink()
            except FileNotFoundError:
                pass
        self._tasks.close()
        self._results.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown queues may already be gone
            self.close()


def _check_shared_memory(needed: int) -> None:
    """Refuse up front when /dev/shm cannot hold the slots (Docker's default is 64 MB): a worker
    writing past it would die of SIGBUS with no message."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (not Linux): nothing to check
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise ValueError(f"/dev/shm has {free / 2**20:.0f} MB free, PC+ workers need at least {needed / 2**20:.0f} MB "
                         "(batch_size x image_size² x 7-8 bytes per slot, 2 x workers + 2 slots); enlarge it "
                         "(docker run --shm-size=...) or use fewer workers / a smaller batch")


def eval_dataset(source: Source, batch_size: int = 32, image_size: int = 352,
                 process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """CLIPSeg's PhraseCut test view of `source` (`clipseg_jax.evaluate.phrasecut.eval_view`: whole image
    squashed to image_size², mask nearest, raw phrase), the image rounded to uint8 as batches are, in order.

    Finite; host p takes tasks p, p+P, ...; the last batch may be smaller.
    """
    import tensorflow as tf

    from clipseg_jax.evaluate.phrasecut import eval_view

    process_index, process_count = _host_shard(process_index, process_count)
    phrases = np.array([p.encode() for p in source.phrases], dtype=object)
    s = image_size

    def load(i):
        image, mask = eval_view(*source.read(int(i)), s)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, phrases[int(i)]

    def fn(i):
        image, mask, phrase = tf.numpy_function(load, [i], (tf.uint8, tf.uint8, tf.string), stateful=False)
        image.set_shape([s, s, 3])
        mask.set_shape([s, s])
        phrase.set_shape([])
        return {"image": image, "mask": mask, "phrase": phrase, "task_index": i}

    ds = tf.data.Dataset.range(process_index, len(source), process_count)
    ds = ds.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=static_parallelism(None),
                deterministic=True).batch(batch_size).prefetch(2)
    return ds.with_options(static_options())
