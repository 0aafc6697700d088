"""The trainer on device meshes and across processes: sharded runs equal one device, two processes agree and
resume from their joint checkpoint. Fake CPU devices need fresh processes, so every run is `main.py train`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_helpers import ROOT, SYNTHETIC_CONFIG, losses, model_params, run_train, tiny_overrides


def _close(a: dict[int, float], b: dict[int, float], rtol: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("devices, data, fsdp", [(4, 2, 2), (8, 8, 1), (8, 4, 2)])
def test_sharded_runs_match_one_device(baseline, shapes_dir, tmp_path, devices, data, fsdp):
    """The same command on fake CPU devices, batch split over (data x fsdp), parameters and Adam moments sharded
    over fsdp: the metrics.jsonl losses and the trained parameters of one device, to reduction order."""
    wd = tmp_path / "run"
    r = run_train(wd, tiny_overrides(shapes_dir, **{"mesh.data": data, "mesh.fsdp": fsdp}), devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]
    base = losses(baseline[0])
    got = losses(wd)
    print(f"{data}x{fsdp}: max relative loss difference to one device",
          max(abs(got[k] - base[k]) / abs(base[k]) for k in base))
    assert _close(got, base, 1e-4), (got, base)
    a, b = model_params(wd / "model"), model_params(baseline[0] / "model")
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4 * max(np.abs(b[k]).max(), 1e-2), err_msg=k)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(wd: Path, overrides: list[str]) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for i in range(2):
        dist = [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}"]
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "main.py"), "train", "--config", SYNTHETIC_CONFIG,
                                       "--workdir", str(wd), *overrides, *dist], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    out = []
    for p in procs:
        o, e = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


@pytest.mark.slow
def test_two_processes_train_agree_and_resume(shapes_dir, tmp_path):
    """Two local processes (jax.distributed on 127.0.0.1, gloo collectives), 2 fake devices each: each feeds its
    own PC+ shard; both end with the same parameters; the joint checkpoint resumes to the unbroken run's losses."""
    over = tiny_overrides(shapes_dir, total_steps=6, checkpoint_every=2)
    unbroken = tmp_path / "unbroken"
    first = _two_processes(unbroken, over)
    for r in first:
        assert r.returncode == 0, r.stderr[-3000:]
    prints = [[line for line in r.stdout.splitlines() if "parameters" in line] for r in first]
    assert prints[0] and prints[0] == prints[1], prints  # the same parameter fingerprint on both processes
    assert sorted(p.name for p in (unbroken / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]
    # A run stopped after step 4's joint checkpoint that had logged steps 5-6 already: the unbroken run's workdir
    # without checkpoint 6, its losses of steps 5-6 replaced by a marker. The resumed processes must drop those
    # records and log steps 5-6 again, once each.
    wd = tmp_path / "stopped"
    shutil.copytree(unbroken, wd)
    shutil.rmtree(wd / "checkpoints" / "6")
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    stale = [{**r, "loss": -1.0} if "loss" in r and r["step"] > 4 else r for r in records]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    resumed = _two_processes(wd, over)
    for r in resumed:
        assert r.returncode == 0, r.stderr[-3000:]
    assert all("resumed from step 4" in r.stdout for r in resumed)
    logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(wd) == losses(unbroken)
