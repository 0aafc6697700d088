"""Random-access task sources for the PC+ pipeline (numpy).

A source is a list of tasks (image, mask, phrase) with
  * `phrases`: the phrase of every task (host-side, no image read),
  * `image_keys`: the identity of each task's image (tasks sharing an image share a key), and
  * `read(index)`: (image uint8 (H, W, 3), mask uint8 (H, W) {0,1}) of one task, decoded;
    `read_mask(index)` only the mask.
PC+ needs random access because a task's visual support is another task with the same phrase.

Sources: `TfdsSource` (the prepared `phrasecut` TFDS dataset, array_record), `OwnDataSource`
(a folder with images, PNG masks and `annotations.jsonl`) and `CachedSource` (images
pre-resized to the training resolution, raw uint8 in one memory-mapped file; built with
`build_cache`).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipseg_jax._io import atomic_directory
from clipseg_jax.resize import torch_bilinear_align_corners_u8, torch_nearest
from data_pipelines.imageops import crop_cumsum, decode_image, decode_mask, short_side_shape

log = logging.getLogger(__name__)


class Source:
    """Base class: subclasses set `phrases` and `image_keys` and implement `read`."""

    phrases: list[str]
    image_keys: list[str]  # identity of each task's image (tasks sharing an image share a key)
    pre_resized: int | None = None  # side the images' short side was pre-resized to (cache)

    def __len__(self) -> int:
        return len(self.phrases)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3), mask uint8 (H, W) {0,1}); the image may be a read-only view."""
        raise NotImplementedError

    def read_mask(self, index: int) -> np.ndarray:
        """The mask of task `index` alone (sources that can skip the image decode override it)."""
        return self.read(index)[1]


def _reopen_class(obj: Source, base: type) -> type:
    """The class that re-creates `obj` from `base`'s constructor arguments: its own, unless a subclass
    changed the constructor (then those arguments would not fit, and copying the state is no option)."""
    cls = type(obj)
    if cls.__init__ is not base.__init__:
        raise TypeError(f"{cls.__name__} subclasses {base.__name__} with its own __init__; define "
                        f"__reduce__ to pickle it (PC+ workers re-create sources from pickles)")
    return cls


@functools.lru_cache(maxsize=1)
def _example_parser():
    """`FromString` of a protobuf class wire-compatible with `tf.train.Example` for the features read
    here (bytes lists), built from a descriptor: parsing needs protobuf, not TensorFlow."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="clipseg_jax_example.proto", package="clipseg_jax_example",
                                            syntax="proto3")
    fd.message_type.add(name="BytesList").field.add(name="value", number=1, type=f.TYPE_BYTES,
                                                    label=f.LABEL_REPEATED)
    fd.message_type.add(name="Feature").field.add(name="bytes_list", number=1, type=f.TYPE_MESSAGE,
                                                  label=f.LABEL_OPTIONAL, type_name=".clipseg_jax_example.BytesList")
    features = fd.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                    type_name=".clipseg_jax_example.Feature")
    features.field.add(name="feature", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                       type_name=".clipseg_jax_example.Features.FeatureEntry")
    fd.message_type.add(name="Example").field.add(name="features", number=1, type=f.TYPE_MESSAGE,
                                                  label=f.LABEL_OPTIONAL, type_name=".clipseg_jax_example.Features")
    pool = descriptor_pool.DescriptorPool()  # private: no clash with TensorFlow's own registrations
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("clipseg_jax_example.Example")).FromString


class _RecordReader:
    """Random access to array_record files (the C++ reader is thread-safe)."""

    def __init__(self, paths: Sequence[str]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._source = ArrayRecordDataSource([os.fspath(p) for p in paths])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        return self._source[int(i)]


class TfdsSource(Source):
    """Tasks of a prepared `phrasecut` split (built with file_format='array_record')."""

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, name: str = "phrasecut"):
        import tensorflow_datasets as tfds

        import data_pipelines.phrasecut  # noqa: F401  (registers the builder)

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
        self._open([os.fspath(p) for p in paths], name, split, list(meta["phrase"]), list(meta["task_id"]),
                   [str(i) for i in meta["image_id"]])
        if len(self._reader) != len(self.phrases):
            raise ValueError(f"{name}/{split}: {len(self._reader)} records but {len(self.phrases)} index entries")

    def _open(self, paths: list[str], name: str, split: str, phrases: list, task_ids: list, image_keys: list) -> None:
        self._paths = paths
        self._reader = _RecordReader(paths)
        self._parse = _example_parser()  # a record is a serialized tf.train.Example (~30 µs)
        self.name, self.split = name, split
        self.phrases, self.task_ids, self.image_keys = phrases, task_ids, image_keys

    @classmethod
    def _reopen(cls, state: tuple) -> TfdsSource:
        """The source from `__reduce__`'s state: the record files and index, without TFDS or TensorFlow
        (a PC+ worker imports neither for it)."""
        self = cls.__new__(cls)
        self._open(*state)
        return self

    def _features(self, index: int, *keys: str) -> list[tuple[bytes, str]]:
        """(encoded bytes, name for errors) of features of record `index`."""
        f = self._parse(self._reader[index]).features.feature
        return [(f[key].bytes_list.value[0], f"{self.name}/{self.split} task {self.task_ids[index]} {key}")
                for key in keys]

    def __reduce__(self):
        # Pickled by its files and index (PC+ worker processes reopen the records).
        cls = _reopen_class(self, TfdsSource)
        return (cls._reopen, ((self._paths, self.name, self.split, self.phrases, self.task_ids, self.image_keys),))

    def encoded(self, index: int) -> tuple[bytes, bytes]:
        """(JPEG bytes, PNG bytes) of task `index` as stored, undecoded (benchmarks time the decode alone)."""
        (image, _), (mask, _) = self._features(index, "image", "mask")
        return image, mask

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self._features(index, "image", "mask")
        return decode_image(*image), decode_mask(*mask)

    def read_mask(self, index: int) -> np.ndarray:
        return decode_mask(*self._features(index, "mask")[0])


class AnnotationError(ValueError):
    """Lines of an own-data `annotations.jsonl` that cannot be read (all of them, in `problems`)."""

    def __init__(self, path: Path, problems: list[str], lines: int):
        self.path, self.problems, self.lines = path, problems, lines
        more = (f" (and {len(problems) - 1} more bad lines of {lines}; list them all with: python -m "
                f"data_pipelines.own_data {path.parent})") if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


class OwnDataSource(Source):
    """Your own data: `folder/annotations.jsonl` with one `{"image", "mask", "phrase"}` per line.

    Paths are relative to the folder (or absolute). Images: any JPEG/PNG/BMP/GIF; masks: PNG,
    single channel or RGB(A)/LA; a pixel non-zero in any colour channel is object (one rule,
    `imageops.decode_mask`, for reading and for the emptiness check). Several lines may share an
    image (one task per phrase). Validation at construction: lines that are not an annotation (bad
    JSON, not an object, a missing key, a missing file) raise one `AnnotationError` listing them all;
    an undecodable image/mask, a mask of another size or an empty mask is skipped and counted in a
    warning naming the line (`self.skipped`).
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
        checked: dict[tuple, tuple | str] = {}
        problems: list[str] = []  # fatal: the line cannot be read as an annotation
        lines = 0
        with open(ann, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines += 1
                where = f"{ann}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(rec, dict):
                    problems.append(f"{where}: a JSON {type(rec).__name__}, expected an object "
                                    "{\"image\": ..., \"mask\": ..., \"phrase\": ...}")
                    continue
                missing = [k for k in ("image", "mask", "phrase") if not isinstance(rec.get(k), str) or not rec[k]]
                if missing:
                    problems.append(f"{where}: missing or non-string key(s) {missing}; "
                                    "expected {\"image\": ..., \"mask\": ..., \"phrase\": ...}")
                    continue
                img_p, mask_p = self.folder / rec["image"], self.folder / rec["mask"]
                absent = [str(p) for p in (img_p, mask_p) if not p.is_file()]
                if absent:
                    problems.append(f"{where}: file not found: {', '.join(absent)}")
                    continue
                if validate != "none":
                    size_i = self._check(img_p, validate, checked, is_mask=False)
                    size_m = self._check(mask_p, validate, checked, is_mask=True)
                    bad = [(p, r) for p, r in ((img_p, size_i), (mask_p, size_m)) if isinstance(r, str)]
                    if bad:
                        log.warning("own data: skipping %s: unreadable %s (%s)", where, bad[0][0], bad[0][1])
                        self.skipped["unreadable_file"] += 1
                        continue
                    if size_i != size_m[:2]:
                        log.warning("own data: skipping %s: mask %s is %sx%s, image %s is %sx%s", where,
                                    mask_p, *size_m[:2], img_p, *size_i)
                        self.skipped["size_mismatch"] += 1
                        continue
                    if validate == "full" and not size_m[2]:
                        log.warning("own data: skipping %s: mask %s is empty", where, mask_p)
                        self.skipped["empty_mask"] += 1
                        continue
                images.append(os.fspath(img_p))
                masks.append(os.fspath(mask_p))
                phrases.append(rec["phrase"])
        if problems:
            raise AnnotationError(ann, problems, lines)
        if self.skipped:
            log.warning("own data %s: skipped %d annotation(s): %s", self.folder, sum(self.skipped.values()),
                        dict(self.skipped))
        if not phrases:
            raise ValueError(f"{ann}: no usable annotations")
        self.lines = lines
        self.phrases = phrases
        self.image_keys = images
        self._images = images
        self._masks = masks

    @staticmethod
    def _check(path: Path, mode: str, cache: dict, is_mask: bool) -> tuple | str:
        """(h, w) of an image, (h, w, non-empty) of a mask, or why the file cannot be read."""
        key = (os.fspath(path), is_mask)
        if key in cache:
            return cache[key]
        try:
            if is_mask and mode == "full":  # decoded by the reader itself, so "empty" means what it reads
                m = decode_mask(np.fromfile(path, np.uint8), os.fspath(path))
                res = (m.shape[0], m.shape[1], bool(m.any()))
            else:
                with Image.open(path) as im:
                    if mode == "full":
                        im.load()
                    res = (im.size[1], im.size[0], True) if is_mask else (im.size[1], im.size[0])
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            res = str(e).splitlines()[0] if str(e) else type(e).__name__
        cache[key] = res
        return res

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = decode_image(np.fromfile(self._images[index], np.uint8), self._images[index])
        mask = self.read_mask(index)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{self._masks[index]}: mask is {mask.shape[0]}x{mask.shape[1]} but image "
                             f"{self._images[index]} is {image.shape[0]}x{image.shape[1]}")
        return image, mask

    def read_mask(self, index: int) -> np.ndarray:
        return decode_mask(np.fromfile(self._masks[index], np.uint8), self._masks[index])


class SubsetSource(Source):
    """Tasks `indices` of `source`, in that order (a held-out part, the first N tasks, ...)."""

    def __init__(self, source: Source, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        if len(self.indices) and not (0 <= self.indices.min() and self.indices.max() < len(source)):
            raise ValueError(f"SubsetSource: indices outside 0..{len(source) - 1}")
        self.phrases = [source.phrases[i] for i in self.indices]
        self.image_keys = [source.image_keys[i] for i in self.indices]
        self.pre_resized = source.pre_resized
        if getattr(source, "crop_cumsum", None) is None:
            self.crop_cumsum = None  # PCPlus then computes the crop profile from the mask

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read(int(self.indices[index]))

    def read_mask(self, index: int) -> np.ndarray:
        return self.source.read_mask(int(self.indices[index]))

    def crop_cumsum(self, index: int) -> np.ndarray:
        return self.source.crop_cumsum(int(self.indices[index]))


def held_out_split(source: Source, fraction: float = 0.1, relative_to: str | os.PathLike | None = None
                   ) -> tuple[SubsetSource, SubsetSource]:
    """(train, held-out) parts of `source`, split by image: an image is held out when a hash of its key (made
    relative to `relative_to`, so moving the folder changes nothing) falls below `fraction`. Deterministic,
    independent of the task order, and stable when images are added. At least one image goes to each part."""
    import hashlib

    keys = sorted(set(source.image_keys))
    if len(keys) < 2:
        raise ValueError(f"cannot hold out {fraction:.0%} of the images: the data has {len(keys)} image(s)")

    def h(key: str) -> float:
        k = os.path.relpath(key, relative_to) if relative_to is not None else key
        return int(hashlib.sha256(k.encode()).hexdigest()[:12], 16) / 16**12

    score = {k: h(k) for k in keys}
    held = {k for k in keys if score[k] < fraction}
    ranked = sorted(keys, key=score.get)
    if not held:
        held = {ranked[0]}
    if len(held) == len(keys):
        held.discard(ranked[-1])
    is_held = np.array([k in held for k in source.image_keys])
    return SubsetSource(source, np.flatnonzero(~is_held)), SubsetSource(source, np.flatnonzero(is_held))


CACHE_FORMAT = 3


class CachedSource(Source):
    """Images pre-resized so that the short side equals `size` (`build_cache`), memory-mapped.

    `images.u8` holds every image once (raw uint8, (h, w, 3) each, back to back); `masks.bits`
    every task's mask bit-packed (`np.packbits`, padded to a byte); `crop_profiles.u32` every
    task's foreground count along its long axis as a cumulative sum (max(h, w) + 1 values, the
    PC+ crop search's input, so it needs no pass over the mask); `index.json` the phrases,
    each task's image record and each record's shape. Reading a task is a view into the page
    cache plus one unpack of its mask: no decode, no copy of the image.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        cache_dir = Path(cache_dir)
        self.cache_dir = cache_dir
        index_path = cache_dir / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: not a cache written by data_pipelines.sources.build_cache")
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{index_path}: cache format {index.get('format', 1)}, expected {CACHE_FORMAT}; "
                             f"rebuild it with data_pipelines.sources.build_cache")
        self.phrases = index["phrases"]
        self.image_keys = [str(i) for i in index["image_record"]]
        self.pre_resized = int(index["size"])
        self._record = np.asarray(index["image_record"], np.int64)
        self._shapes = np.asarray(index["image_shapes"], np.int64).reshape(-1, 2)  # per image record (h, w)
        pixels = self._shapes[:, 0] * self._shapes[:, 1]
        self._image_off = np.concatenate([[0], np.cumsum(pixels * 3)])
        mask_bytes = (pixels[self._record] + 7) // 8
        self._mask_off = np.concatenate([[0], np.cumsum(mask_bytes)])
        self._profile_off = np.concatenate([[0], np.cumsum(self._shapes[self._record].max(axis=1) + 1)])
        self._images = self._map(cache_dir / "images.u8", int(self._image_off[-1]))
        self._masks = self._map(cache_dir / "masks.bits", int(self._mask_off[-1]))
        self._profiles = self._map(cache_dir / "crop_profiles.u32", 4 * int(self._profile_off[-1])).view(np.uint32)

    def __reduce__(self):
        # Pickled by its folder (PC+ worker processes map the files again instead of copying them).
        return (_reopen_class(self, CachedSource), (self.cache_dir,))

    @staticmethod
    def _map(path: Path, size: int) -> np.ndarray:
        if not path.exists() or path.stat().st_size != size:
            got = path.stat().st_size if path.exists() else "missing"
            raise ValueError(f"{path}: expected {size} bytes (from index.json), found {got}; rebuild the cache")
        if size == 0:
            return np.zeros(0, np.uint8)
        # A plain ndarray view (it keeps the mapping alive): slices of an np.memmap run Python-level
        # subclass hooks on every read.
        return np.asarray(np.memmap(path, np.uint8, mode="r", shape=(size,)))

    def image_shape(self, index: int) -> tuple[int, int]:
        """(h, w) of a task's cached image, from the index (no read)."""
        h, w = self._shapes[self._record[index]]
        return int(h), int(w)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = int(self._record[index])
        h, w = (int(v) for v in self._shapes[rec])
        image = self._images[self._image_off[rec]:self._image_off[rec + 1]].reshape(h, w, 3)
        return image, self.read_mask(index)

    def read_mask(self, index: int) -> np.ndarray:
        h, w = self.image_shape(index)
        packed = self._masks[self._mask_off[index]:self._mask_off[index + 1]]
        return np.unpackbits(packed, count=h * w).reshape(h, w)

    def crop_cumsum(self, index: int) -> np.ndarray:
        """Foreground pixels in the first k rows (tall mask) or columns (otherwise), k = 0..max(h, w)."""
        return self._profiles[self._profile_off[index]:self._profile_off[index + 1]]


def build_cache(source: Source, out_dir: str | os.PathLike, size: int = 352, threads: int | None = None) -> Path:
    """Pre-resize every image of `source` (short side -> `size`) into a `CachedSource` folder.

    Images: bilinear with align_corners=True (`resize.torch_bilinear_align_corners_u8`, the pipeline's own
    resize), stored once per image (tasks sharing an image share it); masks: nearest
    (`torch_nearest`), bit-packed per task. At train time the PC+ random square crop is then
    taken at `size` directly, without a resize: this approximates crop-then-resize (sub-pixel
    differences); the crop search is unchanged. Raw uint8 needs about 3 * size² * aspect bytes
    per image (≈ 0.5 MB at 352 for 4:3). Written to a temporary folder and renamed when complete.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to rebuild the cache")
    # Image record of every task, and the first task of every record (whose image is stored).
    record_of_key: dict[str, int] = {}
    image_record, record_to_task = [], []
    for task, key in enumerate(source.image_keys):
        if key not in record_of_key:
            record_of_key[key] = len(record_to_task)
            record_to_task.append(task)
        image_record.append(record_of_key[key])

    def image_of(task: int) -> np.ndarray:
        image, _ = source.read(task)
        nh, nw = short_side_shape(image.shape[0], image.shape[1], size)
        return torch_bilinear_align_corners_u8(image, nh, nw)

    def mask_of(task: int) -> np.ndarray:
        mask = (np.asarray(source.read_mask(task)) != 0).view(np.uint8)  # {0,1} whatever the source's values
        nh, nw = short_side_shape(mask.shape[0], mask.shape[1], size)
        return torch_nearest(mask, (nh, nw))

    with atomic_directory(out) as tmp:
        shapes = []
        # OpenCV releases the GIL: threads decode and resize in parallel; map() keeps the order.
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            with open(tmp / "images.u8", "wb") as f:
                for img in pool.map(image_of, record_to_task):
                    shapes.append([int(img.shape[0]), int(img.shape[1])])
                    f.write(np.ascontiguousarray(img).tobytes())
            with open(tmp / "masks.bits", "wb") as f, open(tmp / "crop_profiles.u32", "wb") as fp:
                for i, m in enumerate(pool.map(mask_of, range(len(source)))):
                    if list(m.shape) != shapes[image_record[i]]:
                        raise ValueError(f"task {i}: mask shape {m.shape[:2]} != image shape {shapes[image_record[i]]}")
                    f.write(np.packbits(m.reshape(-1)).tobytes())
                    fp.write(crop_cumsum(m).astype(np.uint32).tobytes())
        with open(tmp / "index.json", "w") as f:
            json.dump({"format": CACHE_FORMAT, "size": size, "phrases": list(source.phrases),
                       "image_record": image_record, "image_shapes": shapes}, f)
    return out
