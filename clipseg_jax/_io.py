"""Writing files and directories so that a failure (or a kill) leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

# Temporary files are hidden siblings ending in this suffix, so a later run can find what a `kill -9` left.
PARTIAL_SUFFIX = ".clipseg-partial"


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; on success it is renamed to `out_dir`, on failure removed.

    `out_dir` may exist only if it is empty (it is then replaced).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not empty")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a hidden temporary sibling of `path` (unique per process and thread), then rename it over
    `path`: `path` is complete or as it was. The folder must exist."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{PARTIAL_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
