"""CLIPSeg, top-down like the paper's figure: CLIP image encoder -> activations -> conditional embedding (text,
visual prompt or given) -> FiLM decoder -> logits."""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clip import CLIPModel
from clipseg_jax.model.decoder import CLIPSegDecoder

Array = jax.Array


@flax.struct.dataclass
class CLIPSegOutput:
    logits: Array  # (B, H, W), before the sigmoid
    conditional_embeddings: Array  # (B, projection_dim)
    pooled_output: Array | None = None  # (B, projection_dim): visual_projection(post_layernorm(CLS)), on request


def seed_dropout(model: nnx.Module, seed: int) -> nnx.Module:
    """Give every dropout module of `model` its own RNG stream derived from `seed` (the streams `model.train()`
    draws from); returns the model."""
    tags = {s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)}
    if tags:
        nnx.reseed(model, **{t: int(seed) for t in tags})
    return model


class CLIPSeg(nnx.Module):
    """`transformers.CLIPSegForImageSegmentation` in Flax NNX (NHWC). Parameters are named as the HF state dict.

    `dtype` is the compute dtype of the CLIP towers, `decoder_dtype` that of the decoder (default: `dtype`).
    Parameters are float32 whatever the compute dtypes. Training runs the frozen towers in bfloat16 and the
    decoder in float32 (`decoder_dtype=jnp.float32`).
    """

    def __init__(self, config: CLIPSegConfig, *, dtype=jnp.float32, decoder_dtype=None,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.decoder_dtype = dtype if decoder_dtype is None else decoder_dtype
        self.clip = CLIPModel(
            config.text_config, config.vision_config, config.projection_dim, config.logit_scale_init_value,
            dtype=dtype, rngs=rngs,
        )
        self.decoder = CLIPSegDecoder(config, dtype=self.decoder_dtype, rngs=rngs)

    # -- the pieces, for callers that reuse one image encoding for many prompts ---------------------------
    def encode_image(self, pixel_values: Array) -> list[Array]:
        """Residual streams after `config.extract_layers` (each (B, 1+h*w, width)); runs only the blocks needed."""
        acts, _ = self.clip.vision_model(pixel_values.astype(self.dtype), self.config.extract_layers)
        return acts

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        return self.clip.get_text_features(input_ids, attention_mask)

    def get_image_features(self, pixel_values: Array) -> Array:
        """Visual-prompt embedding: projected post-LN class token of the (rendered) prompt image."""
        return self.clip.get_image_features(pixel_values.astype(self.dtype))

    def decode(self, activations: Sequence[Array], conditional_embeddings: Array, prompts_per_image: int = 1,
               dropout_key: Array | None = None, pair_chunk: int | None = None) -> Array:
        """Logits (N*K, H, W) of each image's K prompts; `dropout_key` turns on train-mode dropout, `pair_chunk`
        decodes the pairs that many at a time (inference only; see `CLIPSegDecoder`)."""
        return self.decoder(activations, conditional_embeddings.astype(self.decoder_dtype), prompts_per_image,
                            dropout_key, pair_chunk)

    # -- the HF-shaped forward ---------------------------------------------------------------------------
    def __call__(
        self,
        pixel_values: Array,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        conditional_pixel_values: Array | None = None,
        conditional_embeddings: Array | None = None,
        output_pooled: bool = False,
        pair_chunk: int | None = None,
    ) -> CLIPSegOutput:
        """pixel_values: (B, H, W, 3) ImageNet-normalised. Exactly one condition: input_ids (B, L) (+ attention_mask),
        conditional_pixel_values (B, H', W', 3), or conditional_embeddings (B, projection_dim). `pair_chunk`: see
        `CLIPSegDecoder`."""
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.vision_config.num_channels:
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}: expected (B, H, W, "
                f"{self.config.vision_config.num_channels}) NHWC"
            )
        b = pixel_values.shape[0]
        given = [n for n, v in (("input_ids", input_ids), ("conditional_pixel_values", conditional_pixel_values),
                                ("conditional_embeddings", conditional_embeddings)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"pass exactly one of input_ids, conditional_pixel_values, conditional_embeddings (got {given or 'none'})"
            )
        acts, pooled = self.clip.vision_model(pixel_values.astype(self.dtype), self.config.extract_layers, output_pooled)
        if pooled is not None:
            pooled = self.clip.visual_projection(pooled)
        if input_ids is not None:
            cond = self.get_text_features(input_ids, attention_mask)
        elif conditional_pixel_values is not None:
            cond = self.get_image_features(conditional_pixel_values)
        else:
            cond = conditional_embeddings
            if cond.ndim != 2 or cond.shape[1] != self.config.projection_dim:
                raise ValueError(
                    f"conditional_embeddings has shape {cond.shape}: expected (B, {self.config.projection_dim})"
                )
        if cond.shape[0] != b:
            raise ValueError(f"{given[0]} has batch {cond.shape[0]}, pixel_values has {b}: they must match")
        logits = self.decode(acts, cond, pair_chunk=pair_chunk)
        return CLIPSegOutput(logits=logits, conditional_embeddings=cond, pooled_output=pooled)
