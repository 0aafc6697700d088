"""Body of a PC+ worker process (`PCPlus(..., workers=N)`): `main` is the spawned process's target.

The parent passes the pickled `PCPlus`, the task and result queues and the layout of one shared-memory
slot ([(key, shape, offset)]). Protocol: a task is (step, slot name) or None (stop); a result is ("ok",
step, small arrays) or ("error", step, message). `batch()` asks the pool for each pixel array by its
field name, and gets the slot's array of that field: the pixels are written straight into the slot.
This module imports only the standard library at import time (spawn imports it in every worker).
"""
from __future__ import annotations

import pickle


class _SlotPool:
    """Stands in for `PCPlus._pool` in a worker: the slot's array of each batch field."""

    def __init__(self, views: dict):
        self._views = views

    def get(self, field, shape, dtype=None):
        view = self._views[field]
        if view.shape != tuple(shape):
            raise ValueError(f"slot array {field!r} has shape {view.shape}, batch() asked for {tuple(shape)}")
        return view


def _keep_freed_memory() -> None:
    """glibc hands freed blocks >= 128 KB back to the OS until its dynamic mmap threshold has grown
    (which a process that imported TensorFlow or JAX has long done): a fresh worker then page-faults
    and zeroes every temporary image again, 1.6x slower per batch (measured: ≈ 730 vs ≈ 1,200
    samples per CPU-second). Keep blocks up to 32 MB in the heap."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main(pipeline: bytes, tasks, results, layout) -> None:
    import os
    import queue
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it closes us)
    parent = os.getppid()
    _keep_freed_memory()
    from multiprocessing import shared_memory

    import numpy as np

    try:
        pipe = pickle.loads(pipeline)
    except Exception as e:  # noqa: BLE001  (e.g. a Source module that fails to import here)
        results.put(("error", -1, f"cannot unpickle the pipeline in a worker: {type(e).__name__}: {e}"))
        return
    slots: dict[str, tuple] = {}
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died (SIGKILL, OOM): do not linger
                return
            continue
        if task is None:
            results.cancel_join_thread()  # exit even if unread results still fill the pipe
            return
        step, name = task
        try:
            if name not in slots:
                # Attaching registers the block with the resource tracker, which a spawned worker
                # shares with its parent (a set of names): the parent's unlink unregisters it.
                shm = shared_memory.SharedMemory(name=name)
                views = {key: np.ndarray(shape, np.uint8, buffer=shm.buf, offset=off) for key, shape, off in layout}
                slots[name] = (shm, views)
            _, views = slots[name]
            pipe._pool = _SlotPool(views)
            batch = pipe.batch(step)
            # Pixel arrays not built in place (a `batch()` that bypassed the pool) are copied in;
            # copies first, so that no slot array is overwritten before it is read.
            moved = {k: np.array(v) for k, v in batch.items() if k in views and v is not views[k]}
            for key, value in moved.items():
                views[key][...] = value
            small = {k: v for k, v in batch.items() if k not in views}
            results.put(("ok", step, small))
        except Exception as e:  # noqa: BLE001  (reported to the parent, which raises it)
            results.put(("error", step, f"{type(e).__name__}: {e}"))

