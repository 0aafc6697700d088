"""CLIPSeg's trainable decoder: token-wise reductions of the CLIP activations, FiLM conditioning, post-LN
transformer layers, and the plain or refined ("complex") transposed-convolution head (HF `CLIPSegDecoder`)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clip import MLP, Attention, dense, layer_norm

Array = jax.Array


def _uniform_(var: nnx.Param, key: Array, bound: float) -> None:
    var[...] = jax.random.uniform(key, var.shape, var.dtype, -bound, bound)


def _torch_default_init_(layer: nnx.Linear | nnx.Conv, rngs: nnx.Rngs) -> None:
    """torch's default init of nn.Linear / nn.Conv2d (kaiming_uniform(a=sqrt(5))): weight and bias
    U(±1/sqrt(fan_in)), fan_in = in_features * kernel area."""
    bound = 1.0 / math.sqrt(math.prod(layer.kernel.shape[:-1]))
    _uniform_(layer.kernel, rngs.params(), bound)
    _uniform_(layer.bias, rngs.params(), bound)


def torch_linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear initialised like torch's `nn.Linear`."""
    lin = dense(n_in, n_out, dtype, rngs)
    _torch_default_init_(lin, rngs)
    return lin


def _dropout_site(dropout: nnx.Dropout, key: Array | None, deterministic: bool | None):
    """`dropout` drawing its mask from `key` if one is given; off if `deterministic`; else as the module's mode
    (`model.train()` / `model.eval()`) says."""
    if key is not None:
        return functools.partial(dropout, deterministic=False, rngs=key)
    if deterministic:
        return functools.partial(dropout, deterministic=True)
    return dropout


def resolve_pair_chunk(pair_chunk: int | None | str, device: jax.Device) -> int | None:
    """The decoder's `pair_chunk` for computations running on `device`: "auto" gives 1 on a CPU and None (one
    batched pass) elsewhere; None or an int >= 1 are returned as given."""
    if pair_chunk == "auto":
        # On CPU the decoder is memory-bound: a batch's (pairs, 4 heads, 485, 485) scores and (pairs, 485, 2048)
        # MLP activations fall out of cache, one pair's stay in it (16 pairs: ~1.25 s batched, ~0.41 s one at a
        # time). Accelerators want the one batched pass.
        return 1 if device.platform == "cpu" else None
    _check_pair_chunk(pair_chunk)
    return pair_chunk


def _check_pair_chunk(pair_chunk) -> None:
    if pair_chunk is not None and (isinstance(pair_chunk, bool) or not isinstance(pair_chunk, int) or pair_chunk < 1):
        raise ValueError(f"pair_chunk must be None, 'auto' or an int >= 1, got {pair_chunk!r}")


class DecoderLayer(nnx.Module):
    """torch `TransformerEncoderLayer` defaults (post-LN, ReLU MLP): LN1(x + attn(x)), then LN2(x + mlp(x)).

    Dropout sits where torch puts it (attention probabilities, after attention, after the ReLU, after the MLP). It
    is active when a `dropout_key` is passed (the trainer: masks are a function of that key), off when
    `deterministic=True` is, and otherwise as the module's mode says (`model.train()`: masks from the modules' own
    RNG streams; `model.eval()`, the default: off).
    Initialised like the original's `nn.TransformerEncoderLayer`: q/k/v xavier-uniform over the packed (3d, d)
    `in_proj_weight` with zero bias, out_proj torch-Linear weight with zero bias, MLP torch-Linear.
    """

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, dropout: float, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(dim, heads, dtype=dtype, dropout=dropout, normalize_after=False, rngs=rngs)
        a = self.self_attn
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            _uniform_(proj.kernel, rngs.params(), math.sqrt(6.0 / (dim + 3 * dim)))
            proj.bias[...] = jnp.zeros_like(proj.bias[...])
        _uniform_(a.out_proj.kernel, rngs.params(), 1.0 / math.sqrt(dim))
        a.out_proj.bias[...] = jnp.zeros_like(a.out_proj.bias[...])
        self.layer_norm1 = layer_norm(dim, eps, dtype, rngs)
        self.mlp = MLP(dim, hidden, "relu", dtype=dtype, rngs=rngs)
        _torch_default_init_(self.mlp.fc1, rngs)
        _torch_default_init_(self.mlp.fc2, rngs)
        self.layer_norm2 = layer_norm(dim, eps, dtype, rngs)
        self.dropout1 = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.dropout_act = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def __call__(self, x: Array, dropout_key: Array | None = None, deterministic: bool | None = None) -> Array:
        """x: (B, L, dim). `dropout_key` / `deterministic`: see the class; both at once is a contradiction."""
        if dropout_key is not None and deterministic:
            raise ValueError("a dropout_key asks for dropout, deterministic=True for none: pass one of them")
        keys = [None] * 4 if dropout_key is None else list(jax.random.split(dropout_key, 4))
        drop1, drop_act, drop2 = (_dropout_site(m, k, deterministic) for m, k in
                                  zip((self.dropout1, self.dropout_act, self.dropout2), keys[1:]))
        x = self.layer_norm1(x + drop1(self.self_attn(x, dropout_key=keys[0], deterministic=deterministic)))
        h = self.mlp.fc2(drop_act(jax.nn.relu(self.mlp.fc1(x))))
        return self.layer_norm2(x + drop2(h))


class PatchTransposedConv(nnx.Module):
    """`torch.nn.ConvTranspose2d(c_in, c_out, k, stride=k)` for kernel == stride (every upsampling in CLIPSeg).

    The kernel is stored (kh, kw, c_out, c_in) — flax's `ConvTranspose(transpose_kernel=True)` layout, i.e. the torch
    weight `(c_in, c_out, kh, kw).transpose(2, 3, 1, 0)` like every other 4-D weight — and applied as a
    non-overlapping patch expansion (one einsum) instead of a dilated convolution.
    """

    def __init__(self, c_in: int, c_out: int, k: int, *, dtype, rngs: nnx.Rngs):
        self.k, self.dtype = k, dtype
        bound = 1.0 / math.sqrt(c_out * k * k)  # torch's default init bound for ConvTranspose2d
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k, k, c_out, c_in), minval=-bound, maxval=bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (c_out,), minval=-bound, maxval=bound))

    def __call__(self, x: Array) -> Array:
        n, h, w, _ = x.shape
        kern = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("nhwc,ijoc->nhiwjo", x.astype(self.dtype), kern)
        y = y.reshape(n, h * self.k, w * self.k, kern.shape[2])
        return y + self.bias[...].astype(self.dtype)


class ReLU(nnx.Module):
    """Parameter-free slot so the refined head's indices (0, 2, 4) match torch's `nn.Sequential`."""

    def __call__(self, x: Array) -> Array:
        return jax.nn.relu(x)


class CLIPSegDecoder(nnx.Module):
    def __init__(self, cfg: CLIPSegConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        v, d = cfg.vision_config, cfg.reduce_dim
        self.conditional_layer = cfg.conditional_layer
        # Initialised like the original's torch modules (a freshly trained decoder starts where the paper's did).
        self.film_mul = torch_linear(cfg.projection_dim, d, dtype, rngs)
        self.film_add = torch_linear(cfg.projection_dim, d, dtype, rngs)
        self.reduces = nnx.List([torch_linear(v.hidden_size, d, dtype, rngs) for _ in cfg.extract_layers])
        self.layers = nnx.List(
            [
                DecoderLayer(
                    d, cfg.decoder_num_attention_heads, cfg.decoder_intermediate_size, v.layer_norm_eps,
                    cfg.decoder_dropout, dtype=dtype, rngs=rngs,
                )
                for _ in cfg.extract_layers
            ]
        )
        if cfg.use_complex_transposed_convolution:
            k = v.patch_size // 4
            conv = nnx.Conv(d, d, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
            _torch_default_init_(conv, rngs)
            self.transposed_convolution = nnx.List(
                [
                    conv,
                    ReLU(),
                    PatchTransposedConv(d, d // 2, k, dtype=dtype, rngs=rngs),
                    ReLU(),
                    PatchTransposedConv(d // 2, 1, k, dtype=dtype, rngs=rngs),
                ]
            )
        else:
            self.transposed_convolution = PatchTransposedConv(d, 1, v.patch_size, dtype=dtype, rngs=rngs)

    def reduce(self, activations: Sequence[Array]) -> list[Array]:
        """Token-wise `reduces[i]` of the activations, deepest first (the decoder's order). Linear, so it may be
        applied once per image and then repeated for every prompt of that image."""
        return [r(a) for a, r in zip(activations[::-1], self.reduces)]

    def _per_pair(self, reduced: Sequence[Array], conditional_embeddings: Array, dropout_key: Array | None = None,
                  deterministic: bool | None = None) -> Array:
        """FiLM, transformer layers and head for a batch of (image, condition) pairs; reduced: deepest first."""
        out = None
        for i, (a, layer) in enumerate(zip(reduced, self.layers)):
            out = a if out is None else a + out
            if i == self.conditional_layer:
                out = self.film_mul(conditional_embeddings)[:, None] * out + self.film_add(conditional_embeddings)[:, None]
            out = layer(out, None if dropout_key is None else jax.random.fold_in(dropout_key, i), deterministic)
        tokens = out[:, 1:]
        b, n, d = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"the decoder needs a square patch grid (as HF's and the original's), got {n} patch tokens"
            )
        x = tokens.reshape(b, side, side, d)
        head = self.transposed_convolution
        if isinstance(head, nnx.List):
            for m in head:
                x = m(x)
        else:
            x = head(x)
        return x[..., 0]

    def __call__(self, activations: Sequence[Array], conditional_embeddings: Array, prompts_per_image: int = 1,
                 dropout_key: Array | None = None, pair_chunk: int | None = None) -> Array:
        """activations: per extract layer (N, 1+h*w, width) in extract_layers order; conditional_embeddings:
        (N*prompts_per_image, projection_dim), prompt-major within each image. Returns logits (N*K, H, W).

        `dropout_key`: dropout with masks drawn from this key (layer i uses fold_in(key, i)); None: as the modules'
        mode says (`model.eval()`, the default: none).
        `pair_chunk`: None decodes all pairs in one batched pass; an int decodes them `pair_chunk` at a time under
        `lax.map` (same logits; the caller picks it for the device, see `resolve_pair_chunk`). Chunking is for
        inference: the chunked pass never drops out, whatever the modules' mode, and refuses a `dropout_key`."""
        _check_pair_chunk(pair_chunk)
        if pair_chunk is not None and dropout_key is not None:
            raise ValueError("pair_chunk is an inference option: decoding with a dropout_key needs pair_chunk=None")
        red = self.reduce(activations)
        if prompts_per_image > 1:
            red = [jnp.repeat(r, prompts_per_image, axis=0) for r in red]
        if pair_chunk is None:
            return self._per_pair(red, conditional_embeddings, dropout_key)
        b = conditional_embeddings.shape[0]
        if b <= pair_chunk:
            return self._per_pair(red, conditional_embeddings, deterministic=True)
        # The last group is padded with zero pairs and their logits dropped (pairs are independent).
        pad = (-b) % pair_chunk
        group = lambda t: jnp.pad(t, [(0, pad)] + [(0, 0)] * (t.ndim - 1)).reshape(-1, pair_chunk, *t.shape[1:])
        out = jax.lax.map(lambda args: self._per_pair(args[0], args[1], deterministic=True),
                          ([group(r) for r in red], group(conditional_embeddings)))
        return out.reshape(-1, *out.shape[2:])[:b]
