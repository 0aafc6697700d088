"""PC+ input pipeline throughput (samples/s, per core) from JPEG and from the pre-resized cache.

    python benchmarks/bench_input_pipeline.py --work /tmp/bench_pc --threads 1 --batches 20

Builds (once, in --work) a synthetic PhraseCut in the official layout with Visual-Genome-like
image sizes (500-800 px per side by default), prepares the `phrasecut` TFDS dataset
(array_record) and the pre-resized cache, then times full PC+ batches as the trainer receives
them (`PCPlus.iterator()`: query + support decode, crop search, resize, negatives,
crop_blur_highlight352 support, templates). `--threads N` pins tf.data to a private pool of N
threads with intra-op parallelism 1 (N batches built in parallel), so samples/s / N is the
per-core figure. Timing starts after `--warmup` batches and is taken over `--batches` batches,
`--repeats` times (median reported, all kept in the JSON). Also reported: samples per
CPU-second of the process (time.process_time over all threads; with `--workers N`, plus the
worker processes' CPU time from /proc), which is the per-core throughput even when other jobs
share the cores (wall-time figures then understate it). `--workers N` times
`PCPlus(workers=N)`: batches built in N processes instead of tf.data threads.

With the jpeg mode it also prints the decode floor: the samples per CPU-second that a
pipeline doing nothing but decode each sample's query and support (JPEG image + PNG mask, one
thread, the same tasks as the timed batches) could reach, and the same for the JPEGs alone —
the ceiling of any from-JPEG pipeline on this machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_pc", help="folder for the generated data (reused)")
    p.add_argument("--images", type=int, default=120, help="train images to generate")
    p.add_argument("--min-size", type=int, default=500)
    p.add_argument("--max-size", type=int, default=800)
    p.add_argument("--threads", type=int, nargs="*", default=[1], help="tf.data thread counts to time (none: skip)")
    p.add_argument("--workers", type=int, nargs="+", default=[],
                   help="also time PCPlus(workers=N): batches built in N worker processes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median reported)")
    p.add_argument("--modes", nargs="+", default=["jpeg", "cached"], choices=["jpeg", "cached"])
    p.add_argument("--support-render", nargs="+", default=["host"], choices=["host", "device"],
                   help="host: rendered supports in the batch; device: raw supports + masks (rendered in the step)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from data_pipelines import phrasecut, synthetic
    from data_pipelines.pcplus import PCPlus
    from data_pipelines.sources import CachedSource, TfdsSource, build_cache

    work = Path(a.work)
    manual = work / "VGPhraseCut_v0"
    if not manual.exists():
        synthetic.generate(manual, {"train": a.images, "val": 1, "test": 1, "miniv": 1}, a.min_size, a.max_size, seed=0)
    data_dir = work / "tfds"
    try:
        src = TfdsSource("train", data_dir)
    except FileNotFoundError:  # not prepared yet, or by another version of the builder
        phrasecut.build(manual, data_dir)
        src = TfdsSource("train", data_dir)
    sources = {"jpeg": src}
    if "cached" in a.modes:
        cache = work / "cache352"
        try:
            sources["cached"] = CachedSource(cache)
        except (FileNotFoundError, ValueError):  # not built yet, or by another cache format
            shutil.rmtree(cache, ignore_errors=True)
            sources["cached"] = CachedSource(build_cache(src, cache))

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
               "tensorflow": tf.__version__, "tasks": len(src), "image_sizes": [a.min_size, a.max_size],
               "batch_size": a.batch_size, "runs": []}
    configs = [(m, r, t, 0) for m in a.modes for r in a.support_render for t in a.threads]
    configs += [(m, r, 0, w) for m in a.modes for r in a.support_render for w in a.workers]
    for mode, render, threads, workers in configs:
        pipe = PCPlus(sources[mode], batch_size=a.batch_size, seed=0, process_index=0, process_count=1,
                      threads=threads or None, num_parallel_calls=threads or None, prefetch=2,
                      support_render=render, workers=workers)
        it = pipe.iterator()  # numpy batches, as the trainer consumes them
        for _ in range(a.warmup):
            next(it)
        # the worker processes (children of this process; started by the first batches)
        pids = [p.pid for p in multiprocessing.active_children()] if workers else []
        reps = []
        for _ in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time() + _cpu_seconds(pids)
            for _ in range(a.batches):
                next(it)
            dt, dc = time.perf_counter() - t0, time.process_time() + _cpu_seconds(pids) - c0
            reps.append((dt, dc))
        it.close()
        threads = threads or workers  # cores the configuration may use
        n = a.batches * a.batch_size
        sps = sorted(n / dt for dt, _ in reps)
        spc = sorted(n / dc for _, dc in reps)
        med = len(reps) // 2
        # samples per CPU-second of this process (all threads): the per-core figure that the
        # other users of a shared machine do not distort as much as wall time.
        run = {"mode": mode, "support_render": render, "threads": 0 if workers else threads, "workers": workers,
               "samples_per_s": round(sps[med], 1),
               "samples_per_s_per_core_wall": round(sps[med] / threads, 1),
               "samples_per_cpu_s": round(spc[med], 1),
               "samples_per_cpu_s_all": [round(x, 1) for x in spc],
               "cpu_utilisation": round(sum(dc for _, dc in reps) / sum(dt for dt, _ in reps) / threads, 2),
               "seconds": round(sum(dt for dt, _ in reps), 2)}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if "jpeg" in a.modes:
        floor = decode_floor(PCPlus(src, batch_size=a.batch_size, seed=0, process_index=0, process_count=1),
                             src, a.warmup, a.batches, a.repeats)
        results["runs"].append(floor)
        print(json.dumps(floor), flush=True)
    try:
        results["loadavg_after"] = os.getloadavg()
    except OSError:
        pass
    if a.out:  # temp file + rename: never a half-written JSON
        out = Path(a.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)
    return results


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of other (worker) processes so far, from /proc (Linux)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def decode_floor(pipe, src, warmup: int, batches: int, repeats: int) -> dict:
    """Samples per CPU-second if decoding the query's and the support's image and mask were all the work."""
    import cv2

    from data_pipelines.imageops import decode_image, decode_mask

    cv2.setNumThreads(1)
    tasks, n = [], 0
    for step in range(warmup, warmup + batches):
        p = pipe.plan(step)
        tasks += [int(t) for t in p["task"]]
        tasks += [int(t) for t, has in zip(p["support_task"], p["has_support"]) if has]
        n += len(p["task"])
    encoded = [src.encoded(t) for t in tasks]
    both, jpeg = [], []
    for _ in range(max(repeats, 1)):
        c0 = time.process_time()
        for img, _ in encoded:
            decode_image(img)
        c1 = time.process_time()
        for _, msk in encoded:
            decode_mask(msk)
        c2 = time.process_time()
        jpeg.append(n / (c1 - c0))
        both.append(n / (c2 - c0))
    both, jpeg = sorted(both), sorted(jpeg)
    return {"mode": "jpeg decode floor", "decodes_per_sample": round(len(tasks) / n, 3),
            "samples_per_cpu_s_jpeg_and_png_only": round(both[len(both) // 2], 1),
            "samples_per_cpu_s_jpeg_only": round(jpeg[len(jpeg) // 2], 1),
            "mean_jpeg_kb": round(sum(len(i) for i, _ in encoded) / len(encoded) / 1e3, 1)}


if __name__ == "__main__":
    main()
