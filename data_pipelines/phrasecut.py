"""TFDS builder `phrasecut`: PhraseCut (Wu et al., CVPR 2020) from the manual download.

One example per referring task. Records are written in generation order (integer keys,
`disable_shuffling=True`) so that `info.metadata[split]` (phrase, task id and image id per
record) indexes the records directly; the PC+ pipeline uses it for phrase -> task lookups and
random access without reading the images.
"""
from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from clipseg_jax.evaluate.phrasecut import INVALID_IMAGE_IDS
from clipseg_jax.polygons import polygons_mask

log = logging.getLogger(__name__)

# TFDS split name -> refer file suffix.
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test", "miniv": "miniv"}
REQUIRED_SPLITS = ("train", "validation", "test")  # miniv is optional

_DESCRIPTION = f"""
PhraseCut: referring-expression segmentation on Visual Genome images (Wu et al., CVPR 2020).
One example per task (phrase, image): the image, the union of all referred instances' polygons
rasterised at the image's own size (CLIPSeg's convention, skimage's polygon2mask: a pixel is
foreground when its centre lies inside a polygon or on its boundary), the phrase, its structure
and the instance boxes.

Left out: the 17 image ids whose annotations do not match their image, as in CLIPSeg
({sorted(INVALID_IMAGE_IDS)}); any other image whose decoded size differs from
`image_data_split.json`, or that cannot be decoded; polygons with fewer than 3 points (a task
left without polygons is dropped). Every skip is counted in a warning and in
`info.metadata['skipped']`.
"""

_CITATION = """
@inproceedings{wu2020phrasecut,
  title={PhraseCut: Language-based Image Segmentation in the Wild},
  author={Wu, Chenyun and Lin, Zhe and Cohen, Scott and Bui, Trung and Maji, Subhransu},
  booktitle={CVPR}, year={2020}}
"""


class Phrasecut(tfds.core.GeneratorBasedBuilder):
    """PhraseCut (VGPhraseCut_v0) from a manual download."""

    name = "phrasecut"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Masks include pixels exactly on a polygon edge or vertex, as skimage's polygon2mask "
                              "(the rasteriser shared with evaluation, clipseg_jax.polygons)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    PhraseCut cannot be downloaded automatically (its images come from Visual Genome).
    1. git clone https://github.com/ChenyunWu/PhraseCutDataset && cd PhraseCutDataset
    2. python download_dataset.py -s train_val_test_miniv
       (annotations from Google Drive via gdown, images from the Visual Genome URLs; or run it
       with --download_img 0 and symlink the VG 1.2 images into data/VGPhraseCut_v0/images/).
    3. Copy or symlink the CONTENTS of data/VGPhraseCut_v0/ into the manual dir, so that it holds
       refer_train.json, refer_val.json, refer_test.json, (optional) refer_miniv.json,
       image_data_split.json and images/{image_id}.jpg
       (default manual dir: ~/tensorflow_datasets/downloads/manual/; or pass
       `tfds build phrasecut --manual_dir=DIR` / `tfds.download.DownloadConfig(manual_dir=DIR)`).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "phrase": text,
                "task_id": text,
                "image_id": np.int64,
                "instance_boxes": tfds.features.Sequence(tfds.features.BBoxFeature()),
                "phrase_structure": tfds.features.FeaturesDict({
                    "name": text,
                    "attributes": tfds.features.Sequence(text),
                    "relation_ids": tfds.features.Sequence(np.int64),
                    "relation_descriptions": tfds.features.Sequence({"predicate": text, "object": text}),
                    "type": text,
                }),
            }),
            homepage="https://people.cs.umass.edu/~chenyun/phrasecut/",
            citation=_CITATION,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        if (root / "VGPhraseCut_v0").is_dir() and not (root / "image_data_split.json").exists():
            root = root / "VGPhraseCut_v0"  # accept the folder itself inside the manual dir
        for f in ["image_data_split.json"] + [f"refer_{SPLIT_FILES[s]}.json" for s in REQUIRED_SPLITS]:
            if not (root / f).exists():
                raise FileNotFoundError(
                    f"{root / f} not found; the manual dir must hold PhraseCut's VGPhraseCut_v0 "
                    f"contents.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        splits = dict(SPLIT_FILES)
        for name, suffix in SPLIT_FILES.items():
            if name not in REQUIRED_SPLITS and not (root / f"refer_{suffix}.json").exists():
                # PhraseCut's download script can be run without it (-s train_val_test)
                log.warning("phrasecut: %s not found: building without the optional '%s' split",
                            root / f"refer_{suffix}.json", name)
                del splits[name]
        with open(root / "image_data_split.json") as f:
            image_info = {int(d["image_id"]): d for d in json.load(f)}
        return {name: self._generate_examples(root, suffix, image_info, name) for name, suffix in splits.items()}

    def _generate_examples(self, root: Path, suffix: str, image_info: dict, split: str):
        with open(root / f"refer_{suffix}.json") as f:
            tasks = json.load(f)
        by_image: dict[int, list[dict]] = defaultdict(list)
        for t in tasks:
            by_image[int(t["image_id"])].append(t)
        skipped: Counter = Counter()
        index = {"phrase": [], "task_id": [], "image_id": []}
        key = 0
        for image_id in sorted(by_image):  # sorted: deterministic record order
            image_tasks = by_image[image_id]
            if image_id in INVALID_IMAGE_IDS:
                skipped["invalid_image_id_tasks"] += len(image_tasks)
                continue
            info = image_info.get(image_id)
            if info is None:
                raise KeyError(f"image_id {image_id} of refer_{suffix}.json is missing from image_data_split.json")
            path = root / "images" / f"{image_id}.jpg"
            if not path.exists():
                raise FileNotFoundError(f"missing image file {path} (image_id {image_id}, refer_{suffix}.json)")
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()  # full decode: catches truncated/corrupt files, not only bad headers
                    w, h = im.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                log.warning("phrasecut[%s]: skipping corrupt image %s (%s)", split, path, e)
                skipped["corrupt_image_tasks"] += len(image_tasks)
                continue
            if (w, h) != (int(info["width"]), int(info["height"])):
                log.warning("phrasecut[%s]: skipping %s: decoded size %dx%d != annotated %sx%s",
                            split, path, w, h, info["width"], info["height"])
                skipped["size_mismatch_tasks"] += len(image_tasks)
                continue
            for t in image_tasks:
                valid = []
                for polys in t["Polygons"]:
                    for poly in polys:
                        if len(poly) < 3 or any(len(p) != 2 for p in poly):
                            skipped["bad_polygons"] += 1
                            continue
                        valid.append(poly)
                if not valid:
                    skipped["tasks_without_valid_polygon"] += 1
                    continue
                mask = polygons_mask([valid], h, w)
                buf = io.BytesIO()
                Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
                ps = t.get("phrase_structure") or {}
                boxes = []
                for x, y, bw, bh in t["instance_boxes"]:
                    # xywh in pixels (inclusive, PhraseCut) -> normalised, clipped.
                    boxes.append(tfds.features.BBox(
                        ymin=float(np.clip(y / h, 0, 1)), xmin=float(np.clip(x / w, 0, 1)),
                        ymax=float(np.clip((y + bh) / h, 0, 1)), xmax=float(np.clip((x + bw) / w, 0, 1))))
                yield key, {
                    "image": data,
                    "mask": buf.getvalue(),
                    "phrase": t["phrase"],
                    "task_id": t["task_id"],
                    "image_id": image_id,
                    "instance_boxes": boxes,
                    "phrase_structure": {
                        "name": ps.get("name", ""),
                        "attributes": list(ps.get("attributes", [])),
                        "relation_ids": [int(r) for r in ps.get("relation_ids", [])],
                        "relation_descriptions": [{"predicate": str(p), "object": str(o)}
                                                  for p, o in ps.get("relation_descriptions", [])],
                        "type": ps.get("type", ""),
                    },
                }
                index["phrase"].append(t["phrase"])
                index["task_id"].append(t["task_id"])
                index["image_id"].append(image_id)
                key += 1
        if skipped:
            log.warning("phrasecut[%s]: skipped %s", split, dict(skipped))
        self.info.metadata[split] = index
        self.info.metadata.setdefault("skipped", {})[split] = dict(skipped)


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, file_format: str = "array_record") -> Phrasecut:
    """Prepare `phrasecut` from `manual_dir` into `data_dir` (array_record: random access)."""
    builder = Phrasecut(data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
        file_format=file_format,
    )
    return builder

