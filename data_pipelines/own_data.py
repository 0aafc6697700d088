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
from collections import Counter

from data_pipelines.sources import OwnDataSource

__all__ = ["OwnDataSource", "main"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Validate an own-data folder for the PC+ pipeline")
    p.add_argument("folder")
    p.add_argument("--validate", default="full", choices=["full", "header", "none"])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    src = OwnDataSource(a.folder, validate=a.validate)
    counts = Counter(src.phrases)
    print(f"{len(src)} tasks, {len(counts)} phrases, {sum(c > 1 for c in counts.values())} with a visual support, "
          f"{len(set(src.image_keys))} images; skipped: {dict(src.skipped) or 'none'}")


if __name__ == "__main__":
    main()
