"""The data command lines: fatal input is one `error:` line and exit 2; the own-data checker lists every bad line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_synthetic_refuses_an_existing_folder_and_says_how(tmp_path):
    out = tmp_path / "syn"
    r = run_module("data_pipelines.synthetic", "--out", out, "--images-per-split", 1)
    assert r.returncode == 0, r.stderr
    before = sorted(p.name for p in out.iterdir())
    r = run_module("data_pipelines.synthetic", "--out", out, "--images-per-split", 1)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --out {out} exists and is not empty; pass --overwrite to replace it"]
    assert sorted(p.name for p in out.iterdir()) == before
    r = run_module("data_pipelines.synthetic", "--out", out, "--images-per-split", 2, "--overwrite")
    assert r.returncode == 0, r.stderr


def _own(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 5:10] = 255
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(root / "a.png")
    Image.fromarray(m).save(root / "a_mask.png")
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_own_data_checker_lists_every_bad_line(tmp_path):
    good = json.dumps({"image": "a.png", "mask": "a_mask.png", "phrase": "a square"})
    root = _own(tmp_path / "own", [
        good,
        '{"image": "a.png", "mask": "a_mask.png", "phrase": ',               # 2: bad JSON
        json.dumps({"image": "a.png", "phrase": "x"}),                       # 3: no mask key
        json.dumps(["a.png", "a_mask.png", "x"]),                            # 4: a list
        json.dumps({"image": "missing.png", "mask": "a_mask.png", "phrase": "y"}),  # 5: missing file
        good,
    ])
    r = run_module("data_pipelines.own_data", root)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    ann = root / "annotations.jsonl"
    assert [ln.split(": ", 1)[1].split(": ")[0] for ln in err[:-1]] == [f"{ann}:{i}" for i in (2, 3, 4, 5)]
    assert "invalid JSON" in err[0] and "['mask']" in err[1] and "a JSON list" in err[2] and "missing.png" in err[3]
    assert err[-1] == f"error: {ann}: 4 of 6 lines cannot be used (listed above); fix or remove them"
    assert "Traceback" not in r.stderr


def test_own_data_checker_folder_errors_and_success(tmp_path):
    r = run_module("data_pipelines.own_data", tmp_path / "nothing")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert "annotations.jsonl not found" in r.stderr
    root = _own(tmp_path / "ok", [json.dumps({"image": "a.png", "mask": "a_mask.png", "phrase": "a square"})])
    r = run_module("data_pipelines.own_data", root)
    assert r.returncode == 0 and r.stdout.startswith("1 tasks, 1 phrases"), r.stderr
