"""The trainer: configs and overrides, what a run writes, sharding, exact resume after kill -9, faults, bad input.

Runs use a tiny random CLIPSeg on a small synthetic PhraseCut (`train_helpers.tiny_overrides`), through
`main.py train` in subprocesses (fake devices need a fresh process) or through `Trainer` in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from train_helpers import ROOT, SYNTHETIC_CONFIG, losses, model_params, run_train, tiny_overrides

CONFIGS = ("rd64_uni", "rd64_uni_refined", "rd16_uni", "text_only", "own_data", "synthetic_shapes")


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_configs_have_the_same_fields():
    from configs.data_phrasecut import get_config as data_config

    from clipseg_jax.train import load_config

    fields = None
    for name in CONFIGS:
        c = load_config(ROOT / "configs" / f"{name}.py").to_dict()
        keys = _keys(c)
        fields = keys if fields is None else fields
        assert keys == fields, f"{name}: {sorted(keys ^ fields)}"
        for block in ("data", "eval_data"):
            assert _keys(c[block]) == _keys(data_config().to_dict()), block
    paper = load_config(ROOT / "configs" / "rd64_uni.py")
    assert (paper.optimizer.lr, paper.optimizer.end_lr, paper.optimizer.weight_decay) == (1e-3, 1e-4, 0.01)
    assert (paper.total_steps, paper.data.batch_size, paper.data.negative_prob) == (20000, 64, 0.2)
    assert paper.freeze_clip and paper.data.with_visual and paper.model.decoder_dropout == 0.1
    assert (paper.mix.text_weight_min, paper.mix.text_weight_max) == (0.0, 0.5)
    assert paper.init_clip == "openai/clip-vit-base-patch16"
    refined = load_config(ROOT / "configs" / "rd64_uni_refined.py")
    assert refined.total_steps == 50000 and refined.model.use_complex_transposed_convolution
    assert load_config(ROOT / "configs" / "rd16_uni.py").model.reduce_dim == 16
    assert not load_config(ROOT / "configs" / "text_only.py").data.with_visual


def test_overrides_are_typed_and_checked():
    from clipseg_jax.train import ConfigError, load_config

    c = load_config(SYNTHETIC_CONFIG, ["--config.mesh.fsdp=2", "--config.freeze_clip=true",
                                       "--config.model.extract_layers=(0,1)", "--config.optimizer.lr=1"])
    assert c.mesh.fsdp == 2 and c.freeze_clip is True and tuple(c.model.extract_layers) == (0, 1)
    assert isinstance(c.optimizer.lr, float) and c.optimizer.lr == 1.0
    for bad, match in ((["--config.nope=1"], "has no key 'nope'"),
                       (["--config.mesh.nope=1"], "has no key 'nope' at mesh"),
                       (["--config.total_steps=abc"], "total_steps"),
                       (["--config.total_steps=1.5"], "total_steps"),
                       (["--config.freeze_clip=maybe"], "freeze_clip"),
                       (["--config.dtype=fp8"], "config.dtype"),
                       (["--config.total_steps=0"], "total_steps"),
                       (["--config.data.source=web"], "data.source"),
                       (["--config.model.vision.patch_size=8", "--config.data.image_size=64"],
                        "use_complex_transposed_convolution=True needs model.vision.patch_size=16"),
                       (["total_steps=3"], "expected --config.KEY=VALUE")):
        with pytest.raises(ConfigError, match=match):
            load_config(SYNTHETIC_CONFIG, bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(ROOT / "configs" / "nope.py")


def test_a_run_writes_what_a_user_expects(baseline):
    wd, r = baseline
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in records if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    for x in steps:
        assert {"step", "loss", "lr", "samples_per_s", "mfu"} <= x.keys()
        assert np.isfinite(x["loss"])
    assert steps[-1]["samples_per_s"] > 0 and steps[-1]["tflops_per_s_per_device"] > 0
    # cosine from 1e-3 to 1e-4 over total_steps, stepped every iteration (CosineAnnealingLR)
    want = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * i / 6)) for i in range(6)]
    np.testing.assert_allclose([x["lr"] for x in steps], want, rtol=1e-6)
    val = [x for x in records if "val/fgiou" in x]
    assert len(val) == 1 and val[0]["step"] == 6
    ev = json.loads((wd / "eval_metrics.json").read_text())
    assert {"fgiou", "miou", "ap", "step"} <= ev.keys() and ev["step"] == 6 and ev["n_samples"] > 0
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["total_steps"] == 6 and cfg["data"]["batch_size"] == 8
    assert list(wd.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert "trained to step 6" in r.stdout


def test_tensorboard_events_hold_the_scalars(baseline):
    import tensorflow as tf

    wd, _ = baseline
    tags = set()
    for f in wd.glob("events.out.tfevents.*"):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            tags |= {v.tag for v in e.summary.value}
    assert {"loss", "lr", "samples_per_s", "val/fgiou"} <= tags


def test_the_trained_model_predicts_evaluates_and_converts(baseline, tmp_path):
    """DIR/model goes through the existing commands as it is."""
    import clipseg_jax

    wd, _ = baseline
    model = clipseg_jax.from_pretrained(wd / "model")
    assert model.config.reduce_dim == 16
    import main
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "x.png")
    assert main.main(["predict", "--checkpoint", str(wd / "model"), "--image", str(tmp_path / "x.png"),
                      "--prompt", "red circle", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "x__red-circle_mask.png").is_file()
    assert main.main(["convert", "--checkpoint", str(wd / "model"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(tmp_path / "hf")
    assert hf.config.reduce_dim == 16


def test_eval_command_takes_the_trained_model(baseline, shapes_dir, tmp_path):
    import main

    wd, _ = baseline
    root = Path(shapes_dir) / "VGPhraseCut_v0"
    out = tmp_path / "m.json"
    assert main.main(["eval", "--checkpoint", str(wd / "model"), "--dataset", "phrasecut", "--data-dir", str(root),
                      "--split", "val", "--output", str(out), "--batch-size", "4"]) == 0
    assert json.loads(out.read_text())["metrics"]["n_samples"] > 0


def _driver(tmp_path: Path, mode: str, at: int) -> Path:
    """`main.py train` that SIGKILLs itself after step `at` once the saves before it are complete ("step"), or
    right after handing the async save of step `at` to orbax ("save"): an unfinished checkpoint is left behind."""
    p = tmp_path / "kill_driver.py"
    p.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from clipseg_jax.train import loop
managers = []
orig_save = loop.Checkpoints.save
def save(self, step, *a, **k):
    managers.append(self)
    r = orig_save(self, step, *a, **k)
    if {mode!r} == "save" and step == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return r
loop.Checkpoints.save = save
orig_step = loop.Trainer.step
def step(self, state, batch):
    out = orig_step(self, state, batch)
    if {mode!r} == "step" and int(out[0]["step"]) == {at}:
        for m in managers:
            m.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return out
loop.Trainer.step = step
import main
sys.exit(main.main(sys.argv[1:]))
""")
    return p


def _run_driver(driver: Path, wd: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(driver), "train", "--config", SYNTHETIC_CONFIG, "--workdir", str(wd),
                           *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("mode, at, resumed_from", [("step", 5, 3), ("save", 6, 3)])
def test_kill_9_then_rerun_equals_the_unbroken_run(baseline, shapes_dir, tmp_path, mode, at, resumed_from):
    """kill -9 mid-training (after step 5; last checkpoint 3) and during the async save of step 6: the rerun of the
    same command resumes from the last complete checkpoint and logs exactly the unbroken run's losses."""
    wd = tmp_path / "run"
    killed = _run_driver(_driver(tmp_path, mode, at), wd, tiny_overrides(shapes_dir))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert done == [str(resumed_from)], done
    if mode == "save":  # the save of step 6 was under way
        assert [p for p in (wd / "checkpoints").iterdir() if not p.name.isdigit() and "6" in p.name], \
            list((wd / "checkpoints").iterdir())
    r = run_train(wd, tiny_overrides(shapes_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(wd) == losses(baseline[0])  # bitwise: same floats printed
    a, b = model_params(wd / "model"), model_params(baseline[0] / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sigterm_saves_the_current_step_and_exits_0(shapes_dir, tmp_path):
    wd = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    over = tiny_overrides(shapes_dir, total_steps=100000, checkpoint_every=100000, log_every=1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "train", "--config", SYNTHETIC_CONFIG,
                             "--workdir", str(wd), *over], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (wd / "metrics.jsonl").exists() and len((wd / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = [int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3 and "rerun to resume" in out
    assert not (wd / "model").exists()


def test_a_non_finite_loss_stops_naming_the_step(shapes_dir, tmp_path):
    wd = tmp_path / "run"
    r = run_train(wd, tiny_overrides(shapes_dir, **{"optimizer.lr": 1e38, "optimizer.schedule": "constant",
                                                    "checkpoint_every": 1}))
    assert r.returncode == 1
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "step 2: the loss is" in lines[0], r.stderr[-2000:]
    saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1]  # the bad state was not saved
    assert not (wd / "model").exists()


def _error_line(r) -> str:
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_bad_input_is_one_line_and_touches_no_checkpoint(baseline, shapes_dir, tmp_path):
    wd, _ = baseline
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    stamp = {p: p.stat().st_mtime_ns for p in (wd / "checkpoints").rglob("*")}
    line = _error_line(run_train(tmp_path / "a", tiny_overrides(shapes_dir) + ["--config.nope=1"]))
    assert "nope" in line
    line = _error_line(run_train(tmp_path / "b", tiny_overrides(shapes_dir) + ["--config.total_steps=x"]))
    assert "total_steps" in line
    line = _error_line(run_train(tmp_path / "c", tiny_overrides(shapes_dir, **{"data.source": "tfds",
                                                                              "data.data_dir": str(tmp_path / "no")})))
    assert "not prepared" in line
    line = _error_line(run_train(tmp_path / "d", tiny_overrides(shapes_dir, init=str(tmp_path / "no_ckpt"))))
    assert "no_ckpt" in line
    # Another architecture in a workdir holding a checkpoint: refused before anything is written.
    line = _error_line(run_train(wd, tiny_overrides(shapes_dir, **{"model.reduce_dim": 8, "total_steps": 9})))
    assert "another architecture" in line and "reduce_dim" in line
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before
    assert {p: p.stat().st_mtime_ns for p in (wd / "checkpoints").rglob("*")} == stamp


@pytest.mark.xdist_group("pcplus_shared_memory")  # starts PC+ worker processes (see test_data_workers.py)
def test_training_from_a_cache_with_device_rendering_and_worker_processes(baseline, shapes_dir, tmp_path):
    """The fast input path: a pre-resized cache, visual prompts rendered in the step, batches built by PC+
    worker processes; it trains, and the validation source defaults to the cache's TFDS split."""
    from data_pipelines.sources import TfdsSource, build_cache

    cache = build_cache(TfdsSource("train", Path(shapes_dir) / "tfds"), tmp_path / "cache", size=64)
    wd = tmp_path / "run"
    r = run_train(wd, tiny_overrides(shapes_dir, **{"data.source": "cached", "data.cache_dir": str(cache),
                                                    "data.support_render": "device", "data.workers": 2,
                                                    "eval_data.data_dir": str(Path(shapes_dir) / "tfds")}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(wd)) == 6 and all(np.isfinite(v) for v in losses(wd).values())
    assert json.loads((wd / "eval_metrics.json").read_text())["n_samples"] > 0
