"""A pretrained CLIP as the backbone of a new CLIPSeg (the trainer's `init_clip`): a `transformers.CLIPModel`
directory or hub id (`openai/clip-vit-base-patch16`), or OpenAI's ViT-B/16 state dict. The decoder is freshly
initialised (torch's default init, as the original trained it).

CLIPModel keys are CLIPSeg's `clip.*` keys without the prefix (`vision_model.encoder.layers.3...`), so the
conversion is the same per-leaf rule as every other HF checkpoint (`weights.hf`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clipseg import CLIPSeg
from clipseg_jax.model.decoder import CLIPSegDecoder
from clipseg_jax.weights import hf

_CLIP_PREFIXES = ("text_model.", "vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def read_clip(name_or_path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], Path | None]:
    """(CLIPSeg-named `clip.*` state dict, {"projection_dim", "text_config", "vision_config"}, the directory that
    holds its tokenizer files or None) of a CLIP checkpoint."""
    p = Path(name_or_path).expanduser()
    if p.is_file():  # OpenAI's state dict (ViT-B-16.pt saved as a plain state dict)
        from clipseg_jax.weights.original import load_torch_state_dict, openai_clip_to_hf

        sd, cfg = openai_clip_to_hf(load_torch_state_dict(p))
        return sd, cfg, None
    from clipseg_jax.loading import resolve

    path = resolve(name_or_path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json: not a transformers CLIPModel directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("model_type") != "clip":
        hint = " (a CLIPSeg checkpoint goes to `init`, not `init_clip`)" if cfg.get("model_type") == "clipseg" else ""
        raise ValueError(f"{cfg_file}: model_type {cfg.get('model_type')!r}, expected 'clip' (a transformers "
                         f"CLIPModel){hint}")
    raw = hf.read_state_dict(path)
    sd = {}
    for k, v in raw.items():
        if not k.startswith(_CLIP_PREFIXES):
            raise ValueError(f"{path}: unexpected key {k!r} for a CLIPModel (expected {', '.join(_CLIP_PREFIXES)}...)")
        sd[f"clip.{k}"] = v
    config = {"projection_dim": cfg.get("projection_dim", 512), "text_config": cfg.get("text_config") or {},
              "vision_config": cfg.get("vision_config") or {}}
    return sd, config, path


def clipseg_from_clip(
    name_or_path: str | os.PathLike, decoder: Mapping[str, Any], dtype=jnp.float32, decoder_dtype=None,
    seed: int = 0,
) -> tuple[CLIPSeg, Path | None]:
    """CLIPSeg with the CLIP towers of `name_or_path` and a new decoder (torch-default init from `seed`).

    `decoder`: the decoder's `CLIPSegConfig` fields (extract_layers, reduce_dim, ...). Returns (model, the
    directory of the CLIP's tokenizer files or None).
    """
    sd, clip_cfg, tok_dir = read_clip(name_or_path)
    try:
        config = CLIPSegConfig.from_dict({**dict(decoder), **clip_cfg})
    except (TypeError, ValueError) as e:
        raise ValueError(f"init_clip {name_or_path}: {e}") from None
    sd.update(decoder_state_dict(config, seed))
    return hf.model_from_state_dict(sd, config, dtype, source=str(name_or_path), decoder_dtype=decoder_dtype,
                                    seed=seed), tok_dir


def decoder_state_dict(config: CLIPSegConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named (`decoder.*`) parameters of a freshly initialised decoder."""
    dec = CLIPSegDecoder(config, rngs=nnx.Rngs(params=seed, dropout=seed))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(dec, nnx.Param)):
        out["decoder." + hf.hf_key(path)] = hf.to_hf(str(path[-1]), np.asarray(var[...], np.float32))
    return out
