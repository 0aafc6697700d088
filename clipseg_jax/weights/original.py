"""Original timojl/clipseg checkpoints (+ OpenAI CLIP ViT-B/16) <-> HF ``CLIPSegForImageSegmentation`` naming.

The original decoder files (``rd64-uni.pth``, ``rd64-uni-refined.pth``, ``rd16-uni.pth``) hold only the trainable decoder
parameters; the frozen CLIP backbone comes from OpenAI's checkpoint. ``original_to_hf`` merges both into the HF layout
(the same mapping as transformers' ``convert_clipseg_original_pytorch_to_hf.py``) and infers the matching HF config.
All arrays are numpy float32; torch is needed only to read ``.pth``/``.pt`` files.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["load_torch_state_dict", "openai_clip_to_hf", "original_to_hf", "hf_to_original"]

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
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch: pip install 'clipseg-jax[torch]'") from e
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a TorchScript zip under weights_only; we raise our own message below.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / pickle errors / ValueError
        if not _is_torchscript_archive(path):
            raise ValueError(f"{path}: not a readable PyTorch state-dict checkpoint ({_first_line(e)})") from e
        if not allow_torchscript:
            raise ValueError(
                f"{path}: is a TorchScript archive (loading it executes code from the file); if you trust it, pass "
                f"--allow-torchscript (main.py convert) or allow_torchscript=True (Python), or extract a plain state "
                f"dict once with: python -c \"import torch; "
                f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), 'clip_state_dict.pth')\""
            ) from e
        try:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e2:
            raise ValueError(f"{path}: torch.jit.load failed ({_first_line(e2)})") from e2
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping name -> tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; expected a plain state dict")
        out[str(k)] = _tensor_to_numpy(v)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    """`Type: message` on one line: torch's unpickling errors run over many paragraphs of advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


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


def _split_qkv(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # nn.MultiheadAttention packs [q; k; v] along dim 0.
    e = w.shape[0] // 3
    return w[:e], w[e : 2 * e], w[2 * e :]


def _map_clip_encoder(src: _Source, out: dict, orig: str, hf: str, n_layers: int, width: int, mlp: int) -> None:
    for i in range(n_layers):
        o, h = f"{orig}.{i}", f"{hf}.{i}"
        for t, shp in (("weight", (3 * width, width)), ("bias", (3 * width,))):
            q, k, v = _split_qkv(src.get(f"{o}.attn.in_proj_{t}", shp))
            out[f"{h}.self_attn.q_proj.{t}"], out[f"{h}.self_attn.k_proj.{t}"], out[f"{h}.self_attn.v_proj.{t}"] = q, k, v
        out[f"{h}.self_attn.out_proj.weight"] = src.get(f"{o}.attn.out_proj.weight", (width, width))
        out[f"{h}.self_attn.out_proj.bias"] = src.get(f"{o}.attn.out_proj.bias", (width,))
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            out[f"{h}.{b}.weight"] = src.get(f"{o}.{a}.weight", (width,))
            out[f"{h}.{b}.bias"] = src.get(f"{o}.{a}.bias", (width,))
        out[f"{h}.mlp.fc1.weight"] = src.get(f"{o}.mlp.c_fc.weight", (mlp, width))
        out[f"{h}.mlp.fc1.bias"] = src.get(f"{o}.mlp.c_fc.bias", (mlp,))
        out[f"{h}.mlp.fc2.weight"] = src.get(f"{o}.mlp.c_proj.weight", (width, mlp))
        out[f"{h}.mlp.fc2.bias"] = src.get(f"{o}.mlp.c_proj.bias", (width,))


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

    p = "clip.vision_model"
    out[f"{p}.embeddings.class_embedding"] = clip.get("visual.class_embedding", (vw,))
    out[f"{p}.embeddings.patch_embedding.weight"] = clip.get("visual.conv1.weight", (vw, n_ch, patch, patch))
    out[f"{p}.embeddings.position_embedding.weight"] = clip.get("visual.positional_embedding", (n_pos, vw))
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):  # "layrnorm" is HF's spelling
        out[f"{p}.{b}.weight"] = clip.get(f"visual.{a}.weight", (vw,))
        out[f"{p}.{b}.bias"] = clip.get(f"visual.{a}.bias", (vw,))
    _map_clip_encoder(clip, out, "visual.transformer.resblocks", f"{p}.encoder.layers", v_layers, vw, v_mlp)

    p = "clip.text_model"
    out[f"{p}.embeddings.token_embedding.weight"] = clip.get("token_embedding.weight", (vocab, tw))
    out[f"{p}.embeddings.position_embedding.weight"] = clip.get("positional_embedding", (ctx, tw))
    _map_clip_encoder(clip, out, "transformer.resblocks", f"{p}.encoder.layers", t_layers, tw, t_mlp)
    out[f"{p}.final_layer_norm.weight"] = clip.get("ln_final.weight", (tw,))
    out[f"{p}.final_layer_norm.bias"] = clip.get("ln_final.bias", (tw,))

    # OpenAI projections are (in, out) matrices used as x @ P; HF Linear weights are (out, in).
    out["clip.visual_projection.weight"] = clip.get("visual.proj", (vw, proj_dim)).T.copy()
    out["clip.text_projection.weight"] = clip.get("text_projection", (tw, proj_dim)).T.copy()
    out["clip.logit_scale"] = clip.get("logit_scale", ())
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

    for n in ("film_mul", "film_add"):
        out[f"decoder.{n}.weight"] = dec.get(f"{n}.weight", (rd, proj_dim))
        out[f"decoder.{n}.bias"] = dec.get(f"{n}.bias", (rd,))
    if refined:
        k = patch // 4  # HF: kernel = stride = patch_size // 4 for both transposed convs
        for i, (wshape, bshape) in {
            0: ((rd, rd, 3, 3), (rd,)),  # Conv2d (out, in, kh, kw)
            2: ((rd, rd // 2, k, k), (rd // 2,)),  # ConvTranspose2d (in, out, kh, kw)
            4: ((rd // 2, 1, k, k), (1,)),
        }.items():
            out[f"decoder.transposed_convolution.{i}.weight"] = dec.get(f"trans_conv.{i}.weight", wshape)
            out[f"decoder.transposed_convolution.{i}.bias"] = dec.get(f"trans_conv.{i}.bias", bshape)
    else:
        out["decoder.transposed_convolution.weight"] = dec.get("trans_conv.weight", (rd, 1, patch, patch))
        out["decoder.transposed_convolution.bias"] = dec.get("trans_conv.bias", (1,))
    for i in range(depth):
        out[f"decoder.reduces.{i}.weight"] = dec.get(f"reduces.{i}.weight", (rd, vw))
        out[f"decoder.reduces.{i}.bias"] = dec.get(f"reduces.{i}.bias", (rd,))
    for i in range(depth):
        o, h = f"blocks.{i}", f"decoder.layers.{i}"
        for t, shp in (("weight", (3 * rd, rd)), ("bias", (3 * rd,))):
            q, kk, v = _split_qkv(dec.get(f"{o}.self_attn.in_proj_{t}", shp))
            out[f"{h}.self_attn.q_proj.{t}"], out[f"{h}.self_attn.k_proj.{t}"], out[f"{h}.self_attn.v_proj.{t}"] = q, kk, v
        out[f"{h}.self_attn.out_proj.weight"] = dec.get(f"{o}.self_attn.out_proj.weight", (rd, rd))
        out[f"{h}.self_attn.out_proj.bias"] = dec.get(f"{o}.self_attn.out_proj.bias", (rd,))
        # nn.TransformerEncoderLayer (post-norm): norm1 after attention, norm2 after the MLP, as HF's layer_norm1/2.
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            out[f"{h}.{b}.weight"] = dec.get(f"{o}.{a}.weight", (rd,))
            out[f"{h}.{b}.bias"] = dec.get(f"{o}.{a}.bias", (rd,))
        out[f"{h}.mlp.fc1.weight"] = dec.get(f"{o}.linear1.weight", (d_mlp, rd))
        out[f"{h}.mlp.fc1.bias"] = dec.get(f"{o}.linear1.bias", (d_mlp,))
        out[f"{h}.mlp.fc2.weight"] = dec.get(f"{o}.linear2.weight", (rd, d_mlp))
        out[f"{h}.mlp.fc2.bias"] = dec.get(f"{o}.linear2.bias", (rd,))
    # reduce.* is created by CLIPDenseBase but unused in forward (hence the only "unexpected" keys in HF's conversion).
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

    clip: dict[str, np.ndarray] = {}

    def enc(hf: str, orig: str, n_layers: int, w: int, mlp: int, dst: dict) -> None:
        for i in range(n_layers):
            h, o = f"{hf}.{i}", f"{orig}.{i}"
            for t, shp in (("weight", (w, w)), ("bias", (w,))):
                dst[f"{o}.attn.in_proj_{t}"] = np.concatenate(
                    [src.get(f"{h}.self_attn.{x}_proj.{t}", shp) for x in "qkv"], axis=0
                )
            dst[f"{o}.attn.out_proj.weight"] = src.get(f"{h}.self_attn.out_proj.weight", (w, w))
            dst[f"{o}.attn.out_proj.bias"] = src.get(f"{h}.self_attn.out_proj.bias", (w,))
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
                dst[f"{o}.{a}.weight"] = src.get(f"{h}.{b}.weight", (w,))
                dst[f"{o}.{a}.bias"] = src.get(f"{h}.{b}.bias", (w,))
            dst[f"{o}.mlp.c_fc.weight"] = src.get(f"{h}.mlp.fc1.weight", (mlp, w))
            dst[f"{o}.mlp.c_fc.bias"] = src.get(f"{h}.mlp.fc1.bias", (mlp,))
            dst[f"{o}.mlp.c_proj.weight"] = src.get(f"{h}.mlp.fc2.weight", (w, mlp))
            dst[f"{o}.mlp.c_proj.bias"] = src.get(f"{h}.mlp.fc2.bias", (w,))

    p = "clip.vision_model"
    clip["visual.class_embedding"] = src.get(f"{p}.embeddings.class_embedding", (vw,))
    clip["visual.positional_embedding"] = src.get(f"{p}.embeddings.position_embedding.weight", (n_pos, vw))
    clip["visual.proj"] = src.get("clip.visual_projection.weight", (proj_dim, vw)).T.copy()
    clip["visual.conv1.weight"] = src.get(f"{p}.embeddings.patch_embedding.weight", (vw, n_ch, patch, patch))
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        clip[f"visual.{a}.weight"] = src.get(f"{p}.{b}.weight", (vw,))
        clip[f"visual.{a}.bias"] = src.get(f"{p}.{b}.bias", (vw,))
    enc(f"{p}.encoder.layers", "visual.transformer.resblocks", v_layers, vw, v_mlp, clip)
    p = "clip.text_model"
    clip["token_embedding.weight"] = src.get(f"{p}.embeddings.token_embedding.weight", (vocab, tw))
    clip["positional_embedding"] = src.get(f"{p}.embeddings.position_embedding.weight", (ctx, tw))
    enc(f"{p}.encoder.layers", "transformer.resblocks", t_layers, tw, t_mlp, clip)
    clip["ln_final.weight"] = src.get(f"{p}.final_layer_norm.weight", (tw,))
    clip["ln_final.bias"] = src.get(f"{p}.final_layer_norm.bias", (tw,))
    clip["text_projection"] = src.get("clip.text_projection.weight", (proj_dim, tw)).T.copy()
    clip["logit_scale"] = src.get("clip.logit_scale", ())

    dec: dict[str, np.ndarray] = {}
    for n in ("film_mul", "film_add"):
        dec[f"{n}.weight"] = src.get(f"decoder.{n}.weight", (rd, proj_dim))
        dec[f"{n}.bias"] = src.get(f"decoder.{n}.bias", (rd,))
    if include_unused_reduce:
        dec["reduce.weight"] = np.zeros((rd, vw), np.float32)
        dec["reduce.bias"] = np.zeros((rd,), np.float32)
    for i in range(depth):
        dec[f"reduces.{i}.weight"] = src.get(f"decoder.reduces.{i}.weight", (rd, vw))
        dec[f"reduces.{i}.bias"] = src.get(f"decoder.reduces.{i}.bias", (rd,))
    for i in range(depth):
        h, o = f"decoder.layers.{i}", f"blocks.{i}"
        for t, shp in (("weight", (rd, rd)), ("bias", (rd,))):
            dec[f"{o}.self_attn.in_proj_{t}"] = np.concatenate(
                [src.get(f"{h}.self_attn.{x}_proj.{t}", shp) for x in "qkv"], axis=0
            )
        dec[f"{o}.self_attn.out_proj.weight"] = src.get(f"{h}.self_attn.out_proj.weight", (rd, rd))
        dec[f"{o}.self_attn.out_proj.bias"] = src.get(f"{h}.self_attn.out_proj.bias", (rd,))
        dec[f"{o}.linear1.weight"] = src.get(f"{h}.mlp.fc1.weight", (d_mlp, rd))
        dec[f"{o}.linear1.bias"] = src.get(f"{h}.mlp.fc1.bias", (d_mlp,))
        dec[f"{o}.linear2.weight"] = src.get(f"{h}.mlp.fc2.weight", (rd, d_mlp))
        dec[f"{o}.linear2.bias"] = src.get(f"{h}.mlp.fc2.bias", (rd,))
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            dec[f"{o}.{a}.weight"] = src.get(f"{h}.{b}.weight", (rd,))
            dec[f"{o}.{a}.bias"] = src.get(f"{h}.{b}.bias", (rd,))
    if refined:
        k = patch // 4
        for i, (wshape, bshape) in {
            0: ((rd, rd, 3, 3), (rd,)),
            2: ((rd, rd // 2, k, k), (rd // 2,)),
            4: ((rd // 2, 1, k, k), (1,)),
        }.items():
            dec[f"trans_conv.{i}.weight"] = src.get(f"decoder.transposed_convolution.{i}.weight", wshape)
            dec[f"trans_conv.{i}.bias"] = src.get(f"decoder.transposed_convolution.{i}.bias", bshape)
    else:
        dec["trans_conv.weight"] = src.get("decoder.transposed_convolution.weight", (rd, 1, patch, patch))
        dec["trans_conv.bias"] = src.get("decoder.transposed_convolution.bias", (1,))
    src.check_all_used()
    return dec, clip
