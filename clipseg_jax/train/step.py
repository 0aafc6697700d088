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


def text_weights(key: jax.Array, support_valid: jax.Array, lo: float, hi: float) -> jax.Array:
    """Per-sample text weight: U(lo, hi), 1 where the support is invalid (the original's max(w, 1 - valid))."""
    w = jax.random.uniform(key, support_valid.shape, jnp.float32, lo, hi)
    return jnp.where(support_valid, w, 1.0)


def step_keys(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mixing key, dropout key) of a step, from the state's raw key data and the step number."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def conditioning(model, batch: Batch, mix_key: jax.Array, recipe: Recipe) -> jax.Array:
    """The conditional embedding (B, projection_dim) float32 of each sample."""
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
    if not recipe.with_visual:
        return text
    support = batch["support_image"]
    if recipe.support_render == "device":
        support = render_visual_prompts_jax(support, batch["support_mask"], batch["support_valid"],
                                            recipe.visual_prompt_mode)
    vis = model.get_image_features(normalize(support, model.dtype)).astype(jnp.float32)
    w = text_weights(mix_key, batch["support_valid"], recipe.text_weight_min, recipe.text_weight_max)[:, None]
    return w * text + (1.0 - w) * vis


def loss_fn(params, frozen, rest, graphdef, batch: Batch, keys, recipe: Recipe) -> jax.Array:
    model = nnx.merge(graphdef, params, frozen, rest)
    mix_key, dropout_key = keys
    acts = model.encode_image(normalize(batch["image"], model.dtype))
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


def make_eval_step(graphdef, rest) -> Callable:
    """eval(params, frozen, batch) -> per-sample threshold counts (B, 4, 49): the raw phrase as text condition,
    sigmoid probabilities at the batch's resolution, counted against its mask (`FixedThresholdMetrics`)."""

    def eval_step(params, frozen, batch: Batch):
        model = nnx.merge(graphdef, params, frozen, rest)
        acts = model.encode_image(normalize(batch["image"], model.dtype))
        cond = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        probs = jax.nn.sigmoid(model.decode(acts, cond).astype(jnp.float32))
        return threshold_counts(probs, batch["mask"] > 0)

    return eval_step
