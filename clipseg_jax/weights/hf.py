"""Hugging Face CLIPSeg state dict <-> our NNX parameters, both directions, by one rule per leaf.

The parameter path *is* the HF key split on dots (`clip/vision_model/encoder/layers/3/self_attn/q_proj/kernel` <->
`clip.vision_model.encoder.layers.3.self_attn.q_proj.weight`); only the leaf name and layout change:

| ours            | HF            | transform                                                             |
|-----------------|---------------|-----------------------------------------------------------------------|
| kernel, 2-D     | weight        | transpose (Linear stores (out, in))                                   |
| kernel, 4-D     | weight        | (kh, kw, a, b) <-> torch (b, a, kh, kw): Conv2d (out, in, kh, kw) and |
|                 |               | ConvTranspose2d (in, out, kh, kw) take the same permutation           |
| scale / embedding | weight      | none (LayerNorm / Embedding)                                          |
| anything else   | same name     | none (bias, class_embedding, logit_scale)                             |
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipseg_jax._io import atomic_directory
from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clipseg import CLIPSeg, seed_dropout

# Buffers and never-used weights that appear in some published files.
IGNORED_KEYS = ("clip.text_model.embeddings.position_ids", "clip.vision_model.embeddings.position_ids")

_TO_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def hf_key(path: tuple) -> str:
    """Our parameter path -> HF state-dict key."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _TO_HF_LEAF.get(leaf, leaf)])


def to_ours(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and w.ndim == 2:
        return w.T
    if leaf == "kernel" and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    return w


def to_hf(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and w.ndim == 2:
        return w.T
    if leaf == "kernel" and w.ndim == 4:
        return w.transpose(3, 2, 0, 1)
    return w


@contextlib.contextmanager
def _no_tracer_origin_messages():
    """While tracing the model's constructor, flax writes its RNG counters with `var[...] = x`, which asks each
    tracer for `.sharding`; jax answers with an AttributeError whose message names the tracer's origin, found by
    walking the whole traced program (`find_progenitors`). getattr swallows the error, but building those messages
    took 12 of the 14.6 s of `abstract_model` for ViT-B/16 (0.7 s without). Inside this block the messages are
    empty; outside, jax is untouched. Does nothing on a jax without that private method."""
    try:
        from jax._src.interpreters import partial_eval as pe

        cls = pe.DynamicJaxprTracer
        original = cls.__dict__["_origin_msg"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    cls._origin_msg = lambda self: ""
    try:
        yield
    finally:
        cls._origin_msg = original


def abstract_model(config: CLIPSegConfig, dtype=jnp.float32, decoder_dtype=None) -> CLIPSeg:
    """The model with shapes only (no random init of 150M parameters)."""
    with _no_tracer_origin_messages():
        return nnx.eval_shape(lambda: CLIPSeg(config, dtype=dtype, decoder_dtype=decoder_dtype, rngs=nnx.Rngs(0)))


def _materialize_non_params(state: nnx.State) -> nnx.State:
    def make(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)  # placeholder: reseeded (one distinct stream per module) after the merge
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(make, state)


def model_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: CLIPSegConfig, dtype=jnp.float32, source: str = "checkpoint",
    decoder_dtype=None, seed: int = 0,
) -> CLIPSeg:
    """Build a `CLIPSeg` from an HF-named state dict (numpy arrays). Parameters are stored in float32.

    A missing key or a shape mismatch raises one ValueError naming the key and both shapes; keys the model does not
    have (other than known buffers) are an error too, since they mean the config does not match the weights.
    `seed` seeds the dropout RNG streams (each dropout module gets its own stream), used in `model.train()` mode.
    """
    graphdef, flat, rest = abstract_params(config, dtype, decoder_dtype)
    leaves, used = [], set()
    for path, var in flat:
        key = hf_key(path)
        if key not in state_dict:
            raise ValueError(f"{source}: missing key {key!r} (expected shape {_torch_shape(str(path[-1]), var.shape)})")
        w = to_ours(str(path[-1]), np.asarray(state_dict[key]))
        if tuple(w.shape) != tuple(var.shape):
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(np.shape(state_dict[key]))}, the config expects "
                f"{_torch_shape(str(path[-1]), var.shape)}"
            )
        leaves.append((path, var.replace(jnp.asarray(w, jnp.float32))))
        used.add(key)
    extra = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_KEYS))
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ValueError(f"{source}: unexpected keys {extra[:5]}{more}: the config does not match these weights")
    return assemble(graphdef, leaves, rest, seed)


def abstract_params(
    config: CLIPSegConfig, dtype=jnp.float32, decoder_dtype=None
) -> tuple[nnx.GraphDef, list[tuple[tuple, nnx.Variable]], nnx.State]:
    """(graph, the abstract parameters as (path, shape-only variable) pairs, the other abstract state) of the model,
    for a loader to fill in and hand to `assemble`."""
    graphdef, params, rest = nnx.split(abstract_model(config, dtype, decoder_dtype), nnx.Param, ...)
    return graphdef, list(nnx.to_flat_state(params)), rest


def assemble(graphdef: nnx.GraphDef, leaves: list[tuple[tuple, nnx.Variable]], rest: nnx.State, seed: int = 0) -> CLIPSeg:
    """The model from `abstract_params`' graph and other state, with `leaves` (every parameter, loaded). The
    non-parameter state is created here: dropout RNG streams seeded from `seed`, one per module."""
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves), _materialize_non_params(rest))
    return seed_dropout(model, seed)


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    return tuple(to_hf(leaf, np.empty(shape, np.uint8)).shape)


def state_dict_from_model(model: CLIPSeg) -> dict[str, np.ndarray]:
    """Our parameters as an HF-named float32 state dict (contiguous numpy arrays)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[hf_key(path)] = np.array(to_hf(str(path[-1]), np.asarray(var[...], np.float32)), order="C")
    return out


# -- reading and writing HF checkpoint directories ------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load `model.safetensors` / `pytorch_model.bin` (or their sharded index) as float32 numpy arrays.

    `.bin` files are read with `torch.load(weights_only=True)`: no code from a checkpoint ever runs.
    """
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).exists():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path}: no {' / '.join(WEIGHT_FILES)} in this directory")
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: not a weight index (expected a 'weight_map' object): {e}") from None
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(read_state_dict(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    from clipseg_jax.weights.torch_file import UnreadableTorchFile, safe_torch_load

    try:
        sd = safe_torch_load(path)
    except UnreadableTorchFile as e:
        raise ValueError(f"{path}: not a PyTorch state dict readable with weights_only=True ({e.reason})") from None
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def default_processor_files(image_size: int = 352) -> dict[str, bytes]:
    """The files of a `CLIPSegProcessor` like CIDAS' (ImageNet mean/std, resize to 352 with PIL bilinear; OpenAI's
    BPE vocabulary as shipped with this package), for a checkpoint that came without them (original `.pth`
    weights, a model trained from a random or OpenAI CLIP)."""
    from clipseg_jax.tokenizer import shipped_vocab_and_merges

    vocab, merges = shipped_vocab_and_merges()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    processor = {
        "image_processor": {
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_processor_type": "ViTImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size},
        },
        "processor_class": "CLIPSegProcessor",
    }
    tok_config = {**special, "model_max_length": 77, "processor_class": "CLIPSegProcessor",
                  "tokenizer_class": "CLIPTokenizer"}

    def dump(obj) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()

    return {
        "vocab.json": dump(vocab),
        "merges.txt": ("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n").encode(),
        "tokenizer_config.json": dump(tok_config),
        "special_tokens_map.json": dump(special),
        "processor_config.json": dump(processor),
    }


def write_hf_directory(model: CLIPSeg, out_dir: str | os.PathLike,
                       extra_files: Mapping[str, str | os.PathLike | bytes] = ()) -> Path:
    """Write `config.json` + `model.safetensors` that `CLIPSegForImageSegmentation.from_pretrained` loads.

    Written to a temporary sibling directory, then renamed, so a failure leaves nothing half-written.
    `extra_files` maps file names (e.g. tokenizer files) to a source path to copy, or to the file's bytes.
    """
    import shutil

    from safetensors.numpy import save_file

    with atomic_directory(out_dir) as tmp:
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(state_dict_from_model(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, src in dict(extra_files).items():
            if isinstance(src, bytes):
                (tmp / name).write_bytes(src)
            else:
                shutil.copyfile(src, tmp / name)
    return Path(out_dir)
