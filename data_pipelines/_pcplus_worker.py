"""Body of a PC+ worker process (`PCPlus(..., workers=N)`); run by path with `runpy.run_path`.

Why by path: a spawned child unpickles its target by importing its module, and importing anything
under `data_pipelines` or `clipseg_jax` runs those packages' `__init__`s (the TFDS builder, i.e.
TensorFlow, and JAX/Flax): ≈ 6 s and ≈ 0.7 GB per worker for code the worker never calls. This
file registers the two packages as bare namespaces first, so unpickling the pipeline imports only
the modules `PCPlus.batch` uses (numpy, OpenCV, scipy).

The parent passes (in `init_globals`): PIPELINE (the pickled `PCPlus`), TASKS and RESULTS (queues),
LAYOUT (the pixel arrays of one shared-memory slot: [(key, shape, offset)]).
Protocol: a task is (step, slot name) or None (stop); a result is ("ok", step, small arrays) or
("error", step, message). Pixel arrays are written straight into the slot by `batch()`.
"""
from __future__ import annotations

import importlib.util
import pickle
import sys
import types


def _bare_package(name: str) -> None:
    """Make `name` importable as a package without running its __init__ until one of the names it
    defines is asked for (`from clipseg_jax import CLIPTokenizer` in a user's Source module): then
    the __init__ runs, once, in the same module object."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    mod = types.ModuleType(name)
    mod.__path__ = list(spec.submodule_search_locations)
    mod.__spec__, mod.__loader__, mod.__file__, mod.__package__ = spec, spec.loader, spec.origin, name

    def __getattr__(attr: str):  # module-level __getattr__ (PEP 562)
        if attr.startswith("__"):
            raise AttributeError(attr)
        del mod.__getattr__
        spec.loader.exec_module(mod)
        return getattr(mod, attr)

    mod.__getattr__ = __getattr__
    sys.modules[name] = mod


class _SlotPool:
    """Stands in for `PCPlus._pool` in a worker: hands out the slot's arrays of each shape in the
    order `batch()` asks for them (image then support_image; mask then support_mask)."""

    def __init__(self, arrays: dict[tuple, list]):
        self._arrays = arrays
        self._next = {shape: 0 for shape in arrays}

    def get(self, shape, dtype=None):
        shape = tuple(shape)
        i = self._next[shape]
        self._next[shape] = i + 1
        return self._arrays[shape][i]


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
    for pkg in ("clipseg_jax", "data_pipelines"):
        _bare_package(pkg)
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
                by_shape: dict[tuple, list] = {}
                for key, shape, _ in layout:
                    by_shape.setdefault(tuple(shape), []).append(views[key])
                slots[name] = (shm, views, by_shape)
            _, views, by_shape = slots[name]
            pipe._pool = _SlotPool(by_shape)
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


main(PIPELINE, TASKS, RESULTS, LAYOUT)  # noqa: F821  (globals given by runpy.run_path)
