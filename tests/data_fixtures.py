"""Shared fixtures for the data tests: tiny synthetic PhraseCut sets built in tmp dirs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import phrasecut, synthetic


def reference_mask(instances, height: int, width: int) -> np.ndarray:
    """Independent rasteriser: even-odd ray casting at every pixel centre (slow, small images)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((height, width), bool)
    for polys in instances:
        for poly in polys:
            if len(poly) < 3:
                continue
            p = np.asarray(poly, np.float64)
            inside = np.zeros((height, width), bool)
            for k in range(len(p)):
                (x0, y0), (x1, y1) = p[k], p[(k + 1) % len(p)]
                if y0 == y1:
                    continue
                cond = (y0 > yy) != (y1 > yy)
                xi = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
                inside ^= cond & (xx < xi)
            out |= inside
    return out.astype(np.uint8)


@pytest.fixture(scope="session")
def manual_dir(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("pc") / "VGPhraseCut_v0",
                              {"train": 10, "val": 3, "test": 3, "miniv": 2}, min_size=56, max_size=120, seed=3)


@pytest.fixture(scope="session")
def data_dir(manual_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tfds")
    phrasecut.build(manual_dir, d)
    return d


def refer(manual_dir: Path, split: str = "train") -> list[dict]:
    with open(manual_dir / f"refer_{split}.json") as f:
        return json.load(f)
