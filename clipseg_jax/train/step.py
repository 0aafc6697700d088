"""The training step, as the original's `training.py` does it (spec §3.2), and the validation step.

    text  = CLIP text features of the prompt              (frozen, no grad)
    vis   = CLIP image features of the rendered support    (frozen, no grad; full ViT, projected CLS)
    w     = U(text_weight_min, text_weight_max) per sample; w = 1 where the sample has no valid support
    cond  = w * text + (1 - w) * vis                       (text only without visual supports)
    loss  = mean BCE-with-logits(decoder(CLIP activations of the query, cond), mask)

Every random draw of a step (mixing weights, dropout masks) is a function of (state.rng, state.step), so a
resumed run repeats an unbroken one exactly. Gradients are taken with respect to the trainable part only: with
CLIP frozen, the towers run forward only (no backward pass through them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clipseg_jax.metrics import threshold_counts
from clipseg_jax.predict import normalize
from clipseg_jax.prompts_jax import render_visual_prompts_jax

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The static choices of a step (hashable: part of what is compiled)."""

    with_visual: bool = True           # visual supports mixed into the condition (the original's mix)
    text_weight_min: float = 0.0
    text_weight_max: float = 0.5
    support_render: str = "host"       # 'device': the batch has raw supports + masks, rendered here
    visual_prompt_mode: str = "crop_blur_highlight352"
    dropout: bool = True               # train-mode dropout in the decoder
    chunk: int = 0                     # > 0: CLIP passes in groups of this many samples (lax.map); 0: whole batch


def text_weights(key: jax.Array, support_valid: jax.Array, lo: float, hi: float) -> jax.Array:
    """Per-sample text weight: U(lo, hi), 1 where the support is invalid (the original's max(w, 1 - valid))."""
    w = jax.random.uniform(key, support_valid.shape, jnp.float32, lo, hi)
    return jnp.where(support_valid, w, 1.0)


def step_keys(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mixing key, dropout key) of a step, from the state's raw key data and the step number."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def in_chunks(fn: Callable, chunk: int, *xs: jax.Array) -> Any:
    """`fn(*xs)` computed `chunk` samples at a time (`lax.map`), or at once when chunk is 0 or covers the batch.

    On one CPU device a ViT pass over a whole batch falls out of cache (a batch of 4 at 352² took 1.7x the time
    of 4 single passes, docs/benchmarks.md §1); groups keep the working set small. Not for sharded batches: the
    map would run over the sharded axis.
    """
    b = xs[0].shape[0]
    if not chunk or b <= chunk:
        return fn(*xs)
    pad = (-b) % chunk
    grouped = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:]) for x in xs]
    out = jax.lax.map(lambda args: fn(*args), grouped)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:b], out)


def conditioning(model, batch: Batch, mix_key: jax.Array, recipe: Recipe) -> jax.Array:
    """The conditional embedding (B, projection_dim) float32 of each sample."""
    text = in_chunks(model.get_text_features, recipe.chunk, batch["input_ids"],
                     batch["attention_mask"]).astype(jnp.float32)
    if not recipe.with_visual:
        return text
    support = batch["support_image"]
    if recipe.support_render == "device":
        support = render_visual_prompts_jax(support, batch["support_mask"], batch["support_valid"],
                                            recipe.visual_prompt_mode)
    vis = in_chunks(lambda x: model.get_image_features(normalize(x, model.dtype)), recipe.chunk,
                    support).astype(jnp.float32)
    w = text_weights(mix_key, batch["support_valid"], recipe.text_weight_min, recipe.text_weight_max)[:, None]
    return w * text + (1.0 - w) * vis


def loss_fn(params, frozen, rest, graphdef, batch: Batch, keys, recipe: Recipe) -> jax.Array:
    model = nnx.merge(graphdef, params, frozen, rest)
    mix_key, dropout_key = keys
    acts = in_chunks(lambda x: model.encode_image(normalize(x, model.dtype)), recipe.chunk, batch["image"])
    cond = conditioning(model, batch, mix_key, recipe)
    logits = model.decode(acts, cond, dropout_key=dropout_key if recipe.dropout else None)
    target = batch["mask"].astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), target).mean()


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, recipe: Recipe) -> Callable:
    """step(state, frozen, batch) -> (state, {"loss", "grad_norm"}); jit it with the shardings (see `loop`)."""

    def train_step(state: dict[str, Any], frozen, batch: Batch):
        keys = step_keys(state["rng"], state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, rest, graphdef, batch, keys, recipe)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def make_eval_step(graphdef, rest, chunk: int = 0, pair_chunk: int | None = None) -> Callable:
    """eval(params, frozen, batch) -> per-sample threshold counts (B, 4, 49): the raw phrase as text condition,
    sigmoid probabilities at the batch's resolution, counted against its mask (`FixedThresholdMetrics`).
    `pair_chunk`: the decoder's (see `CLIPSegDecoder`); the train step never chunks (dropout needs one pass)."""

    def eval_step(params, frozen, batch: Batch):
        model = nnx.merge(graphdef, params, frozen, rest)
        acts = in_chunks(lambda x: model.encode_image(normalize(x, model.dtype)), chunk, batch["image"])
        cond = in_chunks(model.get_text_features, chunk, batch["input_ids"], batch["attention_mask"])
        probs = jax.nn.sigmoid(model.decode(acts, cond, pair_chunk=pair_chunk).astype(jnp.float32))
        return threshold_counts(probs, batch["mask"] > 0)

    return eval_step
