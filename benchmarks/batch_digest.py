"""Digest of PC+ batches for a fixed seed: run it in two checkouts and diff the outputs (bit-identical check).

    python benchmarks/batch_digest.py --work /tmp/digest --steps 6 > new.txt
    (cd OLD_CHECKOUT && PYTHONPATH=. python /path/to/benchmarks/batch_digest.py --work /tmp/digest --steps 6) > old.txt
    diff old.txt new.txt

Sources: the synthetic dataset (JPEG/PNG through TFDS, sides 96-400 px so that the rescaled masks cross sizes
where nearest rules differ) and its pre-resized cache; host and device support rendering; in-process
(`workers=0`) and worker processes (`workers=2`). One line per (configuration, step, key): sha1 of the array's
bytes. With `--masks-out DIR`, the masks are also saved (`.npy`), to locate the pixels that differ.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/clipseg_digest")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--masks-out")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from data_pipelines import synthetic
    from data_pipelines.pcplus import PCPlus
    from data_pipelines.sources import CachedSource, TfdsSource, build_cache

    work = Path(a.work)
    data_dir = synthetic.prepare(work / "synthetic", train_images=48, val_images=8, min_size=96, max_size=400, seed=3)
    cache = work / "cache"
    if not cache.exists():
        build_cache(TfdsSource("train", data_dir), cache, size=352)
    sources = {"tfds": TfdsSource("train", data_dir), "cached": CachedSource(cache)}
    for name, source in sources.items():
        for render in ("host", "device"):
            for workers in a.workers:
                pipe = PCPlus(source, batch_size=a.batch_size, seed=7, support_render=render, workers=workers,
                              process_index=0, process_count=1)
                it = pipe.iterator()
                for step in range(a.steps):
                    batch = next(it)
                    for key in sorted(batch):
                        v = np.asarray(batch[key])
                        data = b"\0".join(v.tolist()) if v.dtype == object else np.ascontiguousarray(v).tobytes()
                        print(f"{name} {render} workers={workers} step={step} {key} "
                              f"{hashlib.sha1(data).hexdigest()[:16]}")
                    if a.masks_out and workers == a.workers[0]:
                        out = Path(a.masks_out)
                        out.mkdir(parents=True, exist_ok=True)
                        np.save(out / f"{name}_{render}_{step}_mask.npy", batch["mask"])
                        np.save(out / f"{name}_{render}_{step}_task.npy", batch["task_index"])
                it.close()


if __name__ == "__main__":
    main()
