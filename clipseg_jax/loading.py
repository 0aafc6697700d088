"""`from_pretrained`: one entry point for HF checkpoint directories, hub ids and our own checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clipseg import CLIPSeg
from clipseg_jax.weights import hf, store

#: The compute dtypes the loaders and commands accept, by name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

PUBLISHED = ("CIDAS/clipseg-rd64-refined", "CIDAS/clipseg-rd64", "CIDAS/clipseg-rd16")
_HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                 *store.PROCESSOR_FILES]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, fetched (or found in the cache) with huggingface_hub."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{p}: expected a checkpoint directory (config.json + weights), got a file")
        return p
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such directory, and not a hub id of the form 'owner/name'")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise OSError(
            f"{name}: not in the local Hugging Face cache and the hub is unreachable (offline: "
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it where the hub is reachable "
            f"(huggingface-cli download {name}) or pass a local directory"
        ) from None
    except HfHubHTTPError as e:
        raise OSError(f"{name}: cannot fetch from the Hugging Face hub ({e})") from None
    except Exception as e:  # offline-mode and connection errors vary across huggingface_hub versions
        raise OSError(f"{name}: cannot fetch from the Hugging Face hub ({type(e).__name__}: {e})") from None


def from_pretrained(name_or_path: str | os.PathLike, dtype=jnp.float32, decoder_dtype=None, seed: int = 0) -> CLIPSeg:
    """Load CLIPSeg from an HF directory (config.json + model.safetensors / pytorch_model.bin), a hub id, or a
    directory written by `clipseg_jax.weights.store.save` (our orbax format). `dtype` is the compute dtype of the
    CLIP towers, `decoder_dtype` the decoder's (default `dtype`); parameters stay float32. `seed` seeds the
    dropout streams used in `model.train()` mode."""
    path = resolve(name_or_path)
    if store.is_checkpoint(path):
        return store.load(path, dtype, decoder_dtype, seed)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (nor {store.MARKER}): not a CLIPSeg checkpoint directory")
    config = CLIPSegConfig.from_json_file(cfg_file)
    return hf.model_from_state_dict(hf.read_state_dict(path), config, dtype, source=str(path),
                                    decoder_dtype=decoder_dtype, seed=seed)
