"""Segment files and folders of images in a stream: what `main.py predict` runs.

Images are decoded ahead in threads, predicted in batches of `batch_size` (one image encoding for all prompts) and
written as they finish, so memory is bounded by the batch, not by the number of images. Every output file is
written to a temporary name and renamed, so an interrupted run leaves only complete files; rerunning the same
command skips the images whose outputs all exist.

Output layout under `out` (the image's path relative to the inputs' common folder is kept):

    out/prompts.json                               {prompt name: the exact prompt}
    out/<sub/folders>/<image stem>__<prompt name>_mask.png      0/255 at the threshold
                                            ..._overlay.png     the image with the mask tinted (unless no_overlay)
                                            ..._probs.png       16-bit probabilities (save_probs="png"), or _probs.npy
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipseg_jax._io import PARTIAL_SUFFIX, write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PROMPTS_FILE = "prompts.json"


# -- inputs ----------------------------------------------------------------------------------------------------


def expand_images(specs: Sequence[str], exclude: str | os.PathLike | None = None) -> list[Path]:
    """Files, folders (recursively: files with an image extension, hidden ones skipped) and glob patterns -> the
    image paths in order, each once. `exclude`: a folder whose files are never inputs (the output folder, which may
    lie inside an input folder)."""
    excluded = os.path.abspath(exclude) if exclude is not None else None

    def keep(p: Path) -> bool:
        a = os.path.abspath(p)
        return excluded is None or not (a == excluded or a.startswith(excluded + os.sep))

    out: dict[str, Path] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and keep(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"--image {spec}: a folder without images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(spec):
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file() and keep(Path(f)))
            if not found:
                raise FileNotFoundError(f"--image {spec}: the pattern matches no file")
        else:
            raise FileNotFoundError(f"{spec}: no such image file")
        for f in found:
            out.setdefault(os.path.abspath(f), f)
    if not out:
        raise ValueError("--image: give at least one image")
    return list(out.values())


def check_image_file(path: Path) -> None:
    """Fail now, before the model loads, on a file PIL cannot identify (reads the header only)."""
    try:
        with Image.open(path):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (PIL cannot identify it)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def output_stems(images: Sequence[Path]) -> list[Path]:
    """Each image's output stem relative to `out`: its path relative to the inputs' common folder, without the
    extension; an image with a namesake of another extension beside it on disk (cat.jpg, cat.png) keeps its full
    name — decided from the folder, not from the other inputs, so a rerun on a subset names its outputs alike."""
    absolute = [Path(os.path.abspath(p)) for p in images]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    listings: dict[Path, dict[str, int]] = {}

    def stem_count(folder: Path, stem: str) -> int:
        if folder not in listings:
            counts: dict[str, int] = {}
            for f in folder.iterdir():
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    counts[f.stem] = counts.get(f.stem, 0) + 1
            listings[folder] = counts
        return listings[folder].get(stem, 1)

    out = []
    for p in absolute:
        r = p.relative_to(root)
        out.append(r.parent / (r.stem if stem_count(p.parent, p.stem) <= 1 else r.name))
    return out


def slug(text: str, limit: int = 60) -> str:
    """A readable file-name part: lower case, runs of anything but a-z0-9 as one '-' (may be empty)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-")


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:8]


def prompt_names(values: Sequence[object], bases: Sequence[str], existing: dict[str, object]) -> list[str]:
    """One file-name part per prompt, unique and stable: the readable `base` alone where no other prompt of this
    run or of `existing` (an earlier run's prompts.json in the same folder) has it; else `base-<hash of the
    prompt>`. A prompt already named in `existing` keeps that name."""
    by_value = {json.dumps(v, sort_keys=True): k for k, v in existing.items()}
    taken = {}
    for b in bases:
        taken[b] = taken.get(b, 0) + 1
    names = []
    for value, base in zip(values, bases):
        key = json.dumps(value, sort_keys=True)
        if key in by_value:
            names.append(by_value[key])
            continue
        clash = taken[base] > 1 or base in existing or base.endswith("-") or base in ("", "prompt", "visual")
        names.append(f"{base.rstrip('-') or 'prompt'}-{_digest(value)}" if clash else base)
    if len(set(names)) != len(names):  # only a hash collision between distinct prompts could get here
        raise ValueError("prompt names collide after hashing; rename one of the prompts")
    return names


def validate_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"--threshold {threshold}: expected a probability in [0, 1]")
    return float(threshold)


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create `out` (with parents) and check it takes files; one clear error otherwise."""
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out {d}: is a file, expected a folder for the outputs")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test{PARTIAL_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {d}: cannot write there ({e.strerror or e})") from None
    return d


# -- outputs ---------------------------------------------------------------------------------------------------


def _save_png(img: Image.Image, compress_level: int = 6) -> Callable[[Path], None]:
    return lambda tmp: img.save(tmp, format="PNG", compress_level=compress_level)


# Overlays and probabilities are photo-like: zlib level 1 encodes a 4 MP overlay in 0.32 s instead of 1.75 s at
# PIL's default 6, for a file 14 % larger (5.5 -> 6.2 MB). Binary masks stay at 6 (small either way).
FAST_PNG = 1


def _save_npy(arr: np.ndarray) -> Callable[[Path], None]:
    def w(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return w


def overlay(image: np.ndarray, prob: np.ndarray, threshold: float, color=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """The image with the thresholded mask tinted in `color` and the probability as tint strength
    (`alpha * p` over the pixels where p > threshold; the others are the image's own)."""
    out = image.copy()
    on = prob > threshold
    # only the masked pixels are blended: a 12 MP photo's float copy would cost 144 MB per prompt
    a = (alpha * np.clip(prob[on], 0, 1)).astype(np.float32)[:, None]
    out[on] = (image[on].astype(np.float32) * (1 - a) + np.asarray(color, np.float32) * a).round().astype(np.uint8)
    return out


@dataclass
class Job:
    image: Path
    stem: Path               # relative to out
    outputs: list[Path] = field(default_factory=list)


def plan(images: Sequence[Path], names: Sequence[str], out: Path, no_overlay: bool = False,
         save_probs: str | None = None) -> list[Job]:
    jobs = []
    for image, stem in zip(images, output_stems(images)):
        job = Job(image, stem)
        for n in names:
            base = out / stem.parent / f"{stem.name}__{n}"
            job.outputs.append(base.with_name(base.name + "_mask.png"))
            if not no_overlay:
                job.outputs.append(base.with_name(base.name + "_overlay.png"))
            if save_probs:
                job.outputs.append(base.with_name(base.name + ("_probs.npy" if save_probs == "npy" else "_probs.png")))
        jobs.append(job)
    return jobs


def write_outputs(job: Job, image: np.ndarray, probs: np.ndarray, threshold: float, no_overlay: bool,
                  save_probs: str | None) -> int:
    """All files of one image (returns how many); `probs` (K, H, W) in the order of the prompt names."""
    job.outputs[0].parent.mkdir(parents=True, exist_ok=True)
    outputs = iter(job.outputs)
    for p in probs:
        write_atomic(next(outputs), _save_png(Image.fromarray(((p > threshold) * 255).astype(np.uint8), "L")))
        if not no_overlay:
            write_atomic(next(outputs), _save_png(Image.fromarray(overlay(image, p, threshold)), FAST_PNG))
        if save_probs == "npy":
            write_atomic(next(outputs), _save_npy(p.astype(np.float32)))
        elif save_probs:
            q = np.round(np.clip(p, 0.0, 1.0) * 65535.0).astype(np.uint16)
            write_atomic(next(outputs), _save_png(Image.fromarray(q), FAST_PNG))
    return len(job.outputs)


def remove_partials(out: Path) -> int:
    """Temporary files a killed run (`kill -9`) left behind."""
    n = 0
    for f in out.rglob(f"*{PARTIAL_SUFFIX}"):
        if f.name.startswith("."):
            f.unlink(missing_ok=True)
            n += 1
    return n


def read_prompts_file(out: Path) -> dict[str, object]:
    f = out / PROMPTS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: not a JSON object of prompt names ({e}); remove it or choose another --out") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object {{name: prompt}}, got {type(data).__name__}")
    return data


def write_prompts_file(out: Path, mapping: dict[str, object]) -> None:
    text = json.dumps(mapping, ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    write_atomic(out / PROMPTS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- the stream ------------------------------------------------------------------------------------------------


class stop_on_signals:
    """SIGINT / SIGTERM set `received` (the signal number) for the stream to stop at its next batch; a second one
    gets the previous handler (Ctrl-C twice interrupts at once). Previous handlers are restored on exit.

    The handler records and never raises: an exception raised from a signal handler can land between a lock's
    acquisition and the `with` block that releases it (tqdm's lock, a Future's condition), and the writer threads
    then wait for that lock forever (`main.py predict` hung after a SIGTERM once in the suite)."""

    def __enter__(self):
        self.received: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._record)
        return self

    def _record(self, signum, frame):
        self.received = signum
        for s, h in self._old.items():
            signal.signal(s, h)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    files: int = 0
    interrupted: int | None = None   # the signal number that stopped the run


def run_stream(predictor, jobs: Sequence[Job], cond: np.ndarray, threshold: float, batch_size: int = 8,
               no_overlay: bool = False, save_probs: str | None = None, progress: bool = True,
               threads: int | None = None) -> Summary:
    """Decode (ahead, in threads), predict in batches, write as batches finish. An image that fails to decode is
    reported in `Summary.failed` and the others go on. SIGINT / SIGTERM stop the run before its next batch
    (`Summary.interrupted`): the files being written are finished, queued ones dropped, nothing partial is left."""
    from tqdm import tqdm

    from clipseg_jax.images import load_image
    from clipseg_jax.resize import pil_bilinear

    threads = threads or min(8, os.cpu_count() or 1)
    summary = Summary()
    size = predictor.image_size

    def decode(job: Job):
        try:
            a = load_image(job.image)
        except (ValueError, OSError) as e:
            return job, None, str(e)
        return job, (a, pil_bilinear(a, (size, size))), None

    batches = [list(jobs[i:i + batch_size]) for i in range(0, len(jobs), batch_size)]
    bar = tqdm(total=len(jobs), unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    lock = threading.Lock()

    def finished(f: Future) -> None:
        if not f.cancelled() and f.exception() is None:
            with lock:
                summary.done += 1
                summary.files += f.result()
        bar.update(1)

    with stop_on_signals() as signals:
        decoder = ThreadPoolExecutor(threads, thread_name_prefix="clipseg-decode")
        writer = ThreadPoolExecutor(threads, thread_name_prefix="clipseg-write")
        writing: list[list[Future]] = []
        try:
            ahead = [decoder.submit(decode, j) for j in batches[0]] if batches else []
            for b in range(len(batches)):
                if signals.received is not None:
                    summary.interrupted = signals.received
                    break
                decoded = [f.result() for f in ahead]
                # the next batch decodes while this one runs on the device
                ahead = [decoder.submit(decode, j) for j in batches[b + 1]] if b + 1 < len(batches) else []
                ok = [(job, arrays) for job, arrays, err in decoded if err is None]
                summary.failed += [err for _, _, err in decoded if err is not None]
                bar.update(len(decoded) - len(ok))
                if ok:
                    pixels = np.stack([small for _, (_, small) in ok])
                    probs = predictor.predict_resized(pixels, [full.shape[:2] for _, (full, _) in ok], cond)
                    futures = []
                    for (job, (full, _)), p in zip(ok, probs):
                        fut = writer.submit(write_outputs, job, full, p, threshold, no_overlay, save_probs)
                        fut.add_done_callback(finished)
                        futures.append(fut)
                    writing.append(futures)
                    del decoded, ok, pixels, probs, futures
                # at most two batches of outputs wait for the writers: memory stays bounded by the batch size
                while len(writing) > 2 and signals.received is None:
                    for f in writing.pop(0):
                        f.result()
            else:  # every batch predicted: its outputs are written, even if a signal comes now
                for futures in writing:
                    for f in futures:
                        f.result()
        finally:
            decoder.shutdown(wait=True, cancel_futures=True)
            # files being written are finished (they are complete once renamed); queued ones are dropped
            writer.shutdown(wait=True, cancel_futures=True)
            bar.close()
    return summary


def job_done(job: Job) -> bool:
    return all(p.is_file() for p in job.outputs)


def iter_pending(jobs: Iterable[Job], overwrite: bool) -> tuple[list[Job], int]:
    jobs = list(jobs)
    if overwrite:
        return jobs, 0
    todo = [j for j in jobs if not job_done(j)]
    return todo, len(jobs) - len(todo)
