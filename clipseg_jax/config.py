"""CLIPSeg configuration: the fields of `transformers.CLIPSegConfig` that the PyTorch model honours.

Field names and meanings are the Hugging Face ones, so a `config.json` written by
`CLIPSegForImageSegmentation.save_pretrained` maps onto these dataclasses one to one. Missing keys take the
*transformers* defaults (note the vision `patch_size` default of 32 there: the published CLIPSeg checkpoints all
set 16, and so does `CLIPSegConfig.rd64_refined()`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32  # transformers' default; CLIPSeg checkpoints use 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPSegConfig:
    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision_config: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    extract_layers: tuple[int, ...] = (3, 6, 9)
    reduce_dim: int = 64
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 2048
    conditional_layer: int = 0
    use_complex_transposed_convolution: bool = False
    # Not an HF field: dropout of the decoder's transformer layers in training (torch's TransformerEncoderLayer
    # default, which the original used). HF's decoder has none; it only matters in train mode.
    decoder_dropout: float = 0.1

    def __post_init__(self) -> None:
        v, t = self.vision_config, self.text_config
        object.__setattr__(self, "extract_layers", tuple(int(i) for i in self.extract_layers))
        for name, cfg in (("vision_config", v), ("text_config", t)):
            if cfg.hidden_size % cfg.num_attention_heads:
                raise ValueError(
                    f"{name}.hidden_size={cfg.hidden_size} is not divisible by "
                    f"num_attention_heads={cfg.num_attention_heads}"
                )
            if cfg.hidden_act not in _ACTIVATIONS:
                raise ValueError(f"{name}.hidden_act={cfg.hidden_act!r}: expected one of {_ACTIVATIONS}")
        if self.reduce_dim % self.decoder_num_attention_heads:
            raise ValueError(
                f"reduce_dim={self.reduce_dim} is not divisible by "
                f"decoder_num_attention_heads={self.decoder_num_attention_heads}"
            )
        if not self.extract_layers:
            raise ValueError("extract_layers is empty: expected vision layer indices such as [3, 6, 9]")
        bad = [i for i in self.extract_layers if not 0 <= i < v.num_hidden_layers]
        if bad:
            raise ValueError(
                f"extract_layers={list(self.extract_layers)}: indices {bad} outside "
                f"0..{v.num_hidden_layers - 1} (vision_config.num_hidden_layers={v.num_hidden_layers})"
            )
        if self.use_complex_transposed_convolution and v.patch_size % 4:
            raise ValueError(
                f"use_complex_transposed_convolution needs vision_config.patch_size divisible by 4, "
                f"got {v.patch_size}"
            )

    # -- HF dict conversion -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPSegConfig":
        """Build from an HF `config.json` dict; unknown keys are ignored, missing keys take HF defaults."""
        d = dict(d)
        if d.get("model_type", "clipseg") != "clipseg":
            raise ValueError(f"config model_type={d.get('model_type')!r}: expected 'clipseg'")
        vision = VisionConfig(**_pick(VisionConfig, d.pop("vision_config", None) or {}))
        text = TextConfig(**_pick(TextConfig, d.pop("text_config", None) or {}))
        top = _pick(cls, d, exclude=("text_config", "vision_config"))
        return cls(text_config=text, vision_config=vision, **top)

    def to_dict(self) -> dict[str, Any]:
        """The HF `config.json` fields (plus `decoder_dropout`, which transformers ignores)."""
        d = dataclasses.asdict(self)
        d["extract_layers"] = list(self.extract_layers)
        d["model_type"] = "clipseg"
        d["architectures"] = ["CLIPSegForImageSegmentation"]
        # HF's own fields that it honours nowhere but expects to find.
        d["decoder_attention_dropout"] = 0.0
        d["decoder_hidden_act"] = "quick_gelu"
        d["text_config"]["model_type"] = "clipseg_text_model"
        d["vision_config"]["model_type"] = "clipseg_vision_model"
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "CLIPSegConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    # -- the published checkpoints ------------------------------------------------------------------------
    @classmethod
    def rd64_refined(cls) -> "CLIPSegConfig":
        return _published(64, True)

    @classmethod
    def rd64(cls) -> "CLIPSegConfig":
        return _published(64, False)

    @classmethod
    def rd16(cls) -> "CLIPSegConfig":
        return _published(16, False)


def _published(reduce_dim: int, refined: bool) -> CLIPSegConfig:
    # CIDAS configs carry the legacy text bos/eos ids 0/2, which selects argmax pooling in HF.
    return CLIPSegConfig(
        text_config=TextConfig(bos_token_id=0, eos_token_id=2),
        vision_config=VisionConfig(patch_size=16),
        reduce_dim=reduce_dim,
        use_complex_transposed_convolution=refined,
    )


def _pick(cls: type, d: Mapping[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    out = {k: v for k, v in d.items() if k in names}
    for k in ("image_size", "patch_size"):
        if isinstance(out.get(k), (list, tuple)):
            a, b = out[k]
            if a != b:
                raise ValueError(f"{k}={out[k]}: only square sizes are supported")
            out[k] = a
    if isinstance(out.get("eos_token_id"), (list, tuple)):
        out["eos_token_id"] = out["eos_token_id"][0]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if k in out and out[k] is None:
            del out[k]
    return out
