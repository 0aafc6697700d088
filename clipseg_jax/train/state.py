"""What is trained and how it is laid out: the model to start from, its trainable / frozen split, the optimizer
(the paper's AdamW + cosine), and the rule that shards parameters and optimizer state over the `fsdp` mesh axis.

The train state is a plain pytree of arrays (pure dicts, no NNX objects), so the jitted step has the dispatch
cost of bare arrays (docs/training.md):

    state  = {"step": int32, "params": trainable parameters, "opt_state": optax state, "rng": uint32 key data}
    frozen = the other parameters (the CLIP towers when `freeze_clip`)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.loading import DTYPES, from_pretrained, resolve
from clipseg_jax.model.clipseg import CLIPSeg

#: The paper's split: the decoder's parameters train, CLIP stays frozen.
DECODER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("decoder"))
#: Leaves smaller than this stay replicated under fsdp (sharding them costs more collectives than it saves).
FSDP_MIN_SIZE = 2**14


def compute_dtype(name: str, backend: str) -> Any:
    """The CLIP towers' compute dtype: `name`, or ('' ) bfloat16 on accelerators and float32 on CPU."""
    if not name:
        return jnp.float32 if backend == "cpu" else jnp.bfloat16
    return DTYPES[name]


def model_fields(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `CLIPSegConfig` fields of a config's `model` block (towers included, for a random CLIP)."""
    return {
        "extract_layers": list(m.extract_layers), "reduce_dim": m.reduce_dim,
        "decoder_num_attention_heads": m.decoder_num_attention_heads,
        "decoder_intermediate_size": m.decoder_intermediate_size, "conditional_layer": m.conditional_layer,
        "use_complex_transposed_convolution": m.use_complex_transposed_convolution,
        "decoder_dropout": m.decoder_dropout, "projection_dim": m.projection_dim,
        "vision_config": m.vision.to_dict(), "text_config": m.text.to_dict(),
    }


def build_model(config: ml_collections.ConfigDict, dtype, decoder_dtype) -> tuple[CLIPSeg, Path | None, str]:
    """The model training starts from: (model, directory with its tokenizer files or None, what it came from).

    `init` (a CLIPSeg checkpoint) gives everything; else `init_clip` gives the CLIP towers and the decoder is new
    (torch-default init from `config.seed`); else everything is random. The decoder's dropout rate is always the
    config's (`model.decoder_dropout`).
    """
    from clipseg_jax.weights import store
    from clipseg_jax.weights.clip_backbone import clipseg_from_clip

    fields = model_fields(config.model)
    if config.init:
        model = from_pretrained(config.init, dtype=dtype, decoder_dtype=decoder_dtype, seed=config.seed)
        path = resolve(config.init)
        tok = path if any((path / f).is_file() for f in store.TOKENIZER_FILES) else None
        origin = f"init={config.init}"
    elif config.init_clip:
        decoder = {k: v for k, v in fields.items() if k not in ("vision_config", "text_config", "projection_dim")}
        model, tok = clipseg_from_clip(config.init_clip, decoder, dtype, decoder_dtype, seed=config.seed)
        origin = f"init_clip={config.init_clip}"
    else:
        cfg = CLIPSegConfig.from_dict(fields)
        model = CLIPSeg(cfg, dtype=dtype, decoder_dtype=decoder_dtype,
                        rngs=nnx.Rngs(params=config.seed, dropout=config.seed))
        tok, origin = None, "random"
    set_decoder_dropout(model, config.model.decoder_dropout)
    return model, tok, origin


def set_decoder_dropout(model: CLIPSeg, rate: float) -> None:
    """Set every decoder dropout rate (not part of HF checkpoints) and record it in `model.config`."""
    import dataclasses

    for _, m in model.decoder.iter_modules():
        if isinstance(m, nnx.Dropout):
            m.rate = float(rate)
    model.config = dataclasses.replace(model.config, decoder_dropout=float(rate))


def split_model(model: CLIPSeg, freeze_clip: bool) -> tuple[nnx.GraphDef, dict, dict, dict]:
    """(graphdef, trainable parameters, frozen parameters, the rest) as pure dicts of arrays;
    `nnx.merge(graphdef, trainable, frozen, rest)` rebuilds the model. The rest are the dropout modules' RNG
    variables: the step draws its masks from explicit keys, so they are constants of the step."""
    graphdef, trainable, frozen, rest = nnx.split(model, DECODER_PARAMS if freeze_clip else nnx.Param, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen), nnx.to_pure_dict(rest)


def lr_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """torch's CosineAnnealingLR(T_max=decay_steps, eta_min=end_lr) stepped every iteration (closed form), after
    an optional linear warmup; or a constant lr."""
    if o.schedule == "constant":
        return optax.constant_schedule(o.lr)
    decay = o.decay_steps or total_steps
    if o.warmup_steps:
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, decay, o.end_lr)
    return optax.cosine_decay_schedule(o.lr, decay, alpha=o.end_lr / o.lr)


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """torch.optim.AdamW semantics (decoupled weight decay on every trainable parameter, eps outside the sqrt)."""
    schedule = lr_schedule(o, total_steps)
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx, schedule


# -- sharding ----------------------------------------------------------------------------------------------------
def make_mesh(data: int, fsdp: int, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); data = -1 takes the devices fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {n}")
    # Auto axes: the compiler propagates shardings from the explicit in/out shardings (jax 0.10's make_mesh
    # would default to Explicit axes).
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension `fsdp` divides; replicate scalars, small leaves and leaves no dimension fits."""
    if fsdp == 1 or not shape or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % fsdp == 0:
            return P(*[("fsdp" if j == i else None) for j in range(len(shape))])
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch is split over every device (data and fsdp axes): fsdp devices hold a parameter shard each and
    work on their own samples, as in FSDP/ZeRO-3."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global arrays with `shardings`. Every process holds the whole host value and hands over the
    shards its devices own, so this works across processes."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)
