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
from typing import Any, Iterable, Mapping

import jax
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


def _nested(leaves: Iterable[tuple[tuple, Any]]) -> dict:
    """(path, leaf) pairs -> the nested str-keyed dict orbax stores."""
    out: dict = {}
    for path, leaf in leaves:
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = leaf
    return out


def save(model: CLIPSeg, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `model` as our checkpoint; atomic (temporary sibling directory, then rename)."""
    # One writer: under jax.distributed (a trainer's process 0) the other processes do not take part.
    me = jax.process_index()
    single = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with atomic_directory(out_dir) as tmp:
        with ocp.StandardCheckpointer(multiprocessing_options=single) as ckptr:
            params = nnx.to_flat_state(nnx.state(model, nnx.Param))
            ckptr.save(tmp / "params", _nested((p, np.asarray(v[...], np.float32)) for p, v in params))
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
    """Load our checkpoint, restored straight into the config's abstract model. A missing, unexpected or mis-shaped
    parameter is one ValueError naming it and the checkpoint, found from the checkpoint's metadata before any array
    is read (dtypes and seed: see `hf.model_from_state_dict`)."""
    path = Path(path).absolute()
    config = read_config(path)
    graphdef, expected, rest = hf.abstract_params(config, dtype, decoder_dtype)
    params_dir = path / "params"
    with ocp.StandardCheckpointer() as ckptr:
        try:
            saved = _flat(ckptr.metadata(params_dir).item_metadata.tree)
        except Exception as e:  # orbax raises several types for a damaged directory
            raise ValueError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
        _check(saved, {_name(p): tuple(var.shape) for p, var in expected}, path)
        target = _nested((p, jax.ShapeDtypeStruct(var.shape, jnp.float32)) for p, var in expected)
        try:
            restored = _flat(ckptr.restore(params_dir, target))
        except Exception as e:
            raise ValueError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    leaves = [(p, var.replace(jnp.asarray(restored[_name(p)], jnp.float32))) for p, var in expected]
    return hf.assemble(graphdef, leaves, rest, seed)


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _flat(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict -> {"a/b/kernel": leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check(saved: Mapping, expected: Mapping[str, tuple], path: Path) -> None:
    for name, shape in expected.items():
        if name not in saved:
            raise ValueError(f"{path}: missing key {name!r} (expected shape {shape})")
        if tuple(saved[name].shape) != shape:
            raise ValueError(f"{path}: key {name!r} has shape {tuple(saved[name].shape)}, the config expects {shape}")
    extra = sorted(k for k in saved if k not in expected)
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ValueError(f"{path}: unexpected keys {extra[:5]}{more}: the config does not match these weights")
