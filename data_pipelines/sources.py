"""Random-access task sources for the PC+ pipeline.

A source is a list of tasks (image, mask, phrase) with
  * `phrases`: the phrase of every task (host-side, no image read), and
  * `load(index)`: a TF-graph function returning (image uint8 (H, W, 3), mask uint8 (H, W) {0,1}).
PC+ needs random access because a task's visual support is another task with the same phrase.

Sources: `TfdsSource` (the prepared `phrasecut` TFDS dataset, array_record), `OwnDataSource`
(a folder with images, PNG masks and `annotations.jsonl`) and `CachedSource` (records of images
pre-resized to the training resolution; built with `build_cache`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


class Source:
    """Base class: subclasses set `phrases`, `image_keys` and implement `load_encoded`.

    `load_encoded(index)` returns (image data, mask uint8 (H, W) {0,1}) where the image data is
    still encoded; `decode_image(data, mask_shape, window)` decodes only the crop window (JPEG:
    `decode_and_crop_jpeg`), so the PC+ crop search runs on the mask before the image is decoded.
    """

    phrases: list[str]
    image_keys: list[str]  # identity of each task's image (tasks sharing an image share a key)
    pre_resized: int | None = None  # side the images' short side was pre-resized to (cache)

    def __len__(self) -> int:
        return len(self.phrases)

    def load_encoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def decode_image(self, data: tf.Tensor, mask_shape: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
        """uint8 (h, w, 3) image, cropped to window = [y, x, h, w] when given (any format)."""
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        if window is not None:
            img = img[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
        img.set_shape([None, None, 3])
        return img


    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Whole image and mask (eval view, cache building)."""
        data, mask = self.load_encoded(index)
        return self.decode_image(data, tf.shape(mask)), mask


def _decode_mask(mask_bytes: tf.Tensor) -> tf.Tensor:
    mask = tf.io.decode_png(mask_bytes, channels=1)[:, :, 0]
    mask = tf.cast(mask > 0, tf.uint8)
    mask.set_shape([None, None])
    return mask


class _RecordReader:
    """Thread-safe-enough random access to array_record files (one reader per file)."""

    def __init__(self, paths: Sequence[str]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._source = ArrayRecordDataSource([os.fspath(p) for p in paths])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        return self._source[int(i)]


def _decode_jpeg_window(data: tf.Tensor, shape: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Crop window of a JPEG, pixel-identical to decoding the whole image and slicing.

    `decode_and_crop_jpeg` on an arbitrary window differs from the full decode by up to ~40
    levels at chroma-subsampled edges (libjpeg crops at iMCU boundaries and upsamples chroma
    with edge replication). Decoding a window widened to 16-px boundaries plus one 16-px block
    on each side and slicing afterwards is exact (checked on 564 horizontal crops).
    """
    y0, x0, h, w = window[0], window[1], window[2], window[3]
    H, W = shape[0], shape[1]
    ay0, ax0 = tf.maximum(0, (y0 // 16) * 16 - 16), tf.maximum(0, (x0 // 16) * 16 - 16)
    ay1 = tf.minimum(H, -((-(y0 + h)) // 16) * 16 + 16)
    ax1 = tf.minimum(W, -((-(x0 + w)) // 16) * 16 + 16)
    img = tf.io.decode_and_crop_jpeg(data, tf.stack([ay0, ax0, ay1 - ay0, ax1 - ax0]), channels=3)
    return img[y0 - ay0:y0 - ay0 + h, x0 - ax0:x0 - ax0 + w]


class TfdsSource(Source):
    """Tasks of a prepared `phrasecut` split (built with file_format='array_record')."""

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, name: str = "phrasecut"):
        import tensorflow_datasets as tfds

        import data_pipelines  # noqa: F401  (registers the builder)

        builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir else None)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; run "
                f"data_pipelines.phrasecut.build(manual_dir, data_dir) or `tfds build {name} --manual_dir=...`")
        if split not in builder.info.splits:
            raise KeyError(f"split {split!r} not in {name!r}; available: {list(builder.info.splits)}")
        meta = builder.info.metadata[split]
        paths = builder.info.splits[split].filepaths
        if not all(str(p).split(".")[-1].startswith("array_record") for p in paths):
            raise ValueError(f"{name} split {split!r} was not prepared as array_record ({paths[:1]}); "
                             "rebuild with file_format='array_record' for random access")
        self._reader = _RecordReader(paths)
        self.phrases = list(meta["phrase"])
        self.task_ids = list(meta["task_id"])
        self.image_keys = [str(i) for i in meta["image_id"]]
        if len(self._reader) != len(self.phrases):
            raise ValueError(f"{name}/{split}: {len(self._reader)} records but {len(self.phrases)} index entries")
        self._spec = {"image": tf.io.FixedLenFeature([], tf.string), "mask": tf.io.FixedLenFeature([], tf.string)}

    def _fetch(self, i: np.ndarray) -> bytes:
        return self._reader[int(i)]

    def decode_image(self, data: tf.Tensor, mask_shape: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
        # The builder stores JPEG only: decode just (about) the crop window.
        if window is None:
            img = tf.io.decode_jpeg(data, channels=3)
        else:
            img = _decode_jpeg_window(data, mask_shape, window)
        img.set_shape([None, None, 3])
        return img


    def load_encoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raw = tf.numpy_function(self._fetch, [index], tf.string, stateful=False)
        raw.set_shape([])
        ex = tf.io.parse_single_example(raw, self._spec)
        return ex["image"], _decode_mask(ex["mask"])


class OwnDataSource(Source):
    """Your own data: `folder/annotations.jsonl` with one `{"image", "mask", "phrase"}` per line.

    Paths are relative to the folder (or absolute). Images: any JPEG/PNG/BMP/GIF; masks: PNG,
    single channel (or RGB/LA, converted to gray), non-zero = object. Several lines may share an
    image (one task per phrase). Validation at construction: a missing file raises an error
    naming it; an undecodable image/mask, a mask of another size or an empty mask is skipped and
    counted in a warning (`self.skipped`).
    """

    def __init__(self, folder: str | os.PathLike, validate: str = "full"):
        self.folder = Path(folder)
        ann = self.folder / "annotations.jsonl"
        if not ann.exists():
            raise FileNotFoundError(f"{ann} not found (expected one JSON object per line with keys "
                                    "'image', 'mask', 'phrase')")
        if validate not in ("full", "header", "none"):
            raise ValueError(f"validate must be 'full', 'header' or 'none'; got {validate!r}")
        self.skipped: Counter = Counter()
        images, masks, phrases = [], [], []
        checked: dict[str, tuple | None] = {}
        with open(ann) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{ann}:{lineno}: invalid JSON ({e.msg})") from None
                missing = [k for k in ("image", "mask", "phrase") if not isinstance(rec.get(k), str) or not rec[k]]
                if missing:
                    raise ValueError(f"{ann}:{lineno}: missing or non-string key(s) {missing}; "
                                     "expected {\"image\": ..., \"mask\": ..., \"phrase\": ...}")
                img_p, mask_p = self.folder / rec["image"], self.folder / rec["mask"]
                for p in (img_p, mask_p):
                    if not p.exists():
                        raise FileNotFoundError(f"{ann}:{lineno}: file not found: {p}")
                if validate != "none":
                    size_i = self._check(img_p, validate, checked, is_mask=False)
                    size_m = self._check(mask_p, validate, checked, is_mask=True)
                    if size_i is None or size_m is None:
                        self.skipped["unreadable_file"] += 1
                        continue
                    if size_i != size_m[:2]:
                        log.warning("own data: skipping %s:%d: mask %s is %sx%s, image %s is %sx%s", ann, lineno,
                                    mask_p, *size_m[:2], img_p, *size_i)
                        self.skipped["size_mismatch"] += 1
                        continue
                    if validate == "full" and not size_m[2]:
                        log.warning("own data: skipping %s:%d: mask %s is empty", ann, lineno, mask_p)
                        self.skipped["empty_mask"] += 1
                        continue
                images.append(os.fspath(img_p))
                masks.append(os.fspath(mask_p))
                phrases.append(rec["phrase"])
        if self.skipped:
            log.warning("own data %s: skipped %d annotation(s): %s", self.folder, sum(self.skipped.values()),
                        dict(self.skipped))
        if not phrases:
            raise ValueError(f"{ann}: no usable annotations")
        self.phrases = phrases
        self.image_keys = images
        self._images = tf.constant(images)
        self._masks = tf.constant(masks)

    @staticmethod
    def _check(path: Path, mode: str, cache: dict, is_mask: bool):
        key = (os.fspath(path), is_mask)
        if key in cache:
            return cache[key]
        try:
            with Image.open(path) as im:
                if mode == "full":
                    im.load()
                    nonempty = bool(np.asarray(im.convert("L")).any()) if is_mask else True
                else:
                    nonempty = True
                res = (im.size[1], im.size[0], nonempty) if is_mask else (im.size[1], im.size[0])
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            log.warning("own data: skipping unreadable %s (%s)", path, e)
            res = None
        cache[key] = res
        return res

    def load_encoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.io.read_file(tf.gather(self._images, index)), _decode_mask(tf.io.read_file(tf.gather(self._masks, index)))


class CachedSource(Source):
    """Images pre-resized so that the short side equals `size`, raw uint8 in array_record.

    Tasks sharing an image share one image record; masks are bit-packed per task.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        cache_dir = Path(cache_dir)
        with open(cache_dir / "index.json") as f:
            index = json.load(f)
        self.phrases = index["phrases"]
        self.image_keys = [str(i) for i in index["image_record"]]
        self.pre_resized = int(index["size"])
        self._image_record = np.asarray(index["image_record"], np.int64)
        self._shapes_np = np.asarray(index["image_shapes"], np.int32)  # per image record (h, w)
        self._shapes = tf.constant(self._shapes_np)
        self._image_record_tf = tf.constant(self._image_record)
        self._images = _RecordReader([cache_dir / "images.array_record"])
        self._masks = _RecordReader([cache_dir / "masks.array_record"])

    def _fetch(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        rec = int(self._image_record[i])
        h, w = self._shapes_np[rec]
        image = np.frombuffer(self._images[rec], np.uint8)
        mask = np.unpackbits(np.frombuffer(self._masks[i], np.uint8), count=int(h) * int(w))
        return image, mask

    def load_encoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Unpacking in numpy (one C call) is cheaper than the equivalent chain of TF ops.
        image, mask = tf.numpy_function(self._fetch, [index], (tf.uint8, tf.uint8), stateful=False)
        hw = tf.gather(self._shapes, tf.gather(self._image_record_tf, index))
        return image, tf.reshape(mask, hw)

    def image_shape(self, index: tf.Tensor) -> tf.Tensor:
        """(h, w) int32 of a task's cached image, from the index (no read)."""
        return tf.gather(self._shapes, tf.gather(self._image_record_tf, index))

    def _fetch_square(self, i: np.ndarray, offsets: np.ndarray, min_frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        rec = int(self._image_record[i])
        h, w = (int(v) for v in self._shapes_np[rec])
        mask = np.unpackbits(np.frombuffer(self._masks[i], np.uint8), count=h * w).reshape(h, w)
        oy, ox, side = pick_square_crop_np(mask, offsets, float(min_frac))
        image = np.frombuffer(self._images[rec], np.uint8).reshape(h, w, 3)
        return (np.ascontiguousarray(image[oy:oy + side, ox:ox + side]),
                np.ascontiguousarray(mask[oy:oy + side, ox:ox + side]))

    def load_square_window(self, index: tf.Tensor, offsets: tf.Tensor, min_frac: float) -> tuple[tf.Tensor, tf.Tensor]:
        """(image, mask) of the square crop that `pcplus.find_square_crop` picks from `offsets`.

        One numpy call reads the record, unpacks the mask, runs the crop choice
        (`pick_square_crop_np`, same rule) and copies only the window into the graph.
        """
        image, mask = tf.numpy_function(self._fetch_square, [index, offsets, tf.constant(min_frac, tf.float64)],
                                        (tf.uint8, tf.uint8), stateful=False)
        image.set_shape([None, None, 3])
        mask.set_shape([None, None])
        return image, mask

    def decode_image(self, data: tf.Tensor, mask_shape: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
        image = tf.reshape(data, tf.concat([mask_shape, [3]], 0))
        if window is not None:
            image = image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
        return image


def pick_square_crop_np(mask: np.ndarray, offsets: np.ndarray, min_frac: float) -> tuple[int, int, int]:
    """numpy twin of `pcplus.find_square_crop` given its random offsets along the long axis.

    First offset whose min(H, W) window holds more than `min_frac` * H * W foreground pixels,
    else the first with the most foreground. Returns (offset_y, offset_x, side).
    """
    h, w = mask.shape
    side = min(h, w)
    tall = h > w
    line = mask.sum(axis=1 if tall else 0, dtype=np.int64)
    cs = np.concatenate([[0], np.cumsum(line)])
    offsets = np.asarray(offsets, np.int64)
    sums = cs[offsets + side] - cs[offsets]
    ok = sums.astype(np.float64) > min_frac * float(h * w)
    off = int(offsets[int(np.argmax(ok)) if ok.any() else int(np.argmax(sums))])
    return (off, 0, side) if tall else (0, off, side)


def short_side_shape(h: int | tf.Tensor, w: int | tf.Tensor, size: int):
    """(h', w') with min(h', w') == size and the aspect ratio kept (rounded)."""
    if isinstance(h, int):
        m = min(h, w)
        return (size, max(size, round(w * size / m))) if h <= w else (max(size, round(h * size / m)), size)
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    m = tf.minimum(hf, wf)
    nh = tf.maximum(size, tf.cast(tf.round(hf * size / m), tf.int32))
    nw = tf.maximum(size, tf.cast(tf.round(wf * size / m), tf.int32))
    return tf.where(h <= w, size, nh), tf.where(h <= w, nw, size)


def build_cache(source: Source, out_dir: str | os.PathLike, size: int = 352, threads: int | None = None,
                compression: str = "uncompressed") -> Path:
    """Pre-resize every image of `source` (short side -> `size`) into `out_dir` records.

    Image: bilinear with align_corners=True (the original's resize); masks: nearest. At train
    time the PC+ random square crop is then taken at `size` directly, without a resize. This
    approximates crop-then-resize (sub-pixel differences); the crop search is unchanged.
    Written to a temporary directory and renamed when complete.

    `compression` is an array_record option for the image records: "uncompressed" (default:
    reading a 352x528 image is a copy, ~0.05 ms, against ~0.9 ms to decompress the library's
    default zstd, which would be the largest cost per sample in cached mode), or e.g. "zstd:3" /
    "snappy" (about 2/3 of the disk space on photos; CachedSource reads any of them).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    from data_pipelines.pcplus import resize_image, resize_mask

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to rebuild the cache")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        first_task: dict[str, int] = {}
        image_record = []
        for key in source.image_keys:
            image_record.append(first_task.setdefault(key, len(first_task)))
        record_to_task = _first_indices(image_record)

        def load_resized(i):
            image, mask = source.load(i)
            nh, nw = short_side_shape(tf.shape(image)[0], tf.shape(image)[1], size)
            return resize_image(image, nh, nw), resize_mask(mask, nh, nw)

        opts = tf.data.Options()
        if threads:
            opts.threading.private_threadpool_size = threads
        shapes = []
        w_img = ArrayRecordWriter(os.fspath(tmp / "images.array_record"), f"group_size:1,{compression}")
        ds = tf.data.Dataset.from_tensor_slices(np.asarray(record_to_task, np.int64)).map(
            lambda i: load_resized(i)[0], num_parallel_calls=tf.data.AUTOTUNE).with_options(opts)
        for img in ds.as_numpy_iterator():
            shapes.append([int(img.shape[0]), int(img.shape[1])])
            w_img.write(np.ascontiguousarray(img).tobytes())
        w_img.close()
        w_mask = ArrayRecordWriter(os.fspath(tmp / "masks.array_record"), "group_size:1")
        ds = tf.data.Dataset.range(len(source)).map(
            lambda i: load_resized(i)[1], num_parallel_calls=tf.data.AUTOTUNE).with_options(opts)
        for i, m in enumerate(ds.as_numpy_iterator()):
            if list(m.shape) != shapes[image_record[i]]:
                raise AssertionError(f"task {i}: mask shape {m.shape} != image shape {shapes[image_record[i]]}")
            w_mask.write(np.packbits(m.reshape(-1).astype(bool)).tobytes())
        w_mask.close()
        with open(tmp / "index.json", "w") as f:
            json.dump({"size": size, "phrases": list(source.phrases), "image_record": image_record,
                       "image_shapes": shapes}, f)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _first_indices(image_record: list[int]) -> list[int]:
    first = {}
    for i, r in enumerate(image_record):
        first.setdefault(r, i)
    return [first[r] for r in range(len(first))]
