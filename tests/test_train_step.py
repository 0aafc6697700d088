"""The train step itself: the same optimizer step as PyTorch (transformers' CLIPSeg, frozen CLIP, torch AdamW +
CosineAnnealingLR), decoder-only gradients and optimizer state, the sharding rule, device-side prompt rendering."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import ROOT, SYNTHETIC_CONFIG, tiny_overrides

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, S = 4, 64


def _config(tiny_hf_dir, tmp_path, **extra):
    from clipseg_jax.train import load_config

    over = {"init": str(tiny_hf_dir), "model.decoder_dropout": 0.0, "total_steps": 8, **extra}
    return load_config(SYNTHETIC_CONFIG, tiny_overrides(tmp_path / "unused", **over))


def _batch(seed: int = 0):
    """A fixed PC+-like batch: uint8 images and supports, {0,1} masks, token ids, one invalid support."""
    from clipseg_jax.tokenizer import CLIPTokenizer

    rng = np.random.RandomState(seed)
    ids, attn = CLIPTokenizer.from_pretrained(None)(["a photo of a red circle.", "blue square.", "an image of a cat.",
                                                     "a bad photo of a small green triangle."], length=16)
    yy, xx = np.mgrid[:S, :S]
    mask = np.stack([((yy - rng.randint(16, 48)) ** 2 + (xx - rng.randint(16, 48)) ** 2 < rng.randint(50, 300))
                     for _ in range(B)]).astype(np.uint8)
    mask[2] = 0  # a negative sample
    return {"image": rng.randint(0, 256, (B, S, S, 3)).astype(np.uint8), "mask": mask,
            "input_ids": ids, "attention_mask": attn,
            "support_image": rng.randint(0, 256, (B, S, S, 3)).astype(np.uint8),
            "support_valid": np.array([True, True, False, True])}


def _torch_normalize(u8):
    from clipseg_jax.prompts import IMAGENET_MEAN, IMAGENET_STD

    x = u8.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.tensor(x).permute(0, 3, 1, 2)


class _TorchStep:
    """The reference step: transformers' CLIPSeg with CLIP frozen, the original's conditioning, torch AdamW +
    CosineAnnealingLR stepped every iteration, in `dtype`."""

    def __init__(self, path, config, dtype):
        self.dtype = dtype
        self.model = transformers.CLIPSegForImageSegmentation.from_pretrained(path).to(dtype)
        self.model.train()
        self.model.clip.requires_grad_(False)
        params = [p for n, p in self.model.named_parameters() if n.startswith("decoder.")]
        o = config.optimizer
        self.opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=config.total_steps, eta_min=o.end_lr)

    def __call__(self, batch, w) -> float:
        m, dt = self.model, self.dtype
        with torch.no_grad():
            text = m.clip.get_text_features(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                                            attention_mask=torch.tensor(batch["attention_mask"]))
            vis = m.clip.get_image_features(pixel_values=_torch_normalize(batch["support_image"]).to(dt))
            text, vis = (getattr(t, "pooler_output", t) for t in (text, vis))
            wt = torch.tensor(w, dtype=dt)[:, None]
            cond = wt * text + (1 - wt) * vis
        logits = m(pixel_values=_torch_normalize(batch["image"]).to(dt), conditional_embeddings=cond).logits
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(batch["mask"]).to(dt))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def decoder(self) -> dict[str, np.ndarray]:
        return {n: p.detach().double().numpy() for n, p in self.model.named_parameters() if n.startswith("decoder.")}


def _as_hf(tree) -> dict[str, np.ndarray]:
    from clipseg_jax.weights.hf import hf_key, to_hf

    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                flat[hf_key(prefix + (k,))] = to_hf(str(k), np.asarray(v, np.float64))

    walk(tree, ())
    return flat


def _run_both(tiny_hf_dir, tmp_path, steps: int, **extra):
    """`steps` steps of ours, torch float32 and torch float64 on the same batches and mixing weights; yields after
    each step (i, trainer, state, torch32, torch64, losses so far)."""
    from clipseg_jax.train.loop import Trainer
    from clipseg_jax.train.state import make_mesh
    from clipseg_jax.train.step import step_keys, text_weights

    config = _config(tiny_hf_dir, tmp_path, **extra)
    trainer = Trainer(config, make_mesh(1, 1, jax.devices()[:1]))
    state = trainer.init_state()
    rng_data = np.asarray(state["rng"])
    t32, t64 = _TorchStep(tiny_hf_dir, config, torch.float32), _TorchStep(tiny_hf_dir, config, torch.float64)
    losses = {"ours": [], "t32": [], "t64": []}
    for i in range(steps):
        batch = _batch(i)
        mix_key, _ = step_keys(jnp.asarray(rng_data), jnp.int32(i))  # the weights our step draws, fed to torch
        w = np.asarray(text_weights(mix_key, jnp.asarray(batch["support_valid"]), config.mix.text_weight_min,
                                    config.mix.text_weight_max), np.float64)
        losses["t32"].append(t32(batch, w))
        losses["t64"].append(t64(batch, w))
        state, metrics = trainer.step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        losses["ours"].append(float(metrics["loss"]))
        yield i, trainer, state, t32, t64, losses


def test_one_step_equals_pytorch(tiny_hf_dir, tmp_path):
    """The same random checkpoint, batch and mixing weights, dropout off, the paper's optimizer: the loss and every
    updated decoder parameter after one step. Adam's first update is g / (|g| + eps) per element, so where a
    gradient is at float32 rounding level (the attention key bias's gradient is exactly zero in exact arithmetic)
    both float32 runs scatter by up to a learning rate: there both are compared with a float64 run of the
    reference, and ours must be as close to it as torch's own float32."""
    for i, trainer, state, t32, t64, losses in _run_both(tiny_hf_dir, tmp_path, 1):
        np.testing.assert_allclose(losses["ours"][0], losses["t32"][0], rtol=1e-5)
        got, want32, want64 = _as_hf(trainer.host_params(state["params"])), t32.decoder(), t64.decoder()
        assert got.keys() == want64.keys()
        for k in want64:
            scale = np.abs(want64[k]).max()
            e_ours = np.abs(got[k] - want64[k]).max()
            e_torch = np.abs(want32[k] - want64[k]).max()
            assert e_ours <= max(1e-5 * scale, 2 * e_torch), (k, e_ours, e_torch, scale)


def test_six_steps_of_losses_equal_pytorch(tiny_hf_dir, tmp_path):
    """Six steps (the schedule's cosine included). Adam's eps is raised to 1e-6 here so that the structurally zero
    key-bias gradients are not amplified to +-lr updates by rounding noise, which makes any two float32 runs
    (torch's own float32 and float64 included) drift apart chaotically after a few steps."""
    *_, (_, _, _, _, _, losses) = _run_both(tiny_hf_dir, tmp_path, 6, **{"optimizer.eps": 1e-6})
    ours, t32, t64 = (np.array(losses[k]) for k in ("ours", "t32", "t64"))
    print("relative loss differences, ours - torch f32:", np.abs(ours - t32) / t32, "torch f32 - f64:",
          np.abs(t32 - t64) / t64)
    np.testing.assert_allclose(ours, t32, rtol=1e-5)
    np.testing.assert_allclose(ours, t64, rtol=1e-5)
    assert len(set(np.round(ours, 6))) == 6  # the steps did train


def test_gradients_and_moments_exist_for_the_decoder_only(tiny_hf_dir, tmp_path):
    from flax import nnx

    from clipseg_jax.train.loop import Trainer
    from clipseg_jax.train.state import make_mesh

    trainer = Trainer(_config(tiny_hf_dir, tmp_path), make_mesh(1, 1, jax.devices()[:1]))
    state = trainer.init_state()
    decoder = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainer.params_host))
    model = trainer.model(trainer.params_host)
    n_dec = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model.decoder, nnx.Param)))
    n_clip = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model.clip, nnx.Param)))
    assert decoder == n_dec and n_clip > n_dec
    opt_arrays = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert sum(int(np.prod(x.shape)) for x in opt_arrays) == 2 * n_dec  # Adam's mu and nu, decoder-sized
    assert set(state["params"]) == {"decoder"}


def test_validation_decodes_pair_by_pair_on_one_cpu_with_the_one_pass_counts(tiny_hf_dir, tmp_path):
    """The trainer's validation step chunks the decoder on its single CPU device (the train step never does); the
    threshold counts are those of one batched pass, up to float32 rounding flipping a pixel at a threshold."""
    from clipseg_jax.train.loop import Trainer
    from clipseg_jax.train.state import make_mesh
    from clipseg_jax.train.step import make_eval_step

    trainer = Trainer(_config(tiny_hf_dir, tmp_path), make_mesh(1, 1, jax.devices()[:1]))
    assert trainer.pair_chunk == 1
    batch = {k: jnp.asarray(v) for k, v in _batch(3).items()}
    params = trainer.init_state()["params"]
    chunked, plain = (jax.jit(make_eval_step(trainer.graphdef, trainer.rest, trainer.chunk, c))(params, trainer.frozen,
                                                                                                 batch)
                      for c in (trainer.pair_chunk, None))
    assert np.asarray(plain).sum() > 0
    diff = np.abs(np.asarray(chunked, np.int64) - np.asarray(plain, np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_fsdp_shards_parameters_and_moments_by_the_rule():
    """On 8 fake devices (4 x 2): a decoder matrix with a dimension the fsdp size divides is split on it, its
    Adam moments likewise; small leaves and scalars stay replicated."""
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
import jax
from jax.sharding import PartitionSpec as P
from clipseg_jax.train import load_config
from clipseg_jax.train.loop import Trainer
from clipseg_jax.train.state import make_mesh, fsdp_spec
from train_helpers import tiny_overrides
cfg = load_config({SYNTHETIC_CONFIG!r}, tiny_overrides("/tmp/unused", **{{"model.decoder_intermediate_size": 1024,
                                                                         "mesh.data": 4, "mesh.fsdp": 2}}))
t = Trainer(cfg, make_mesh(4, 2))
s = t.init_state()
fc1 = s["params"]["decoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
assert fc1.shape == (16, 1024) and fc1.sharding.spec == P(None, "fsdp"), fc1.sharding
mu = s["opt_state"][0].mu["decoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
assert mu.sharding.spec == P(None, "fsdp"), mu.sharding
assert s["params"]["decoder"]["film_mul"]["bias"].sharding.spec == P()
assert fsdp_spec((3, 5, 7), 2) == P() and fsdp_spec((), 2) == P() and fsdp_spec((4096, 1000), 8) == P("fsdp", None)
print("OK")
"""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_device_rendered_supports_give_the_host_rendered_loss(tiny_hf_dir, tmp_path):
    """support_render='device': the step renders the raw support crops itself; same loss as rendering on the host
    (renderers agree within one uint8 level)."""
    from clipseg_jax.prompts import render_visual_prompt_square_u8
    from clipseg_jax.train.loop import Trainer
    from clipseg_jax.train.state import make_mesh

    batch = _batch(0)
    yy, xx = np.mgrid[:S, :S]
    support_mask = np.stack([((yy - 30) ** 2 + (xx - 20 - 4 * i) ** 2 < 90) for i in range(B)]).astype(np.uint8)
    support_mask[2] = 0
    raw = batch["support_image"]
    host = np.stack([render_visual_prompt_square_u8(raw[i], support_mask[i]) if batch["support_valid"][i]
                     else np.zeros_like(raw[i]) for i in range(B)])
    out = {}
    for render in ("host", "device"):
        t = Trainer(_config(tiny_hf_dir, tmp_path, **{"data.support_render": render}),
                    make_mesh(1, 1, jax.devices()[:1]))
        b = dict(batch, support_image=host if render == "host" else raw)
        if render == "device":
            b["support_mask"] = support_mask
        _, m = t.step(t.init_state(), {k: jnp.asarray(v) for k, v in b.items() if k in t.batch_keys})
        out[render] = float(m["loss"])
    assert abs(out["host"] - out["device"]) < 1e-3 * out["host"]
