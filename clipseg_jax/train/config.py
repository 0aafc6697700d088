"""Training configs: a `configs/NAME.py` file (ml_collections) plus typed `--config.key=value` overrides, checked.

The overrides are parsed by ml_collections' own config flag (absl), so `--config.mesh.fsdp=2`,
`--config.model.extract_layers=(3,6,9)` and `--config.freeze_clip=false` take the type of the field they override.
What that parser reports as a traceback (an unknown key, a malformed value) becomes one `ConfigError` line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import ml_collections

DTYPES = ("", "float32", "bfloat16")
ATTENTION = ("", "einsum", "xla", "cudnn", "auto")


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names it."""


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path` (a python file with `get_config()`) and apply `overrides` (`--config.a.b=value` strings)."""
    from absl import flags
    from ml_collections import config_flags

    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file (expected a configs/NAME.py with get_config())")
    overrides = list(overrides)
    for arg in overrides:
        if not re.match(r"^--?config\.[A-Za-z_][\w.]*(=|$)", arg):
            raise ConfigError(f"{arg!r}: expected --config.KEY=VALUE")
    argv = ["train", f"--config={path}", *overrides]
    # Check the override paths on the config alone first: the flag parser reports an unknown key as a bare
    # AttributeError.
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv[:2])
    try:
        fv(argv[:2])
        base = fv.config
    except Exception as e:  # noqa: BLE001  (a broken config file: any error of its own code)
        raise ConfigError(f"--config {path}: cannot load it ({_first_line(e)})") from None
    for arg in overrides:
        key = arg.split("=", 1)[0].split(".", 1)[1]
        _check_path(base, key, path)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except Exception as e:  # noqa: BLE001  (absl's IllegalFlagValueError and friends)
        raise ConfigError(_first_line(e)) from None
    config = fv.config
    validate(config)
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_path(config: ml_collections.ConfigDict, key: str, path: str) -> None:
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"--config.{key}: {path} has no key {part!r} at {where}"
                              + (f" (keys there: {', '.join(known)})" if known else ""))
        node = node[part]


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(c: ml_collections.ConfigDict) -> None:
    """Value checks the types alone do not make (one `ConfigError` line naming the key)."""
    from data_pipelines import SOURCES

    for key in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _need(isinstance(c[key], int) and c[key] >= 1, f"config.{key}={c[key]!r}: expected an integer >= 1")
    _need(isinstance(c.eval_every, int) and c.eval_every >= 0, f"config.eval_every={c.eval_every!r}: expected >= 0")
    _need(c.dtype in DTYPES, f"config.dtype={c.dtype!r}: expected one of {DTYPES}")
    _need(c.decoder_dtype in DTYPES[1:], f"config.decoder_dtype={c.decoder_dtype!r}: expected float32 or bfloat16")
    _need(c.attention in ATTENTION, f"config.attention={c.attention!r}: expected one of {ATTENTION}")
    _need(c.encode_chunk >= -1, f"config.encode_chunk={c.encode_chunk}: expected -1 (auto), 0 (whole batch) or >= 1")
    for block in ("data", "eval_data"):
        d = c[block]
        ok = SOURCES + (("",) if block == "eval_data" else ())
        _need(d.source in ok, f"config.{block}.source={d.source!r}: expected one of {ok}")
        _need(d.batch_size >= 1, f"config.{block}.batch_size={d.batch_size}: expected >= 1")
        _need(d.limit >= 0, f"config.{block}.limit={d.limit}: expected >= 0 (0 = all)")
        _need(1 <= d.text_length <= 77, f"config.{block}.text_length={d.text_length}: expected 1..77 (CLIP's context)")
        _need(d.support_render in ("host", "device"),
              f"config.{block}.support_render={d.support_render!r}: expected 'host' or 'device'")
    _need(c.data.image_size % c.model.vision.patch_size == 0 or bool(c.init_clip or c.init),
          f"config.data.image_size={c.data.image_size} is not a multiple of model.vision.patch_size")
    # HF's refined head: two transposed convolutions of kernel = stride = patch_size // 4, so it restores the
    # input size only for patch 16 (a patch-8 model would give half-size logits and fail inside the step).
    p = c.model.vision.patch_size
    _need(not c.model.use_complex_transposed_convolution or (p // 4) ** 2 == p or bool(c.init_clip or c.init),
          f"config.model.use_complex_transposed_convolution=True needs model.vision.patch_size=16 (its two "
          f"transposed convolutions upsample by (patch_size // 4)² = {(p // 4) ** 2}, not {p}); set it to false "
          f"for the plain head")
    m = c.mix
    _need(0.0 <= m.text_weight_min <= m.text_weight_max <= 1.0,
          f"config.mix: expected 0 <= text_weight_min <= text_weight_max <= 1, got {m.text_weight_min}, "
          f"{m.text_weight_max}")
    o = c.optimizer
    _need(o.schedule in ("cosine", "constant"), f"config.optimizer.schedule={o.schedule!r}: expected cosine or constant")
    _need(o.lr > 0 and o.end_lr >= 0, f"config.optimizer: lr={o.lr}, end_lr={o.end_lr}: expected lr > 0, end_lr >= 0")
    _need(o.warmup_steps >= 0 and o.decay_steps >= 0, "config.optimizer: warmup_steps and decay_steps must be >= 0")
    _need(c.mesh.fsdp >= 1 and (c.mesh.data == -1 or c.mesh.data >= 1),
          f"config.mesh: data={c.mesh.data}, fsdp={c.mesh.fsdp}: expected data = -1 or >= 1, fsdp >= 1")
    _need(0.0 <= c.model.decoder_dropout < 1.0, f"config.model.decoder_dropout={c.model.decoder_dropout}: expected [0, 1)")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n"
