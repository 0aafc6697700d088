"""Our own checkpoint format for converted weights (orbax), so conversion from PyTorch runs once.

Layout of a checkpoint directory:
    clipseg_jax.json   {"format": "clipseg_jax", "version": 1, "config": <HF config dict>}
    params/            orbax StandardCheckpointer tree: the parameter tree (our layout, str keys, float32)
    processor files    the tokenizer's and image processor's files, copied from the source checkpoint when it had them
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clipseg_jax._io import atomic_directory
from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clipseg import CLIPSeg
from clipseg_jax.weights import hf

MARKER = "clipseg_jax.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# What `CLIPSegProcessor.from_pretrained` reads: the tokenizer's files and the image processor's config
# (transformers 5 writes processor_config.json, earlier versions preprocessor_config.json).
PROCESSOR_FILES = (*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json")


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def _nested(model: CLIPSeg) -> dict:
    out: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = np.asarray(var[...], np.float32)
    return out


def save(model: CLIPSeg, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `model` as our checkpoint; atomic (temporary sibling directory, then rename)."""
    import jax

    # One writer: under jax.distributed (a trainer's process 0) the other processes do not take part.
    me = jax.process_index()
    single = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with atomic_directory(out_dir) as tmp:
        with ocp.StandardCheckpointer(multiprocessing_options=single) as ckptr:
            ckptr.save(tmp / "params", _nested(model))
            ckptr.wait_until_finished()
        for name in _tokenizer_files(tokenizer_dir):
            shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        meta = {"format": "clipseg_jax", "version": FORMAT_VERSION, "config": model.config.to_dict()}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir).absolute()


def _tokenizer_files(d: str | os.PathLike | None) -> Iterable[str]:
    if d is None:
        return ()
    return [n for n in PROCESSOR_FILES if (Path(d) / n).is_file()]


def read_config(path: str | os.PathLike) -> CLIPSegConfig:
    marker = Path(path) / MARKER
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker}: not valid JSON ({e})") from None
    if meta.get("format") != "clipseg_jax" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{marker}: format {meta.get('format')!r} version {meta.get('version')!r}, expected 'clipseg_jax' "
            f"version {FORMAT_VERSION}"
        )
    try:
        return CLIPSegConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{marker}: bad 'config' ({e})") from None


def load(path: str | os.PathLike, dtype=jnp.float32, decoder_dtype=None, seed: int = 0) -> CLIPSeg:
    """Load our checkpoint; shape mismatches name the parameter and both shapes (dtypes and seed: see
    `hf.model_from_state_dict`)."""
    path = Path(path).absolute()
    config = read_config(path)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.restore(path / "params")
        except Exception as e:  # orbax raises several types for a damaged directory
            raise ValueError(f"{path / 'params'}: cannot restore parameters ({type(e).__name__}: {e})") from None
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                flat[hf.hf_key(prefix + (k,))] = hf.to_hf(k, np.asarray(v))

    walk(tree, ())
    return hf.model_from_state_dict(flat, config, dtype, source=str(path), decoder_dtype=decoder_dtype, seed=seed)
