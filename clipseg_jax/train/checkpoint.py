"""Training checkpoints under WORKDIR/checkpoints: orbax `CheckpointManager`, async, atomic, keep-N.

A checkpoint holds what an exact resume needs: the train state (trainable parameters, optimizer state, step, RNG
key data) and a JSON item with the data position (batches consumed + what defines the stream), the model
architecture and a fingerprint of the frozen weights (re-read from `init` / `init_clip` on resume and checked).
The JSON item is written by process 0; everything in it is the same on every process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def fingerprint(tree: Any) -> str:
    """A hash of every leaf's bytes, shape and dtype (host arrays), in tree order."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Checkpoints:
    """`save(step, state, meta)` / `restore(step, abstract_state)` over an orbax CheckpointManager."""

    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()  # orbax needs an absolute path (a relative one fails late)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (an unfinished save, e.g. killed mid-way, is not listed)."""
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
