"""Original timojl/clipseg checkpoints (+ OpenAI CLIP ViT-B/16) <-> HF ``CLIPSegForImageSegmentation`` naming.

The original decoder files (``rd64-uni.pth``, ``rd64-uni-refined.pth``, ``rd16-uni.pth``) hold only the trainable decoder
parameters; the frozen CLIP backbone comes from OpenAI's checkpoint. ``original_to_hf`` merges both into the HF layout
(the same mapping as transformers' ``convert_clipseg_original_pytorch_to_hf.py``) and infers the matching HF config;
``hf_to_original`` goes back. Both read one table, ``RULES``: per original key its HF key(s) and an invertible
array transform (identity, transpose, q/k/v split).
All arrays are numpy float32; torch is needed only to read ``.pth``/``.pt`` files.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipseg_jax.weights.torch_file import UnreadableTorchFile, first_line, safe_torch_load

__all__ = ["RULES", "Rule", "Transform", "load_torch_state_dict", "openai_clip_to_hf", "original_to_hf", "hf_to_original"]

# Entries of OpenAI's TorchScript archive that are not weights (``clip.model.build_model`` deletes them).
_CLIP_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_HEAD_WIDTH = 64  # OpenAI build_model: heads = width // 64 (vision and text)
_DEFAULT_EXTRACT_LAYERS = (3, 6, 9)
_DECODER_HEADS = 4  # CLIPDensePredT default n_heads=4 for all released decoders


# ----------------------------------------------------------------------------------------------------------------------
# Reading torch files
# ----------------------------------------------------------------------------------------------------------------------
def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        # TorchScript zips hold "<archive>/constants.pkl" (torch.serialization._is_torchscript_zip).
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def _tensor_to_numpy(v: Any) -> np.ndarray:
    """torch tensor / array-like -> numpy; floating point -> float32 (OpenAI stores fp16, bf16 has no numpy dtype)."""
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    a = np.asarray(v)
    return a.astype(np.float32, copy=False) if np.issubdtype(a.dtype, np.floating) else a


def load_torch_state_dict(path: str | os.PathLike, *, allow_torchscript: bool = False) -> dict[str, np.ndarray]:
    """Read a ``torch.save``'d state dict with ``torch.load(weights_only=True)`` (never runs code from the file).

    A TorchScript archive (OpenAI's ``ViT-B-16.pt``) can only be read by executing its code via ``torch.jit.load``;
    that happens only with ``allow_torchscript=True``. Floating tensors come back as float32 numpy arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = safe_torch_load(path)
    except UnreadableTorchFile as e:
        if not _is_torchscript_archive(path):
            raise
        if not allow_torchscript:
            raise ValueError(
                f"{path}: is a TorchScript archive (loading it executes code from the file); if you trust it, pass "
                f"--allow-torchscript (main.py convert) or allow_torchscript=True (Python), or extract a plain state "
                f"dict once with: python -c \"import torch; "
                f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), 'clip_state_dict.pth')\""
            ) from e
        import torch  # safe_torch_load got this far: torch is installed

        try:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e2:
            raise ValueError(f"{path}: torch.jit.load failed ({first_line(e2)})") from e2
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; expected a plain state dict")
        out[str(k)] = _tensor_to_numpy(v)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
class _Source:
    """Tracks which source keys were consumed; shape-checked access with one-line errors."""

    def __init__(self, sd: Mapping[str, Any], what: str) -> None:
        self.sd = {k: _tensor_to_numpy(v) for k, v in sd.items()}
        self.what = what
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.sd:
            raise ValueError(f"{self.what}: missing key {key!r}")
        return tuple(self.sd[key].shape)

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"{self.what}: missing key {key!r} (expected shape {shape})")
        a = self.sd[key]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{self.what}: key {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return np.array(a, dtype=np.float32, order="C", copy=None)  # not ascontiguousarray: it turns 0-d into 1-d

    def count(self, pattern: str) -> int:
        """Number of consecutive indices n (from 0) for which some key matches pattern.format(n)."""
        rx = re.compile(pattern)
        idx = {int(m.group(1)) for k in self.sd if (m := rx.match(k))}
        n = 0
        while n in idx:
            n += 1
        if idx and n != len(idx):
            raise ValueError(f"{self.what}: non-consecutive layer indices {sorted(idx)} for pattern {pattern!r}")
        return n

    def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
        extra = sorted(k for k in self.sd if k not in self.used and not k.startswith(ignore))
        if extra:
            more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
            raise ValueError(f"{self.what}: unexpected keys {extra[:5]}{more}")


# ----------------------------------------------------------------------------------------------------------------------
# The conversion table: one rule per original key, read by both directions
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """An array transform and its inverse: one original array <-> its HF array(s)."""

    name: str
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_original: Callable[[Sequence[np.ndarray]], np.ndarray]
    hf_shapes: Callable[[tuple[int, ...]], tuple[tuple[int, ...], ...]]  # from the original array's shape


def _split_qkv(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # nn.MultiheadAttention packs [q; k; v] along dim 0.
    e = w.shape[0] // 3
    return w[:e], w[e : 2 * e], w[2 * e :]


IDENTITY = Transform("identity", lambda a: (a,), lambda parts: parts[0], lambda s: (s,))
# OpenAI projections are (in, out) matrices used as x @ P; HF Linear weights are (out, in).
TRANSPOSE = Transform("transpose", lambda a: (a.T.copy(),), lambda parts: parts[0].T.copy(), lambda s: (s[::-1],))
QKV = Transform(
    "qkv", _split_qkv, lambda parts: np.concatenate(list(parts), axis=0), lambda s: ((s[0] // 3, *s[1:]),) * 3
)


@dataclass(frozen=True)
class Rule:
    """One original key <-> its HF key(s).

    ``{i}`` in the keys is a layer index running over ``range(sizes[layers])``. ``shape`` is the original array's
    shape in terms of the sizes inferred from the weights (``"vw"``, ``"3*vw"``, ``"rd//2"``, literal ints).
    ``transform=None``: HF has no such parameter (dropped towards HF, zeros towards the original). ``refined``
    limits the rule to decoders with (True) or without (False) the refined transposed convolutions.
    """

    original: str
    hf: tuple[str, ...]
    shape: tuple[str, ...]
    transform: Transform | None = IDENTITY
    layers: str | None = None
    refined: bool | None = None

    def applies(self, sizes: Mapping[str, Any]) -> bool:
        """Whether the rule is part of a model with these sizes (the refined decoder or the plain one)."""
        return self.refined is None or self.refined == bool(sizes["refined"])

    def original_shape(self, sizes: Mapping[str, Any]) -> tuple[int, ...]:
        """The original array's shape for these sizes."""
        return tuple(_dim(t, sizes) for t in self.shape)

    def expand(self, sizes: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
        """(original key, HF keys) for every layer index."""
        idx = range(int(sizes[self.layers])) if self.layers else (None,)
        return [(self.original.format(i=i), tuple(h.format(i=i) for h in self.hf)) for i in idx]

    def matches(self, key: str, side: str = "original") -> bool:
        """Whether ``key`` (an ``"original"`` or ``"hf"`` key) is one this rule converts."""
        templates = (self.original,) if side == "original" else self.hf
        return any(re.fullmatch(re.escape(t).replace(r"\{i\}", r"\d+"), key) for t in templates)


def _dim(term: str, sizes: Mapping[str, Any]) -> int:
    if term.isdigit():
        return int(term)
    if "//" in term:
        name, q = term.split("//")
        return int(sizes[name]) // int(q)
    if "*" in term:
        f, name = term.split("*")
        return int(f) * int(sizes[name])
    return int(sizes[term])


def _wb(original: str, hf: str, w_shape: tuple[str, ...], b_shape: tuple[str, ...], **kw: Any) -> list[Rule]:
    """The weight and bias rules of one layer."""
    return [Rule(f"{original}.weight", (f"{hf}.weight",), w_shape, **kw),
            Rule(f"{original}.bias", (f"{hf}.bias",), b_shape, **kw)]


def _attention(o: str, h: str, w: str, layers: str) -> list[Rule]:
    """nn.MultiheadAttention (packed in_proj) <-> HF q/k/v/out projections."""
    return [
        Rule(f"{o}.in_proj_weight", tuple(f"{h}.{x}_proj.weight" for x in "qkv"), (f"3*{w}", w), QKV, layers),
        Rule(f"{o}.in_proj_bias", tuple(f"{h}.{x}_proj.bias" for x in "qkv"), (f"3*{w}",), QKV, layers),
        *_wb(f"{o}.out_proj", f"{h}.out_proj", (w, w), (w,), layers=layers),
    ]


def _openai_blocks(o: str, h: str, w: str, mlp: str, layers: str) -> list[Rule]:
    """OpenAI ResidualAttentionBlocks <-> HF CLIP encoder layers."""
    o, h = f"{o}.{{i}}", f"{h}.{{i}}"
    return [
        *_attention(f"{o}.attn", f"{h}.self_attn", w, layers),
        *_wb(f"{o}.ln_1", f"{h}.layer_norm1", (w,), (w,), layers=layers),
        *_wb(f"{o}.ln_2", f"{h}.layer_norm2", (w,), (w,), layers=layers),
        *_wb(f"{o}.mlp.c_fc", f"{h}.mlp.fc1", (mlp, w), (mlp,), layers=layers),
        *_wb(f"{o}.mlp.c_proj", f"{h}.mlp.fc2", (w, mlp), (w,), layers=layers),
    ]


_V, _T = "clip.vision_model", "clip.text_model"
# In the order of OpenAI's files. Sizes: see openai_clip_to_hf.
CLIP_RULES: tuple[Rule, ...] = (
    Rule("visual.class_embedding", (f"{_V}.embeddings.class_embedding",), ("vw",)),
    Rule("visual.positional_embedding", (f"{_V}.embeddings.position_embedding.weight",), ("n_pos", "vw")),
    Rule("visual.proj", ("clip.visual_projection.weight",), ("vw", "proj"), TRANSPOSE),
    Rule("visual.conv1.weight", (f"{_V}.embeddings.patch_embedding.weight",), ("vw", "n_ch", "patch", "patch")),
    *_wb("visual.ln_pre", f"{_V}.pre_layrnorm", ("vw",), ("vw",)),  # "layrnorm" is HF's spelling
    *_wb("visual.ln_post", f"{_V}.post_layernorm", ("vw",), ("vw",)),
    *_openai_blocks("visual.transformer.resblocks", f"{_V}.encoder.layers", "vw", "v_mlp", "v_layers"),
    Rule("token_embedding.weight", (f"{_T}.embeddings.token_embedding.weight",), ("vocab", "tw")),
    Rule("positional_embedding", (f"{_T}.embeddings.position_embedding.weight",), ("ctx", "tw")),
    *_openai_blocks("transformer.resblocks", f"{_T}.encoder.layers", "tw", "t_mlp", "t_layers"),
    *_wb("ln_final", f"{_T}.final_layer_norm", ("tw",), ("tw",)),
    Rule("text_projection", ("clip.text_projection.weight",), ("tw", "proj"), TRANSPOSE),
    Rule("logit_scale", ("clip.logit_scale",), ()),
)

_B, _HB = "blocks.{i}", "decoder.layers.{i}"
# In the order of the released decoder files. Sizes: see original_to_hf.
DECODER_RULES: tuple[Rule, ...] = (
    *_wb("film_mul", "decoder.film_mul", ("rd", "proj"), ("rd",)),
    *_wb("film_add", "decoder.film_add", ("rd", "proj"), ("rd",)),
    # reduce.* is created by CLIPDenseBase but unused in forward (hence the only "unexpected" keys in HF's conversion).
    Rule("reduce.weight", (), ("rd", "vw"), None),
    Rule("reduce.bias", (), ("rd",), None),
    *_wb("reduces.{i}", "decoder.reduces.{i}", ("rd", "vw"), ("rd",), layers="depth"),
    *_attention(f"{_B}.self_attn", f"{_HB}.self_attn", "rd", "depth"),
    *_wb(f"{_B}.linear1", f"{_HB}.mlp.fc1", ("d_mlp", "rd"), ("d_mlp",), layers="depth"),
    *_wb(f"{_B}.linear2", f"{_HB}.mlp.fc2", ("rd", "d_mlp"), ("rd",), layers="depth"),
    # nn.TransformerEncoderLayer (post-norm): norm1 after attention, norm2 after the MLP, as HF's layer_norm1/2.
    *_wb(f"{_B}.norm1", f"{_HB}.layer_norm1", ("rd",), ("rd",), layers="depth"),
    *_wb(f"{_B}.norm2", f"{_HB}.layer_norm2", ("rd",), ("rd",), layers="depth"),
    # HF: kernel = stride = patch_size // 4 (= k) for both transposed convs. Conv2d is (out, in, kh, kw),
    # ConvTranspose2d (in, out, kh, kw); both keep torch's layout on the two sides.
    *_wb("trans_conv.0", "decoder.transposed_convolution.0", ("rd", "rd", "3", "3"), ("rd",), refined=True),
    *_wb("trans_conv.2", "decoder.transposed_convolution.2", ("rd", "rd//2", "k", "k"), ("rd//2",), refined=True),
    *_wb("trans_conv.4", "decoder.transposed_convolution.4", ("rd//2", "1", "k", "k"), ("1",), refined=True),
    *_wb("trans_conv", "decoder.transposed_convolution", ("rd", "1", "patch", "patch"), ("1",), refined=False),
)

RULES: tuple[Rule, ...] = CLIP_RULES + DECODER_RULES


def _apply_to_hf(src: _Source, rules: Sequence[Rule], sizes: Mapping[str, Any], out: dict) -> None:
    for rule in rules:
        if rule.transform is None or not rule.applies(sizes):
            continue
        shape = rule.original_shape(sizes)
        for o, hs in rule.expand(sizes):
            out.update(zip(hs, rule.transform.to_hf(src.get(o, shape))))


def _apply_to_original(
    src: _Source, rules: Sequence[Rule], sizes: Mapping[str, Any], out: dict, include_dropped: bool
) -> None:
    for rule in rules:
        if not rule.applies(sizes):
            continue
        shape = rule.original_shape(sizes)
        for o, hs in rule.expand(sizes):
            if rule.transform is None:
                if include_dropped:
                    out[o] = np.zeros(shape, np.float32)
                continue
            parts = [src.get(h, s) for h, s in zip(hs, rule.transform.hf_shapes(shape))]
            out[o] = rule.transform.to_original(parts)


def _split_merged(decoder_sd: Mapping[str, Any], clip_sd: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """Separate a merged ``CLIPDensePredT.state_dict()`` (``clip_model.*`` + decoder) into decoder and CLIP parts."""
    dec, clip_from_merged = {}, {}
    for k, v in decoder_sd.items():
        if k.startswith("clip_model."):
            clip_from_merged[k[len("clip_model.") :]] = v
        elif k.startswith("model."):
            continue  # `self.model = self.clip_model.visual` registers the visual tower a second time
        else:
            dec[k] = v
    if clip_from_merged and clip_sd is not None:
        raise ValueError("decoder_sd already contains CLIP weights (clip_model.*) and clip_sd was given too: pass only one")
    if clip_sd is None:
        if not clip_from_merged:
            raise ValueError("no CLIP weights: pass clip_sd (OpenAI ViT-B/16 state dict) or a merged dict with clip_model.* keys")
        clip_sd = clip_from_merged
    clip = {k: v for k, v in clip_sd.items() if k not in _CLIP_META_KEYS}
    return dec, clip


def openai_clip_to_hf(clip_sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """OpenAI CLIP state dict (``clip.load(...)[0].state_dict()``) -> (the ``clip.*`` keys of an HF CLIPSeg state
    dict, ``{"projection_dim", "text_config", "vision_config"}`` of its HF config). Sizes are inferred like
    OpenAI's ``build_model``."""
    clip = _Source({k: v for k, v in clip_sd.items() if k not in _CLIP_META_KEYS}, "CLIP state dict")
    out: dict[str, np.ndarray] = {}

    # --- CLIP sizes, inferred like OpenAI's build_model ---------------------------------------------------------------
    conv_shape = clip.shape("visual.conv1.weight")  # (W, 3, p, p)
    if len(conv_shape) != 4 or conv_shape[2] != conv_shape[3]:
        raise ValueError(f"CLIP state dict: key 'visual.conv1.weight' has shape {conv_shape}, expected (width, C, p, p)")
    vw, n_ch, patch = conv_shape[0], conv_shape[1], conv_shape[2]
    n_pos = clip.shape("visual.positional_embedding")[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise ValueError(f"CLIP state dict: 'visual.positional_embedding' has {n_pos} rows, expected grid**2 + 1")
    v_layers = clip.count(r"visual\.transformer\.resblocks\.(\d+)\.")
    v_mlp = clip.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    proj_dim = clip.shape("visual.proj")[-1]
    vocab, tw = clip.shape("token_embedding.weight")
    ctx = clip.shape("positional_embedding")[0]
    t_layers = clip.count(r"transformer\.resblocks\.(\d+)\.")
    t_mlp = clip.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    for name, w in (("vision", vw), ("text", tw)):
        if w % _OPENAI_HEAD_WIDTH:
            raise ValueError(f"CLIP {name} width {w} is not a multiple of {_OPENAI_HEAD_WIDTH} (OpenAI heads = width // 64)")

    sizes = dict(vw=vw, n_ch=n_ch, patch=patch, n_pos=n_pos, v_layers=v_layers, v_mlp=v_mlp, proj=proj_dim,
                 vocab=vocab, tw=tw, ctx=ctx, t_layers=t_layers, t_mlp=t_mlp)
    _apply_to_hf(clip, CLIP_RULES, sizes, out)
    clip.check_all_used()

    config = {
        "projection_dim": proj_dim,
        "text_config": {
            "vocab_size": vocab,
            "hidden_size": tw,
            "intermediate_size": t_mlp,
            "num_hidden_layers": t_layers,
            "num_attention_heads": tw // _OPENAI_HEAD_WIDTH,
            "max_position_embeddings": ctx,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            # CIDAS values: eos_token_id == 2 selects HF's legacy argmax(input_ids) pooling, as in the original CLIP.
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        "vision_config": {
            "hidden_size": vw,
            "intermediate_size": v_mlp,
            "num_hidden_layers": v_layers,
            "num_attention_heads": vw // _OPENAI_HEAD_WIDTH,
            "num_channels": n_ch,
            "image_size": grid * patch,
            "patch_size": patch,  # must be explicit: CLIPSegVisionConfig defaults to 32
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
        },
    }
    return out, config


# ----------------------------------------------------------------------------------------------------------------------
# original -> HF
# ----------------------------------------------------------------------------------------------------------------------
def original_to_hf(
    decoder_sd: Mapping[str, Any],
    clip_sd: Mapping[str, Any] | None = None,
    *,
    extract_layers: tuple[int, ...] | list[int] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Original decoder + OpenAI CLIP state dicts -> (HF ``CLIPSegForImageSegmentation`` state dict, HF config dict).

    ``decoder_sd`` may also be a merged full ``CLIPDensePredT`` state dict (``clip_model.*`` keys), then ``clip_sd`` is
    omitted. ``reduce.*`` (created but never used by the original model) and ``model.*`` duplicates are dropped.
    ``extract_layers`` defaults to [3, 6, 9] (all released checkpoints); it cannot be inferred from the weights.
    """
    dec_raw, clip_raw = _split_merged(decoder_sd, clip_sd)
    dec = _Source(dec_raw, "decoder state dict")
    out, clip_config = openai_clip_to_hf(clip_raw)
    vw, patch = clip_config["vision_config"]["hidden_size"], clip_config["vision_config"]["patch_size"]
    v_layers, proj_dim = clip_config["vision_config"]["num_hidden_layers"], clip_config["projection_dim"]

    # --- decoder ------------------------------------------------------------------------------------------------------
    rd = dec.shape("reduces.0.weight")[0]
    depth = dec.count(r"reduces\.(\d+)\.")
    n_blocks = dec.count(r"blocks\.(\d+)\.")
    if n_blocks != depth:
        raise ValueError(f"decoder state dict: {depth} reduces.N but {n_blocks} blocks.N; expected one block per reduce")
    layers = list(_DEFAULT_EXTRACT_LAYERS if extract_layers is None else extract_layers)
    if len(layers) != depth:
        raise ValueError(f"extract_layers {layers} has {len(layers)} entries, but the decoder has {depth} reduces/blocks")
    bad = [i for i in layers if not (isinstance(i, (int, np.integer)) and 0 <= i < v_layers)]
    if bad:
        raise ValueError(f"extract_layers {layers}: {bad} out of range for a {v_layers}-layer vision encoder (0..{v_layers - 1})")
    if rd % _DECODER_HEADS:
        raise ValueError(f"decoder reduce_dim {rd} (from 'reduces.0.weight') is not divisible by {_DECODER_HEADS} heads")
    d_mlp = dec.shape("blocks.0.linear1.weight")[0]
    refined = dec.has("trans_conv.0.weight")

    sizes = dict(rd=rd, d_mlp=d_mlp, depth=depth, refined=refined, vw=vw, proj=proj_dim, patch=patch, k=patch // 4)
    _apply_to_hf(dec, DECODER_RULES, sizes, out)
    # Unused reduce.* (see DECODER_RULES) and anything else under reduce. is skipped, never shape-checked.
    dec.check_all_used(ignore=("reduce.",))

    config = {
        "logit_scale_init_value": 2.6592,  # init only; the trained value is clip.logit_scale in the state dict
        "extract_layers": [int(i) for i in layers],
        "reduce_dim": rd,
        "decoder_num_attention_heads": _DECODER_HEADS,
        "decoder_attention_dropout": 0.0,
        "decoder_hidden_act": "quick_gelu",  # unused by HF (decoder MLP is ReLU); CIDAS configs carry this value
        "decoder_intermediate_size": d_mlp,
        "conditional_layer": 0,
        "use_complex_transposed_convolution": refined,
        **clip_config,
    }
    return out, config


# ----------------------------------------------------------------------------------------------------------------------
# HF -> original
# ----------------------------------------------------------------------------------------------------------------------
def hf_to_original(
    hf_sd: Mapping[str, Any], config: Mapping[str, Any] | Any, *, include_unused_reduce: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of ``original_to_hf``: HF state dict -> (original decoder state dict, OpenAI CLIP state dict).

    ``config`` is an HF config dict or ``CLIPSegConfig``. With ``include_unused_reduce`` the decoder dict also carries a
    zero ``reduce.{weight,bias}`` (D, vision width), like the released files whose ``reduce`` was never trained.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    src = _Source({k: v for k, v in hf_sd.items() if not k.endswith("position_ids")}, "HF state dict")
    for k in ("reduce_dim", "use_complex_transposed_convolution", "vision_config", "text_config"):
        if k not in cfg:
            raise ValueError(f"HF config: missing field {k!r}")
    rd, refined = int(cfg["reduce_dim"]), bool(cfg["use_complex_transposed_convolution"])
    vw, n_ch, patch, _ = src.shape("clip.vision_model.embeddings.patch_embedding.weight")
    if patch != cfg["vision_config"].get("patch_size", 32):
        raise ValueError(
            f"HF config: vision patch_size {cfg['vision_config'].get('patch_size', 32)} but patch_embedding has kernel {patch}"
        )
    n_pos = src.shape("clip.vision_model.embeddings.position_embedding.weight")[0]
    vocab, tw = src.shape("clip.text_model.embeddings.token_embedding.weight")
    ctx = src.shape("clip.text_model.embeddings.position_embedding.weight")[0]
    proj_dim = src.shape("clip.visual_projection.weight")[0]
    v_layers = src.count(r"clip\.vision_model\.encoder\.layers\.(\d+)\.")
    t_layers = src.count(r"clip\.text_model\.encoder\.layers\.(\d+)\.")
    v_mlp = src.shape("clip.vision_model.encoder.layers.0.mlp.fc1.weight")[0]
    t_mlp = src.shape("clip.text_model.encoder.layers.0.mlp.fc1.weight")[0]
    depth = src.count(r"decoder\.reduces\.(\d+)\.")
    d_mlp = src.shape("decoder.layers.0.mlp.fc1.weight")[0]

    sizes = dict(vw=vw, n_ch=n_ch, patch=patch, n_pos=n_pos, v_layers=v_layers, v_mlp=v_mlp, proj=proj_dim,
                 vocab=vocab, tw=tw, ctx=ctx, t_layers=t_layers, t_mlp=t_mlp,
                 rd=rd, d_mlp=d_mlp, depth=depth, refined=refined, k=patch // 4)
    clip: dict[str, np.ndarray] = {}
    dec: dict[str, np.ndarray] = {}
    _apply_to_original(src, CLIP_RULES, sizes, clip, include_dropped=include_unused_reduce)
    _apply_to_original(src, DECODER_RULES, sizes, dec, include_dropped=include_unused_reduce)
    src.check_all_used()
    return dec, clip
