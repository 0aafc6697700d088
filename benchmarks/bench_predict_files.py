"""Streaming `main.py predict` on folders of photo-sized images: peak memory vs number of images, throughput vs the
Predictor API, the persistent compile cache, kill -9 and resume.

    python benchmarks/bench_predict_files.py memory     [--counts 50 200]  # peak RSS of the CLI at 50 and 200 images
    python benchmarks/bench_predict_files.py throughput [--counts 4 64]    # stream vs Predictor.predict + the same writes
    python benchmarks/bench_predict_files.py cache                         # 1st vs 2nd CLI call wall time
    python benchmarks/bench_predict_files.py kill       [--counts 200]     # kill -9 half-way, rerun, check

Images: 4 MP JPEGs (2304x1728), every 10th 12 MP (4032x3024), photo-like content (smooth fields plus sensor-like
noise). Model: a random CLIPSeg, small (`--model tiny`: the tests' tiny architecture, run at 352) or the full rd64
architecture (`--model rd64`), written with transformers' save_pretrained. 2 prompts.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["a cat", "a red car"]


def make_images(d: Path, n: int) -> Path:
    """n photo-sized JPEGs (reused when the folder already holds them)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        f = d / f"IMG_{i:04d}.jpg"
        if f.exists():
            continue
        h, w = (3024, 4032) if i % 10 == 9 else (1728, 2304)
        yy, xx = np.mgrid[0:h:8, 0:w:8]
        base = np.stack([np.sin(xx / (97 + i)) + np.cos(yy / 53), np.cos(xx / 71) * np.sin(yy / (89 + i)),
                         np.sin((xx + yy) / 131)], -1)
        small = ((base - base.min()) / (np.ptp(base) + 1e-9) * 200 + 20).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int16)
        img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(f, quality=90)
    return d


def make_model(d: Path, kind: str) -> Path:
    if (d / "config.json").exists():
        return d
    from tiny_models import hf_config, make_model as make, reference_config, save_checkpoint

    cfg = hf_config() if kind == "tiny" else reference_config("rd64-refined")
    return save_checkpoint(make(cfg), d)


def cli(args: list[str], env: dict | None = None) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run main.py in a child that reports its own peak RSS (ru_maxrss of its only child, in KiB)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
             "sys.stderr.write(r.stdout + r.stderr)")
    p = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "main.py"), *args], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    wall, rss, rc = p.stdout.split()
    return float(wall), int(rss), subprocess.CompletedProcess(args, int(rc), "", p.stderr)


def header(ns) -> None:
    import jax

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
          f"({jax.default_backend()}), model {ns.model}, prompts {PROMPTS}")


def bench_memory(ns, work: Path, model: Path) -> None:
    for n in ns.counts:
        imgs = make_images(work / f"in{n}", n)
        out = work / f"out{n}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, r = cli(["predict", "--checkpoint", str(model), "--image", str(imgs), "--prompt", *PROMPTS,
                            "--out", str(out), "--batch-size", str(ns.batch_size)])
        assert r.returncode == 0, r.stderr[-2000:]
        files = len(list(out.glob("*.png")))
        print(f"memory: {n:4d} images -> {files} files in {wall:6.1f} s ({n / wall:.2f} images/s), "
              f"peak RSS {rss / 1024:.0f} MiB")


def bench_throughput(ns, work: Path, model: Path) -> None:
    """Both sides in this process, after a warm-up, on the same images and writing the same files."""
    from clipseg_jax import predict_files as pf
    from clipseg_jax.predict import Predictor

    pred = Predictor.from_pretrained(model)
    for n in ns.counts:
        imgs = sorted(make_images(work / f"in{n}", n).glob("*.jpg"))[:n]
        cond = pred.encode_text(PROMPTS)
        names = [pf.slug(p) for p in PROMPTS]

        def api(out: Path):  # what `predict` did before streaming: predict everything, then write every file
            probs = pred.predict(imgs, PROMPTS)
            jobs = pf.plan(imgs, names, out)
            for job, path, p in zip(jobs, imgs, probs):
                from clipseg_jax.predict import load_image

                pf.write_outputs(job, load_image(path), p, 0.5, False, None)

        def stream(out: Path):
            pf.run_stream(pred, pf.plan(imgs, names, out), cond, 0.5, batch_size=ns.batch_size, progress=False)

        api(work / "warm_a")
        stream(work / "warm_s")
        times = {"api": [], "stream": []}
        for rep in range(ns.repeats):
            for name, fn in (("api", api), ("stream", stream)):
                out = work / f"t_{name}_{rep}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                fn(out)
                times[name].append(time.perf_counter() - t)
                shutil.rmtree(out, ignore_errors=True)
        a, s = min(times["api"]), min(times["stream"])
        print(f"throughput: {n:3d} images: Predictor API + writes {n / a:.2f} images/s, streaming {n / s:.2f} "
              f"images/s, ratio stream/API {a / s:.2f} (best of {ns.repeats})")


def bench_cache(ns, work: Path, model: Path) -> None:
    img = sorted(make_images(work / "in4", 4).glob("*.jpg"))[0]
    cache = work / "xla-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for label, env in (("cache off", {"CLIPSEG_JAX_COMPILATION_CACHE": "0"}),
                       ("1st call, empty cache", {"CLIPSEG_JAX_COMPILATION_CACHE": str(cache)}),
                       ("2nd call, warm cache", {"CLIPSEG_JAX_COMPILATION_CACHE": str(cache)})):
        out = work / "cache_out"
        shutil.rmtree(out, ignore_errors=True)
        wall, _, r = cli(["predict", "--checkpoint", str(model), "--image", str(img), "--prompt", *PROMPTS,
                          "--out", str(out)], env)
        assert r.returncode == 0, r.stderr[-2000:]
        rows.append((label, wall))
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    for label, wall in rows:
        print(f"cache: {label:24s} {wall:6.2f} s wall (process start to exit, 1 image of "
              f"{Image.open(img).size[0]}x{Image.open(img).size[1]})")
    print(f"cache: {len(list(cache.rglob('*')))} entries, {size / 2**20:.1f} MiB in {cache}")


def bench_kill(ns, work: Path, model: Path) -> None:
    n = ns.counts[-1]
    imgs = make_images(work / f"in{n}", n)
    out = work / "kill_out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "main.py"), "predict", "--checkpoint", str(model), "--image", str(imgs),
           "--prompt", *PROMPTS, "--out", str(out), "--batch-size", str(ns.batch_size)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(out.glob("*_overlay.png"))) < n:  # half of the 2n overlays
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    done = {f.name.split("__")[0] for f in out.glob("*.png")}
    complete = [s for s in done if all((out / f"{s}__{p}_{k}.png").exists() for p in ("a-cat", "a-red-car")
                                           for k in ("mask", "overlay"))]
    bad = 0
    for f in out.glob("*.png"):
        try:
            with Image.open(f) as im:
                im.load()
        except OSError:
            bad += 1
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"kill: kill -9 after {len(complete)} of {n} images complete; {bad} undecodable output files; "
          f"rerun: '{r.stdout.strip()}' in {wall:.1f} s; now {len(list(out.glob('*.png')))} files "
          f"(expected {4 * n}), hidden leftovers {len(list(out.glob('.*')))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("memory", "throughput", "cache", "kill"))
    p.add_argument("--counts", type=int, nargs="+")
    p.add_argument("--model", choices=("tiny", "rd64"), default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "clipseg-bench-predict"))
    ns = p.parse_args()
    ns.counts = ns.counts or {"memory": [50, 200], "throughput": [4, 64], "kill": [200], "cache": [1]}[ns.what]
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / f"model-{ns.model}", ns.model)
    header(ns)
    {"memory": bench_memory, "throughput": bench_throughput, "cache": bench_cache, "kill": bench_kill}[ns.what](
        ns, work, model)


if __name__ == "__main__":
    main()
