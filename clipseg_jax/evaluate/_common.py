"""Small shared pieces of the evaluation protocols: errors, JSON reading, prefetching."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class DatasetError(ValueError):
    """Missing or malformed evaluation data; the message is one line for the user."""


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def require_dir(path: str | os.PathLike | None, flag: str = "--data-dir") -> Path:
    if path is None or str(path) == "":
        raise DatasetError(f"{flag} is required")
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{flag} {p}: no such directory")
    if not p.is_dir():
        raise DatasetError(f"{flag} {p}: not a directory")
    return p


def prefetch_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 4, ahead: int = 32) -> Iterator[R]:
    """``map(fn, items)`` in order, computed by a thread pool up to ``ahead`` items ahead
    (image decoding and NumPy resizing release the GIL for most of their time)."""
    if workers <= 1:
        for it in items:
            yield fn(it)
        return
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        pending: deque = deque()
        it = iter(items)
        for x in it:
            pending.append(ex.submit(fn, x))
            if len(pending) >= ahead:
                break
        while pending:
            fut = pending.popleft()
            for x in it:
                pending.append(ex.submit(fn, x))
                break
            yield fut.result()


def batched(iterable: Iterable[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for x in iterable:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)
