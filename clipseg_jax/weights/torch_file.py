"""The one `torch.load` of the package: `weights_only=True` (never runs code from the file), on the CPU.

Used by `weights.original.load_torch_state_dict` (original / OpenAI `.pth`/`.pt` files) and `weights.hf.read_state_dict`
(`pytorch_model.bin`). torch is imported only here, only when a torch file is read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["UnreadableTorchFile", "first_line", "safe_torch_load"]


def first_line(e: BaseException) -> str:
    """`Type: message` on one line: torch's unpickling errors run over many paragraphs of advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class UnreadableTorchFile(ValueError):
    """`torch.load(weights_only=True)` refused or failed on a file; `reason` is torch's error on one line."""

    def __init__(self, path: str, cause: BaseException) -> None:
        self.path, self.reason = path, first_line(cause)
        super().__init__(f"{path}: not a readable PyTorch state-dict checkpoint ({self.reason})")


def safe_torch_load(path: str | os.PathLike) -> Mapping[str, Any]:
    """`torch.load(path, map_location="cpu", weights_only=True)`, which must give a mapping (a state dict).

    Raises ImportError without torch, `UnreadableTorchFile` when torch cannot or will not read the file (a
    TorchScript archive among them: callers decide about those), ValueError for anything but a mapping. Every
    message is one line and names the file.
    """
    path = os.fspath(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch: pip install 'clipseg-jax[torch]'") from e
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a TorchScript zip under weights_only; the caller's error says more.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / pickle errors / ValueError
        raise UnreadableTorchFile(path, e) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping name -> tensor), got {type(obj).__name__}")
    return obj
