"""Running the trainer in tests: a tiny config on a small synthetic dataset, in-process or as `main.py train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = str(ROOT / "configs" / "synthetic_shapes.py")


def tiny_overrides(data_dir: Path, **extra) -> list[str]:
    """A tiny random CLIPSeg (64 px, patch 16) on a 24-image synthetic set: seconds per run on 2 cores."""
    o = {
        "data.data_dir": str(data_dir), "data.synthetic.train_images": 24, "data.synthetic.val_images": 6,
        "data.synthetic.min_size": 64, "data.synthetic.max_size": 96,
        "data.image_size": 64, "eval_data.image_size": 64, "data.batch_size": 8, "eval_data.batch_size": 8,
        "model.vision.hidden_size": 32, "model.vision.intermediate_size": 64, "model.vision.num_hidden_layers": 3,
        "model.vision.num_attention_heads": 2, "model.vision.image_size": 64,
        "model.text.hidden_size": 32, "model.text.intermediate_size": 64, "model.text.num_hidden_layers": 2,
        "model.text.num_attention_heads": 2, "model.projection_dim": 16, "model.extract_layers": "(0,1,2)",
        "model.reduce_dim": 16, "model.decoder_intermediate_size": 32, "data.text_length": 16,
        "eval_data.text_length": 16, "total_steps": 6, "log_every": 1, "checkpoint_every": 3, "eval_every": 0,
        "progress": False, "freeze_clip": True, "data.with_visual": True,  # the paper's recipe
    }
    o.update(extra)
    return [f"--config.{k}={v}" for k, v in o.items()]


def run_train(workdir: Path, overrides: list[str], devices: int = 1, env: dict | None = None,
              config: str = SYNTHETIC_CONFIG, timeout: int = 600) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             TOKENIZERS_PARALLELISM="false")
    e.pop("XLA_FLAGS", None)
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e.update(env or {})
    cmd = [sys.executable, str(ROOT / "main.py"), "train", "--config", config, "--workdir", str(workdir), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=timeout)


def losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def model_params(model_dir: Path) -> dict:
    """The trained model's parameters, flat {path: array}."""
    import numpy as np
    from flax import nnx

    import clipseg_jax

    m = clipseg_jax.from_pretrained(model_dir)
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
