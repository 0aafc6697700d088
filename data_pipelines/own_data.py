"""Your own data through the PC+ pipeline.

Folder layout::

    my_data/
      annotations.jsonl     # one {"image": ..., "mask": ..., "phrase": ...} per line
      images/cat1.jpg ...   # any PIL/TF-decodable image (JPEG, PNG, BMP, GIF)
      masks/cat1.png ...    # PNG, same size as the image, non-zero = the object

Check a folder (counts, skipped lines) with ``python -m data_pipelines.own_data my_data``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from data_pipelines.sources import AnnotationError, OwnDataSource

__all__ = ["AnnotationError", "OwnDataSource", "main"]


def main(argv: list[str] | None = None) -> int:
    """Check a folder: every bad line with its number and what is wrong, then a summary. Exit 0 when every line
    is usable or only skipped (unreadable file, size mismatch, empty mask: warned), 1 when a line is fatal, 2 when
    the folder cannot be read at all."""
    p = argparse.ArgumentParser(description="Validate an own-data folder for the PC+ pipeline")
    p.add_argument("folder")
    p.add_argument("--validate", default="full", choices=["full", "header", "none"])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        src = OwnDataSource(a.folder, validate=a.validate)
    except AnnotationError as e:
        for problem in e.problems:
            print(f"bad line: {problem}", file=sys.stderr)
        print(f"error: {e.path}: {len(e.problems)} of {e.lines} lines cannot be used (listed above); fix or "
              f"remove them", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = Counter(src.phrases)
    print(f"{len(src)} tasks, {len(counts)} phrases, {sum(c > 1 for c in counts.values())} with a visual support, "
          f"{len(set(src.image_keys))} images; skipped: {dict(src.skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
