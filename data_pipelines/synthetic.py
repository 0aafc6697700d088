"""Synthetic PhraseCut in the official `VGPhraseCut_v0` layout.

Coloured shapes on textured backgrounds, phrases such as "red circle" or "small blue square",
several instances per task and several polygons per instance. Used by the tests, the offline
demo and the training learning test: it exercises exactly the code path of the real dataset.

    python -m data_pipelines.synthetic --out /tmp/pc --images-per-split 40
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "val", "test", "miniv")


def _textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour blobs plus noise, so blur and crops have something to act on."""
    gh, gw = max(2, h // 16), max(2, w // 16)
    base = rng.integers(60, 200, size=(gh, gw, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.float32)
    img += rng.normal(0.0, 12.0, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygons(shape: str, cx: float, cy: float, r: float, split: bool) -> list[list[list[float]]]:
    """Polygons (list of [x, y] points, PhraseCut order) of one instance.

    A `split` instance is drawn as two polygons (two halves), like occluded VG objects.
    """
    if shape == "circle":
        pts = [[cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24)] for k in range(24)]
        if split:
            left = [p for p in pts if p[0] <= cx] + [[cx, cy - r], [cx, cy + r]]
            right = [p for p in pts if p[0] >= cx] + [[cx, cy + r], [cx, cy - r]]
            # Order each half by angle around its own centroid so it is a simple polygon.
            def order(poly):
                mx = sum(p[0] for p in poly) / len(poly)
                my = sum(p[1] for p in poly) / len(poly)
                return sorted(poly, key=lambda p: math.atan2(p[1] - my, p[0] - mx))
            return [order(left), order(right)]
        return [pts]
    if shape == "square":
        x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
        if split:
            return [[[x0, y0], [cx, y0], [cx, y1], [x0, y1]], [[cx, y0], [x1, y0], [x1, y1], [cx, y1]]]
        return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]]
    # triangle
    tri = [[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]]
    if split:
        return [[[cx, cy - r], [cx, cy + r], [cx - r, cy + r]], [[cx, cy - r], [cx + r, cy + r], [cx, cy + r]]]
    return [tri]


def _phrase(color: str, shape: str, size_word: str | None) -> tuple[str, dict]:
    attrs = ([size_word] if size_word else []) + [color]
    return " ".join(attrs + [shape]), {
        "name": shape,
        "attributes": attrs,
        "relation_ids": [],
        "relation_descriptions": [],
        "type": "attribute",
    }


def _make_image(rng: np.random.Generator, image_id: int, h: int, w: int, grayscale: bool, overlap: bool = True):
    """One image plus its tasks (PhraseCut refer dicts). With `overlap=False` no two shapes touch (an object
    that finds no free place in 30 draws is left out), so every mask is exactly its object's visible pixels."""
    img = _textured_background(rng, h, w)
    n_obj = int(rng.integers(2, 6))
    objects = []
    for k in range(n_obj):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        big = bool(rng.random() < 0.5)
        r = float(rng.uniform(0.16, 0.26) if big else rng.uniform(0.07, 0.12)) * min(h, w)
        cx = float(rng.uniform(r, w - r))
        cy = float(rng.uniform(r, h - r))
        if not overlap:
            # Circumscribed circles apart (a square's corner reaches r * sqrt(2)).
            def free(x, y):
                return all(math.hypot(x - o["cx"], y - o["cy"]) > 1.42 * (r + o["r"]) + 2 for o in objects)
            for _ in range(30):
                if free(cx, cy):
                    break
                cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            else:
                continue
        polys = _shape_polygons(shape, cx, cy, r, split=bool(rng.random() < 0.25))
        objects.append({"ann_id": image_id * 100 + k, "shape": shape, "color": color, "big": big, "r": r,
                        "cx": cx, "cy": cy, "polys": polys})
    # Later objects are drawn on top; the masks of earlier ones are not corrected for occlusion,
    # exactly like PhraseCut (polygons of VG objects overlap) -- unless overlap=False placed them apart.
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for o in objects:
        for poly in o["polys"]:
            draw.polygon([tuple(p) for p in poly], fill=COLORS[o["color"]])
    if grayscale:
        pil = pil.convert("L")

    # Tasks: group instances by (color, shape); some tasks name the size too.
    tasks = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for o in objects:
        groups.setdefault((o["color"], o["shape"]), []).append(o)
    for (color, shape), members in groups.items():
        sizes = {m["big"] for m in members}
        size_word = None
        if len(sizes) == 1 and rng.random() < 0.5:
            size_word = "large" if members[0]["big"] else "small"
        phrase, structure = _phrase(color, shape, size_word)
        boxes, polygons = [], []
        for m in members:
            xs = [p[0] for poly in m["polys"] for p in poly]
            ys = [p[1] for poly in m["polys"] for p in poly]
            boxes.append([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
            polygons.append(m["polys"])
        ann_ids = [m["ann_id"] for m in members]
        tasks.append({
            "task_id": f"{image_id}__{'_'.join(map(str, ann_ids))}",
            "image_id": image_id,
            "ann_ids": ann_ids,
            "instance_boxes": boxes,
            "Polygons": polygons,
            "phrase": phrase,
            "phrase_structure": structure,
        })
    # One relation phrase per image: almost always unique, so its visual prompt is invalid.
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        side = "left of" if a["cx"] < b["cx"] else "right of"
        phrase = f"{a['color']} {a['shape']} {side} {b['color']} {b['shape']}"
        xs = [p[0] for poly in a["polys"] for p in poly]
        ys = [p[1] for poly in a["polys"] for p in poly]
        tasks.append({
            "task_id": f"{image_id}__{a['ann_id']}_r",
            "image_id": image_id,
            "ann_ids": [a["ann_id"]],
            "instance_boxes": [[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]],
            "Polygons": [a["polys"]],
            "phrase": phrase,
            "phrase_structure": {"name": a["shape"], "attributes": [a["color"]], "relation_ids": [image_id],
                                 "relation_descriptions": [[side, f"{b['color']} {b['shape']}"]],
                                 "type": "relation"},
        })
    return pil, tasks


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def generate(
    out_dir: str | os.PathLike,
    images_per_split: int | dict[str, int] = 12,
    min_size: int = 64,
    max_size: int = 128,
    seed: int = 0,
    grayscale_every: int = 7,
    first_image_id: int = 1,
    jpeg_quality: int = 90,
    overwrite: bool = False,
    overlap: bool = True,
) -> Path:
    """Write a synthetic `VGPhraseCut_v0` directory and return its path.

    Args:
      out_dir: target directory (the manual dir's `VGPhraseCut_v0` contents go directly here).
      images_per_split: images per split, or a dict split -> count (splits: train/val/test/miniv).
      min_size, max_size: image height and width are drawn independently from this range.
      seed: everything is a function of the seed.
      grayscale_every: every n-th image is saved as a grayscale JPEG (0 disables).
      first_image_id: first image id; ids are consecutive and disjoint between splits.
      overwrite: replace an existing non-empty `out_dir`.
      overlap: shapes may overlap with uncorrected masks (PhraseCut-like); False places them apart (exact masks).

    The directory is written to a temporary sibling and renamed, so it is never half-written.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite on the "
                                  f"command line) to replace it")
    counts = images_per_split if isinstance(images_per_split, dict) else {s: images_per_split for s in SPLITS}
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        image_info, image_id = [], first_image_id
        names: dict[str, int] = {}
        atts: dict[str, int] = {}
        for split in SPLITS:
            refer = []
            for _ in range(counts.get(split, 0)):
                h = int(rng.integers(min_size, max_size + 1))
                w = int(rng.integers(min_size, max_size + 1))
                gray = grayscale_every > 0 and image_id % grayscale_every == 0
                pil, tasks = _make_image(rng, image_id, h, w, gray, overlap)
                pil.save(tmp / "images" / f"{image_id}.jpg", quality=jpeg_quality)
                image_info.append({"image_id": image_id, "width": w, "height": h, "split": split, "url": "",
                                   "coco_id": None, "flickr_id": None})
                for t in tasks:
                    names[t["phrase_structure"]["name"]] = names.get(t["phrase_structure"]["name"], 0) + 1
                    for a in t["phrase_structure"]["attributes"]:
                        atts[a] = atts.get(a, 0) + 1
                refer.extend(tasks)
                image_id += 1
            _write_json(tmp / f"refer_{split}.json", refer)
        _write_json(tmp / "image_data_split.json", image_info)
        _write_json(tmp / "name_att_rel_count.json", {
            "cat": sorted(names.items(), key=lambda kv: -kv[1]),
            "att": sorted(atts.items(), key=lambda kv: -kv[1]),
            "rel": [["left of", 1], ["right of", 1]],
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare(data_dir: str | os.PathLike, train_images: int = 1500, val_images: int = 150, min_size: int = 96,
            max_size: int = 160, seed: int = 0, overlap: bool = False, grayscale_every: int = 0) -> Path:
    """The synthetic dataset as a prepared `phrasecut` TFDS dataset under `data_dir` (returns the TFDS data_dir).

    On first use writes `data_dir/VGPhraseCut_v0` (`generate`) and builds the TFDS dataset into `data_dir/tfds`;
    later calls with the same arguments reuse it (`data_dir/synthetic.json` records them; other arguments are an
    error naming that file). Safe for several processes at once (a file lock serialises them). By default the
    shapes do not overlap and every image is in colour, so the labels hold no unlearnable pixels (hidden parts
    of masks, colour words on grayscale images); `overlap=True, grayscale_every=7` gives the PhraseCut-like set.
    """
    import fcntl

    root = Path(data_dir).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    params = {"train_images": int(train_images), "val_images": int(val_images), "min_size": int(min_size),
              "max_size": int(max_size), "seed": int(seed), "overlap": bool(overlap),
              "grayscale_every": int(grayscale_every), "version": 1}
    marker = root / "synthetic.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            found = json.loads(marker.read_text())
            if found != params:
                raise ValueError(f"{marker}: this directory holds the synthetic dataset {found}, not {params}; "
                                 f"choose another data_dir or remove it")
            return root / "tfds"
        import shutil as _shutil

        from data_pipelines import phrasecut

        for d in (root / "VGPhraseCut_v0", root / "tfds"):  # left over by an interrupted first use
            _shutil.rmtree(d, ignore_errors=True)
        # A few test/miniv images: the TFDS builder wants every split non-empty.
        counts = {"train": params["train_images"], "val": params["val_images"], "test": 4, "miniv": 4}
        generate(root / "VGPhraseCut_v0", counts, min_size, max_size, seed, grayscale_every=grayscale_every,
                 overlap=overlap)
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        phrasecut.build(root / "VGPhraseCut_v0", root / "tfds")
        tmp = marker.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(params, indent=1) + "\n")
        os.replace(tmp, marker)
    return root / "tfds"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output VGPhraseCut_v0 directory")
    p.add_argument("--images-per-split", type=int, default=12)
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.images_per_split < 0 or not 32 <= a.min_size <= a.max_size:
        print(f"error: expected --images-per-split >= 0 and 32 <= --min-size <= --max-size; got "
              f"{a.images_per_split}, {a.min_size}, {a.max_size}", file=sys.stderr)
        return 2
    try:
        path = generate(a.out, a.images_per_split, a.min_size, a.max_size, a.seed, overwrite=a.overwrite)
    except FileExistsError:
        print(f"error: --out {a.out} exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {a.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    n = sum(len(json.loads((path / f"refer_{s}.json").read_text())) for s in SPLITS)
    print(f"wrote {path} ({n} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
