"""A persistent XLA compilation cache for the command line, so a second call with the same model and shapes does not
compile again.

Where: `$CLIPSEG_JAX_COMPILATION_CACHE` if set (a directory; `0`, `off`, `false` or `no` turn the cache off), else
`$XDG_CACHE_HOME/clipseg_jax/xla` (`~/.cache/clipseg_jax/xla`). The cache is jax's own (`jax_compilation_cache_dir`);
its entries are keyed by the computation, the jax/XLA versions and the device, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "CLIPSEG_JAX_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The directory the cache would use, or None when it is turned off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipseg_jax" / "xla"


def enable_compilation_cache() -> Path | None:
    """Point jax's persistent compilation cache at `cache_dir()` (every compiled function, however quick to compile:
    the inference functions of a small model compile in well under jax's default 1 s threshold). Returns the
    directory, or None when turned off or not writable (then jax compiles as usual)."""
    import jax

    d = cache_dir()
    if d is None:
        return None
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(d, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d
