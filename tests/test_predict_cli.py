"""main.py predict on files and folders: unique stable names, repeated flags, EXIF, inputs checked before the model
loads, atomic outputs, interrupted runs resumed (SIGTERM and kill -9), probabilities, the compile cache."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipseg_jax import predict_files as pf

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "CIDAS/no-such-model"  # checks that must fail before any model is looked up


def run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def last_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), r.stderr
    return lines[-1]


def save(path: Path, hw=(60, 80), seed=0, exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray((np.random.default_rng(seed).random((*hw, 3)) * 255).astype(np.uint8))
    if exif_orientation:
        ex = im.getexif()
        ex[0x0112] = exif_orientation
        im.save(path, exif=ex)
    else:
        im.save(path)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """img/cat.jpg, img/sub/cat.jpg, img/cat-2.png, img/cat.png (the old rule's collisions) and a mask."""
    d = tmp_path_factory.mktemp("tree")
    for i, n in enumerate(["img/cat.jpg", "img/sub/cat.jpg", "img/cat-2.png", "img/cat.png"]):
        save(d / n, seed=i)
    (d / "img" / "notes.txt").write_text("not an image, ignored in a folder")
    m = np.zeros((60, 80), np.uint8)
    m[10:40, 20:60] = 255
    Image.fromarray(m).save(d / "mask.png")
    Image.fromarray(m[:50]).save(d / "mask_small.png")
    return d


def outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_names_unique_and_stable_across_prompts_and_paths(tiny_hf_dir, tree, tmp_path):
    out = tmp_path / "out"
    prompts = ["a cat", "A cat!", "a-cat", "猫", "🐱"]
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img", "--prompt", *prompts[:3],
            "--prompt", *prompts[3:], "--out", out)
    assert r.returncode == 0, r.stderr
    mapping = json.loads((out / "prompts.json").read_text())
    assert sorted(mapping.values()) == sorted(prompts) and len(mapping) == 5
    stems = ["cat.jpg", "cat.png", "cat-2", "sub/cat"]
    expected = sorted([f"{s}__{n}_{kind}.png" for s in stems for n in mapping for kind in ("mask", "overlay")]
                      + ["prompts.json"])
    assert outputs(out) == expected
    # a rerun with a subset of the prompts keeps their names, and skips what exists
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat.jpg", "--prompt", "A cat!",
            "--out", out)
    assert r.returncode == 0 and "1 images skipped" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "prompts.json").read_text()) == mapping
    # a new prompt whose slug an earlier run's prompt holds gets its own name, not the old files
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat.jpg", "--prompt", "A CAT",
            "--out", tmp_path / "o2")
    assert r.returncode == 0 and outputs(tmp_path / "o2")[0] == "cat.jpg__a-cat_mask.png"
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat.jpg", "--prompt", "a cat",
            "--out", tmp_path / "o2")
    assert r.returncode == 0 and "skipped" not in r.stdout
    assert len(json.loads((tmp_path / "o2" / "prompts.json").read_text())) == 2


def test_repeated_flags_add_up_and_globs(tiny_hf_dir, tree, tmp_path):
    out = tmp_path / "out"
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat.jpg",
            "--image", str(tree / "img" / "sub" / "*.jpg"), "--prompt", "a", "--prompt", "b",
            "--visual-prompt", f"{tree / 'img' / 'cat.jpg'}:{tree / 'mask.png'}", "--no-overlay", "--out", out)
    assert r.returncode == 0, r.stderr
    assert outputs(out) == ["cat.jpg__a_mask.png", "cat.jpg__b_mask.png", "cat.jpg__visual-mask_mask.png", "prompts.json",
                            "sub/cat__a_mask.png", "sub/cat__b_mask.png", "sub/cat__visual-mask_mask.png"]


def test_exif_orientation_applied(tiny_hf_dir, tmp_path):
    from clipseg_jax.predict import Predictor, load_image

    photo = save(tmp_path / "portrait.jpg", hw=(60, 80), exif_orientation=6)  # stored landscape, shown portrait
    assert load_image(photo).shape == (80, 60, 3)
    with Image.open(photo) as im:
        assert load_image(im).shape == (80, 60, 3)
    assert Predictor.from_pretrained(tiny_hf_dir).predict(photo, ["x"]).shape == (1, 1, 80, 60)
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", photo, "--prompt", "x", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o" / "portrait__x_mask.png").size == (60, 80)  # PIL: (width, height)


@pytest.mark.parametrize("args, message", [
    (["--threshold", "2"], "--threshold 2.0: expected a probability in [0, 1]"),
    (["--threshold", "-1"], "--threshold -1.0: expected"),
    (["--threshold", "nan"], "--threshold nan: expected"),
    (["--visual-prompt", "{d}/img/cat.jpg:{d}/mask_small.png"], "does not match its image"),
    (["--image", "{d}/nothing-here"], "nothing-here: no such image file"),
    (["--image", "{d}/img/*.tif"], "the pattern matches no file"),
    (["--batch-size", "0"], "--batch-size 0"),
])
def test_bad_input_before_the_model_loads(tree, tmp_path, args, message):
    out = tmp_path / "out"
    args = [a.format(d=tree) for a in args]
    base = ["--image", tree / "img" / "cat.jpg"] if "--image" not in args else []
    r = run("predict", "--checkpoint", NO_MODEL, *base, "--prompt", "a cat", *args, "--out", out)
    assert r.returncode == 2 and message in last_error(r), r.stderr
    assert not out.exists()


def test_folder_without_images_and_bad_out(tree, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    r = run("predict", "--checkpoint", NO_MODEL, "--image", tmp_path / "empty", "--prompt", "a", "--out", tmp_path / "o")
    assert r.returncode == 2 and "a folder without images" in last_error(r)
    (tmp_path / "file").write_text("x")
    r = run("predict", "--checkpoint", NO_MODEL, "--image", tree / "img", "--prompt", "a", "--out", tmp_path / "file")
    assert r.returncode == 2 and "--out " in last_error(r) and "is a file" in last_error(r)
    r = run("predict", "--checkpoint", NO_MODEL, "--image", tree / "img", "--prompt", "a",
            "--out", tmp_path / "file" / "below")
    assert r.returncode == 2 and "--out " in last_error(r) and "cannot write there" in last_error(r)


def test_output_folder_inside_the_input_folder_is_not_read(tiny_hf_dir, tmp_path):
    save(tmp_path / "photos" / "a.png")
    for _ in range(2):
        r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tmp_path / "photos", "--prompt", "x",
                "--out", tmp_path / "photos" / "masks")
        assert r.returncode == 0, r.stderr
    assert outputs(tmp_path / "photos" / "masks") == ["a__x_mask.png", "a__x_overlay.png", "prompts.json"]


def test_save_probs_png16_and_npy(tiny_hf_dir, tree, tmp_path):
    from clipseg_jax.predict import Predictor

    ref = Predictor.from_pretrained(tiny_hf_dir).predict(tree / "img" / "cat-2.png", ["x"])[0, 0]
    for fmt in ("png", "npy"):
        out = tmp_path / fmt
        r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat-2.png", "--prompt", "x",
                "--save-probs", fmt, "--out", out)
        assert r.returncode == 0, r.stderr
        if fmt == "png":
            q = np.asarray(Image.open(out / "cat-2__x_probs.png"))
            assert q.dtype == np.uint16 and q.shape == ref.shape
            np.testing.assert_allclose(q / 65535.0, ref, atol=0.5 / 65535 + 1e-6)
        else:
            np.testing.assert_allclose(np.load(out / "cat-2__x_probs.npy"), ref, atol=1e-6)
        mask = np.asarray(Image.open(out / "cat-2__x_mask.png"))
        np.testing.assert_array_equal(mask == 255, ref > 0.5)


def test_a_bad_image_in_a_folder_is_reported_and_the_rest_written(tiny_hf_dir, tmp_path):
    save(tmp_path / "in" / "good.png")
    good = (tmp_path / "in" / "good.png").read_bytes()
    (tmp_path / "in" / "truncated.png").write_bytes(good[: len(good) // 2])  # a valid header, then nothing
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tmp_path / "in", "--prompt", "x", "--out", tmp_path / "o")
    assert r.returncode == 1 and "truncated.png" in r.stderr and "1 images could not be read" in last_error(r)
    assert outputs(tmp_path / "o") == ["good__x_mask.png", "good__x_overlay.png", "prompts.json"]


def _many_images(d: Path, n: int) -> Path:
    """Photo-sized noise (2 MP): its overlay PNGs take a while to encode, so the run can be interrupted."""
    d.mkdir(parents=True)
    base = (np.random.default_rng(0).random((1200, 1600, 3)) * 255).astype(np.uint8)
    for i in range(n):
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(d / f"im{i:03d}.jpg", quality=90)
    return d


def _wait_for_outputs(out: Path, proc, at_least: int, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(list(out.glob("*_overlay.png"))) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no outputs appeared")


def _all_complete(out: Path) -> None:
    for f in out.rglob("*"):
        assert not f.name.startswith(".") or f.name.endswith(pf.PARTIAL_SUFFIX), f
        if f.suffix == ".png" and not f.name.startswith("."):
            with Image.open(f) as im:
                im.load()  # a partial file would fail here


def _complete_images(out: Path) -> set[str]:
    stems = {f.name.split("__")[0] for f in out.glob("*.png")}
    return {s for s in stems if all((out / f"{s}__{p}_{k}.png").is_file() for p in "ab" for k in ("mask", "overlay"))}


def test_interrupted_runs_resume_without_redoing_finished_images(tiny_hf_dir, tmp_path):
    """SIGTERM: exit 128+15 after the files being written, nothing partial; kill -9: only complete outputs (and
    hidden temporaries the next run removes); each rerun skips the finished images and the last one completes."""
    imgs = _many_images(tmp_path / "in", 24)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "main.py"), "predict", "--checkpoint", str(tiny_hf_dir), "--image", str(imgs),
           "--prompt", "a", "b", "--batch-size", "2", "--out", str(out)]
    done_before = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_outputs(out, proc, 2 * (done_before + 2))
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left behind, hung, after the suite
            _, err = proc.communicate()
            pytest.fail(f"still running 120 s after {sig.name}: {err[-2000:]}")
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, err
            assert "rerun the same command" in err
            assert not [f for f in out.rglob(".*")], "SIGTERM left temporary files"
        else:
            assert proc.returncode == -signal.SIGKILL
        _all_complete(out)
        complete = _complete_images(out)
        assert done_before < len(complete) < 24
        done_before = len(complete)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{done_before} images skipped" in r.stdout, r.stdout
    assert len(list(out.glob("*.png"))) == 24 * 4
    assert not [f for f in out.rglob(".*")]
    _all_complete(out)


class _SignalDuringBatch:
    """Stands in for the Predictor in `run_stream`: zero probabilities; while batch `at` is predicted it sends this
    process `signum`, `times` times."""

    image_size = 8

    def __init__(self, at: int, signum: int, times: int = 1):
        self.at, self.signum, self.times, self.calls = at, signum, times, 0

    def predict_resized(self, pixels, sizes, cond):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return [np.zeros((len(cond), h, w), np.float32) for h, w in sizes]


def _stream(tmp_path, predictor):
    images = [save(tmp_path / "in" / f"{i}.png", hw=(6, 8), seed=i) for i in range(6)]
    out = pf.prepare_out_dir(tmp_path / "out")
    jobs = pf.plan(images, ["a"], out)
    return pf.run_stream(predictor, jobs, np.zeros((1, 4), np.float32), 0.5, batch_size=2, progress=False), out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_stream_at_the_next_batch(tmp_path, signum):
    """The handler only records: the batch being predicted is handed to the writers, no later batch is predicted,
    nothing partial is left, and the previous handler is back afterwards. A signal that interrupts a lock inside
    the stream (tqdm's, a Future's) could otherwise leave the writer threads waiting forever."""
    previous = signal.getsignal(signum)
    fake = _SignalDuringBatch(at=2, signum=signum)
    s, out = _stream(tmp_path, fake)
    assert s.interrupted == signum and fake.calls == 2 and signal.getsignal(signum) is previous
    _all_complete(out)
    written = sorted(f.name for f in out.glob("*.png"))
    assert written == sorted(f"{i}__a_{k}.png" for i in range(len(written) // 2) for k in ("mask", "overlay"))
    assert s.done == len(written) // 2 <= 4  # images 4 and 5 (batch 3) are never predicted


def test_a_signal_during_the_last_batch_still_completes_the_run(tmp_path):
    s, out = _stream(tmp_path, _SignalDuringBatch(at=3, signum=signal.SIGTERM))
    assert s.interrupted is None and s.done == 6 and len(list(out.glob("*.png"))) == 12


def test_a_second_signal_reaches_the_previous_handler(tmp_path):
    """Ctrl-C twice interrupts at once: after the first signal the previous handler is reinstalled."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        s, _ = _stream(tmp_path, _SignalDuringBatch(at=1, signum=signal.SIGTERM, times=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert s.interrupted == signal.SIGTERM and seen == [signal.SIGTERM]


def test_compile_cache_dir_filled_and_off_switch(tiny_hf_dir, tree, tmp_path, monkeypatch):
    cache = tmp_path / "xla"
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat.jpg", "--prompt", "x",
            "--out", tmp_path / "o1", env={"CLIPSEG_JAX_COMPILATION_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert entries
    r = run("predict", "--checkpoint", tiny_hf_dir, "--image", tree / "img" / "cat.jpg", "--prompt", "x",
            "--out", tmp_path / "o2", env={"CLIPSEG_JAX_COMPILATION_CACHE": str(cache)})
    assert r.returncode == 0 and sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries  # all hits
    from clipseg_jax import compile_cache

    monkeypatch.setenv(compile_cache.ENV, "off")  # restored after the test: later CLI runs keep the session's cache
    assert compile_cache.cache_dir() is None and compile_cache.enable_compilation_cache() is None


def test_prompt_names_unit():
    names = pf.prompt_names(["a cat", "A cat!", "dog", "猫"], ["a-cat", "a-cat", "dog", ""], {})
    assert names[2] == "dog" and names[0] != names[1] and names[0].startswith("a-cat-")
    assert names[3].startswith("prompt-")
    assert pf.prompt_names(["a cat"], ["a-cat"], dict(zip(names, ["a cat", "A cat!", "dog", "猫"]))) == [names[0]]
    assert pf.prompt_names(["dogs"], ["dog"], {"dog": "Dog"})[0].startswith("dog-")


def test_overlay_equals_the_full_image_formula():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    for t in (0.0, 0.3, 0.5, 1.0):
        p = rng.random((20, 30)).astype(np.float32)
        p[0, :3] = (t, np.nextafter(np.float32(t), np.float32(2)), 1.0)
        a = (0.5 * np.clip(p, 0, 1) * (p > t))[..., None]
        ref = (img.astype(np.float32) * (1 - a) + np.asarray((255, 40, 40), np.float32) * a).round().astype(np.uint8)
        np.testing.assert_array_equal(pf.overlay(img, p, t), ref)
