"""main.py: predict / convert / compare end to end, and bad input -> one line, exit code != 0, nothing written."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check_rc=None):
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(d / "photo.jpg")
    m = np.zeros((60, 80), np.uint8)
    m[10:40, 20:60] = 255
    Image.fromarray(m).save(d / "mask.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return d


def test_predict_writes_mask_and_overlay(tiny_hf_dir, images, tmp_path):
    out = tmp_path / "out"
    run("predict", "--checkpoint", tiny_hf_dir, "--image", images / "photo.jpg", "--prompt", "a cat", "A Red Car!",
        "--visual-prompt", f"{images / 'photo.jpg'}:{images / 'mask.png'}", "--out", out, check_rc=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["photo__a-cat_mask.png", "photo__a-cat_overlay.png", "photo__a-red-car_mask.png",
                     "photo__a-red-car_overlay.png", "photo__visual-mask_mask.png", "photo__visual-mask_overlay.png", "prompts.json"]
    m = np.asarray(Image.open(out / "photo__a-cat_mask.png"))
    assert m.shape == (60, 80) and set(np.unique(m)) <= {0, 255}
    assert np.asarray(Image.open(out / "photo__a-cat_overlay.png")).shape == (60, 80, 3)


@pytest.mark.parametrize("args, message", [
    (["--image", "{imgs}/broken.jpg", "--prompt", "a cat"], "broken.jpg: "),
    (["--image", "{imgs}/nope.jpg", "--prompt", "a cat"], "nope.jpg: no such image file"),
    (["--image", "{imgs}/photo.jpg"], "give at least one prompt"),
    (["--image", "{imgs}/photo.jpg", "--prompt", " "], "empty prompt"),
    (["--image", "{imgs}/photo.jpg", "--visual-prompt", "{imgs}/photo.jpg"], "expected IMAGE:MASK"),
])
def test_predict_bad_input(tiny_hf_dir, images, tmp_path, args, message):
    out = tmp_path / "out"
    r = run("predict", "--checkpoint", tiny_hf_dir, "--out", out, *[a.format(imgs=images) for a in args])
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert err and message in err[-1] and err[-1].startswith("error: ")
    assert not out.exists() or not any(out.iterdir())


def test_unknown_hub_id_offline(images, tmp_path):
    r = run("predict", "--checkpoint", "CIDAS/no-such-model", "--image", images / "photo.jpg", "--prompt", "x",
            "--out", tmp_path / "o")
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr


def test_convert_round_trip_and_compare(tiny_hf_dir, tmp_path):
    run("convert", "--checkpoint", tiny_hf_dir, "--out", tmp_path / "ours", check_rc=0)
    assert (tmp_path / "ours" / "clipseg_jax.json").exists() and (tmp_path / "ours" / "tokenizer.json").exists()
    run("convert", "--checkpoint", tmp_path / "ours", "--to-hf", "--out", tmp_path / "hf", check_rc=0)
    # transformers 5 keeps the image processor in processor_config.json: it must survive both conversions
    from transformers import CLIPSegProcessor

    a, b = CLIPSegProcessor.from_pretrained(tiny_hf_dir), CLIPSegProcessor.from_pretrained(tmp_path / "hf")
    assert a.image_processor.to_dict() == b.image_processor.to_dict()
    assert a(text=["a red mug"])["input_ids"] == b(text=["a red mug"])["input_ids"]
    r = run("compare", "--checkpoint", tmp_path / "hf", "--size", "64", check_rc=0)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("text", "visual", "embedding"))]
    assert len(lines) == 3 and all(ln.endswith("OK") for ln in lines), r.stdout
    r = run("convert", "--checkpoint", tiny_hf_dir, "--out", tmp_path / "ours")
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
