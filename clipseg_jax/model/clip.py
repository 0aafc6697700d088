"""The frozen CLIP towers CLIPSeg conditions on: a ViT that returns intermediate residual streams, and the text
transformer that gives the conditional embedding.

Module and attribute names mirror `transformers.models.clipseg.modeling_clipseg` (`self_attn/q_proj`, `mlp/fc1`,
`pre_layrnorm` — sic), so the parameter tree *is* the HF state dict split on dots and weight conversion is a per-leaf
rule (see `clipseg_jax.weights.hf`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clipseg_jax.config import TextConfig, VisionConfig
from clipseg_jax.resize import torch_bicubic_matrix

Array = jax.Array


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch semantics: eps inside the sqrt, two-pass variance (flax's fast variance differs by ~1e-7 relative).
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)


def accumulate_dtype(dtype):
    """float32 accumulation for low-precision matmuls (None = the dot's default, for float32)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def matmul(x: Array, w: Array, dtype) -> Array:
    """x @ w in `dtype`, accumulated in float32 for bf16/f16: XLA:CPU takes its AMX/oneDNN path only for
    bf16 x bf16 -> f32 dots (1.46 vs 0.21 TFLOP/s for a (1940, 768) x (768, 3072) matmul on this project's Xeon);
    the result is cast back, so shapes and dtypes downstream are unchanged."""
    acc = accumulate_dtype(dtype)
    y = jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=acc)
    return y.astype(dtype)


class Dense(nnx.Linear):
    """`nnx.Linear` (same parameters, same function) computed with `matmul`: a low-precision matmul accumulates in
    float32, its result is cast back to `dtype` before the bias is added."""

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        y = matmul(x, self.kernel[...], dtype)
        return y if self.bias is None else y + self.bias[...].astype(dtype)


def dense(n_in: int, n_out: int, dtype, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return Dense(n_in, n_out, use_bias=use_bias, dtype=dtype, rngs=rngs)


def attention(q: Array, k: Array, v: Array, bias: Array | None = None, dropout=None,
              normalize_after: bool = True) -> Array:
    """Softmax attention on heads-major (B, heads, L, head_dim) tensors; scores and softmax in float32 like HF.

    Heads-major einsums are ~2x faster on XLA:CPU than `jax.nn.dot_product_attention` (which works on (B, L, heads,
    head_dim) and materialises transposes around its batched matmuls). With `normalize_after` the softmax is
    normalised after the product with v (exp(s - max) @ v / sum exp(s - max)): the same function, as accurate
    (1.42e-5 vs 1.43e-5 max error to float64 on random inputs), but the division touches the (L, head_dim) output
    instead of the (L, L) scores: 2.4x faster at 485 tokens on XLA:CPU. Its gradient is less accurate where the
    true one is ~0 (the decoder's key weights), so the trained decoder normalises first, as torch does.
    `dropout`: None, or a callable applied to the attention weights (elementwise, so dropping exp(s - max) and
    normalising by the full sum is dropout of the probabilities).
    """
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias
    if not normalize_after:
        p = jax.nn.softmax(s, axis=-1)
        if dropout is not None:
            p = dropout(p)
        return jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if dropout is not None:
        e = dropout(e)
    o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / denom).astype(v.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF `CLIPSegAttention`)."""

    def __init__(self, dim: int, num_heads: int, *, dtype=jnp.float32, dropout: float = 0.0,
                 normalize_after: bool = True, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.normalize_after = normalize_after  # see `attention`
        self.dtype = dtype
        self.q_proj = dense(dim, dim, dtype, rngs)
        self.k_proj = dense(dim, dim, dtype, rngs)
        self.v_proj = dense(dim, dim, dtype, rngs)
        self.out_proj = dense(dim, dim, dtype, rngs)
        # Attention-probability dropout: only the decoder uses it (torch TransformerEncoderLayer), in training.
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout else None
        # "einsum" (default): `attention` above. "xla" / "cudnn" / "auto": `jax.nn.dot_product_attention` with
        # that implementation ("auto" lets JAX pick), for trying fused kernels on accelerators; see
        # `set_attention_implementation`. Static: part of the graph definition.
        self.implementation = "einsum"

    def __call__(self, x: Array, bias: Array | None = None, dropout_key: Array | None = None,
                 n_queries: int | None = None, deterministic: bool | None = None) -> Array:
        """`dropout_key`: a PRNG key turns on the attention-probability dropout (if the layer has one) with that
        key, whatever the module's train/eval mode; `deterministic=True` turns it off whatever the mode; neither
        keeps the mode's behaviour. `n_queries`: attend from the first n tokens only (keys and values from all):
        output (B, n, d)."""
        b, n, d = x.shape
        h = self.num_heads
        x = x.astype(self.dtype)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if n_queries is None:
            # One (d, 3d) matmul instead of three: better use of the matmul kernels, same numbers.
            w = jnp.concatenate([p.kernel[...] for p in projs], axis=1).astype(self.dtype)
            bias_qkv = jnp.concatenate([p.bias[...] for p in projs]).astype(self.dtype)
            qkv = (matmul(x, w, self.dtype) + bias_qkv).reshape(b, n, 3, h, d // h)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, heads, head_dim)
        else:
            q = self.q_proj(x[:, :n_queries]).reshape(b, n_queries, h, d // h)
            w = jnp.concatenate([p.kernel[...] for p in projs[1:]], axis=1).astype(self.dtype)
            bias_kv = jnp.concatenate([p.bias[...] for p in projs[1:]]).astype(self.dtype)
            kv = (matmul(x, w, self.dtype) + bias_kv).reshape(b, n, 2, h, d // h)
            k, v = kv[:, :, 0], kv[:, :, 1]
        nq = q.shape[1]
        drop = None
        if self.dropout is not None and dropout_key is not None:
            drop = functools.partial(self.dropout, deterministic=False, rngs=dropout_key)
        elif self.dropout is not None and not deterministic and not self.dropout.deterministic:
            drop = self.dropout
        if self.implementation != "einsum" and drop is None:
            impl = None if self.implementation == "auto" else self.implementation
            o = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                             implementation=impl)
            return self.out_proj(o.reshape(b, nq, d))
        o = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias, drop,
                      self.normalize_after)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, nq, d))


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "auto")


def set_attention_implementation(model: nnx.Module, implementation: str) -> nnx.Module:
    """Switch every `Attention` of `model` (CLIP towers and decoder) to `implementation` (see `Attention`); returns
    the model. Call it before splitting the model for jit (a `Predictor` splits it when it is made)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
    for _, module in model.iter_modules():
        if isinstance(module, Attention):
            module.implementation = implementation
    return model


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = dense(dim, hidden, dtype, rngs)
        self.fc2 = dense(hidden, dim, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN CLIP block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig | TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.self_attn = Attention(d, cfg.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(d, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(d, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, x: Array, bias: Array | None = None) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))

    def first_token(self, x: Array) -> Array:
        """The block's output at the first (class) token only, (B, 1, D): all a pooled-only pass needs of its
        last block (attention from that token to all, the MLP on that token)."""
        c = x[:, :1] + self.self_attn(self.layer_norm1(x), n_queries=1)
        return c + self.mlp(self.layer_norm2(c))


class Encoder(nnx.Module):
    def __init__(self, cfg: VisionConfig | TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class VisionEmbeddings(nnx.Module):
    """Patch conv + class token + position embeddings, bicubically resampled (PyTorch semantics) to the input grid."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)) * 0.02)
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dtype, rngs=rngs
        )
        self.position_embedding = nnx.Embed(cfg.num_positions, d, dtype=dtype, rngs=rngs)

    def position_table(self, grid_h: int, grid_w: int) -> Array:
        """The (1 + grid_h*grid_w, D) position table for a grid_h x grid_w patch grid (HF `interpolate_pos_encoding`)."""
        table = self.position_embedding.embedding[...]
        n = table.shape[0] - 1
        side = int(round(n**0.5))
        if grid_h * grid_w == n and grid_h == grid_w:
            return table
        mh = jnp.asarray(torch_bicubic_matrix(side, grid_h), table.dtype)
        mw = jnp.asarray(torch_bicubic_matrix(side, grid_w), table.dtype)
        grid = table[1:].reshape(side, side, -1)
        grid = jnp.einsum("ai,bj,ijc->abc", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([table[:1], grid.reshape(grid_h * grid_w, -1)], axis=0)

    def __call__(self, pixel_values: Array) -> Array:
        x = self.patch_embedding(pixel_values)  # (B, h, w, D), row-major tokens like torch's flatten(2)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_table(h, w).astype(x.dtype)


class VisionTransformer(nnx.Module):
    """CLIP ViT (HF `CLIPSegVisionTransformer`) that returns the residual stream after chosen blocks."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)

    def __call__(
        self, pixel_values: Array, extract_layers: Sequence[int] = (), pooled: bool = False
    ) -> tuple[list[Array], Array | None]:
        """Returns ([residual stream after block i for i in extract_layers], pooled CLS or None).

        Only the blocks something needs are run: up to max(extract_layers), or all of them when `pooled`.
        """
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        layers = self.encoder.layers
        last = len(layers) if pooled else max(extract_layers, default=-1) + 1
        taken = {}
        for i in range(last):
            if pooled and i == last - 1 and i not in extract_layers:
                x = layers[i].first_token(x)  # only the class token is read after the last block
            else:
                x = layers[i](x)
            if i in extract_layers:
                taken[i] = x
        pooled_out = self.post_layernorm(x[:, 0]) if pooled else None
        return [taken[i] for i in extract_layers], pooled_out


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: Array) -> Array:
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.embedding[:n].astype(self.token_embedding.dtype)


class TextTransformer(nnx.Module):
    """Causal CLIP text transformer; returns the final-LN feature at the EOS position (before projection)."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        n = input_ids.shape[1]
        if n > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {n} tokens: at most max_position_embeddings={self.cfg.max_position_embeddings}"
            )
        x = self.embeddings(input_ids)
        allowed = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        for layer in self.encoder.layers:
            x = layer(x, bias)
        x = self.final_layer_norm(x)
        if self.cfg.eos_token_id == 2:
            # Legacy CIDAS configs (eos_token_id 2): HF and the original pool at argmax(ids), the EOT token 49407.
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax((input_ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


class CLIPModel(nnx.Module):
    """HF `CLIPSegModel`'s parameters (the `clip.` prefix of the segmentation checkpoint)."""

    def __init__(
        self, text: TextConfig, vision: VisionConfig, projection_dim: int, logit_scale: float,
        *, dtype=jnp.float32, rngs: nnx.Rngs,
    ):
        self.text_model = TextTransformer(text, dtype=dtype, rngs=rngs)
        self.vision_model = VisionTransformer(vision, dtype=dtype, rngs=rngs)
        self.visual_projection = dense(vision.hidden_size, projection_dim, dtype, rngs, use_bias=False)
        self.text_projection = dense(text.hidden_size, projection_dim, dtype, rngs, use_bias=False)
        # Unused by segmentation, kept so checkpoints round-trip.
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale, jnp.float32))

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def get_image_features(self, pixel_values: Array) -> Array:
        _, pooled = self.vision_model(pixel_values, pooled=True)
        return self.visual_projection(pooled)
