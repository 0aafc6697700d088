"""Where a jitted model runs: its state is committed to one device, so the jitted calls on it run there (inputs
given as host arrays follow), and the caller can pick device-dependent options from that device."""

from __future__ import annotations

from typing import TypeVar

import jax

T = TypeVar("T")


def place(state: T, device: jax.Device | None = None) -> tuple[T, jax.Device]:
    """`state` committed to `device`, and that device. Default: the device already holding the state's arrays (no
    copy). A state spread over several devices (sharded) is left as it is; its first device is returned."""
    if device is None:
        held = {d for x in jax.tree.leaves(state) if isinstance(x, jax.Array) for d in x.devices()}
        if len(held) != 1:
            return state, min(held, key=lambda d: d.id) if held else jax.devices()[0]
        (device,) = held
    return jax.device_put(state, device), device
