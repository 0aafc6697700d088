"""Evaluation protocols of CLIPSeg: PhraseCut (Table 3), Pascal-5i one-shot (Tables 5/7),
Pascal-VOC zero-shot (Table 4).  ``main_eval`` is the ``python main.py eval`` command.

See docs/evaluation.md for the protocols, the bugs of the released scoring scripts and
what is done instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from clipseg_jax._io import write_atomic
from clipseg_jax.evaluate._common import DatasetError

__all__ = ["DatasetError", "DATASETS", "run_eval", "main_eval", "write_json_atomic"]

DATASETS = ("phrasecut", "pascal5i", "pascal_zs")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temporary file in the target directory, then rename it over ``path``."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DatasetError(f"--output {path}: directory {parent} does not exist")
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def run_eval(engine, dataset: str, data_dir, *, split: str = "test", fold: int = 0, support: str = "visual",
             limit: int | None = None, show_progress: bool = True, workers: int | None = None) -> dict:
    """Run one protocol with an ``Engine`` (or anything with its methods); returns the result dict.
    ``workers``: threads decoding and resizing images ahead of the model (default min(8, CPUs))."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if dataset == "phrasecut":
        from clipseg_jax.evaluate import phrasecut

        return phrasecut.evaluate(engine, data_dir, split=split, limit=limit, show_progress=show_progress,
                                  workers=workers)
    if dataset == "pascal5i":
        from clipseg_jax.evaluate import pascal5i

        if split not in ("val", "test"):
            raise DatasetError(f"--split {split!r}: Pascal-5i is evaluated on the VOC2012 val list (pass val or test)")
        return pascal5i.evaluate(engine, data_dir, fold=fold, support=support, limit=limit,
                                 show_progress=show_progress, workers=workers)
    if dataset == "pascal_zs":
        from clipseg_jax.evaluate import pascal_zs

        return pascal_zs.evaluate(engine, data_dir, split=split, limit=limit, show_progress=show_progress,
                                  workers=workers)
    raise DatasetError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def _validate_args(args) -> None:
    if args.dataset not in DATASETS:
        raise DatasetError(f"--dataset {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    if args.batch_size is None or args.batch_size < 1:
        raise DatasetError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {args.limit}")
    if getattr(args, "dtype", "float32") not in ("float32", "bfloat16"):
        raise DatasetError(f"--dtype {args.dtype!r}: expected float32 or bfloat16")
    if args.dataset == "pascal5i":
        if args.fold not in (-1, 0, 1, 2, 3):
            raise DatasetError(f"--fold {args.fold}: Pascal-5i folds are 0, 1, 2, 3 (or -1 for all four)")
        if getattr(args, "support", "visual") not in ("visual", "text"):
            raise DatasetError(f"--support {args.support!r}: expected visual or text")
    if args.output is not None:
        parent = Path(args.output).expanduser().parent
        if not parent.is_dir():
            raise DatasetError(f"--output {args.output}: directory {parent} does not exist")


def main_eval(args) -> int:
    """``python main.py eval``: evaluate a checkpoint, print a paper-style table, write JSON.

    args: checkpoint, dataset, data_dir, fold, output, batch_size, dtype, limit, support,
    split (see main.py).  Returns the exit code: 0 ok, 2 bad input / missing data (one line
    ``error: ...`` on stderr; set CLIPSEG_JAX_DEBUG=1 for the traceback).
    """
    from clipseg_jax.evaluate import paper

    try:
        _validate_args(args)
        # Look at the data before loading the model, so a wrong --data-dir fails fast.
        _precheck_data(args)
        from clipseg_jax.compile_cache import enable_compilation_cache
        from clipseg_jax.evaluate._engine import Engine

        enable_compilation_cache()
        t0 = time.time()
        engine = Engine.load(args.checkpoint, dtype=getattr(args, "dtype", "float32"), batch_size=args.batch_size)
        support = getattr(args, "support", "visual") or "visual"
        result = run_eval(engine, args.dataset, args.data_dir, split=args.split or "test", fold=args.fold,
                          support=support, limit=args.limit)
        result = {
            "dataset": args.dataset,
            "checkpoint": str(args.checkpoint),
            "data_dir": str(args.data_dir),
            "split": args.split,
            "dtype": getattr(args, "dtype", "float32"),
            "batch_size": args.batch_size,
            "limit": args.limit,
            "seconds": round(time.time() - t0, 1),
            **result,
            "paper": paper.reference(args.dataset, support),
        }
        print(paper.format_table(args.dataset, result, support=support))
        if args.output is not None:
            path = write_json_atomic(args.output, result)
            print(f"metrics written to {path}")
        return 0
    except (DatasetError, FileNotFoundError, OSError, ValueError) as e:
        if os.environ.get("CLIPSEG_JAX_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _precheck_data(args) -> None:
    if args.dataset == "phrasecut":
        from clipseg_jax.evaluate import phrasecut

        phrasecut.read_tasks(args.data_dir, args.split or "test")
    elif args.dataset == "pascal5i":
        from clipseg_jax.evaluate import pascal5i

        pascal5i.read_list(pascal5i.find_voc_root(args.data_dir))
    else:
        from clipseg_jax.evaluate import pascal_zs

        split = args.split or "test"
        pascal_zs.read_split(args.data_dir, "val" if split == "test" else split)
