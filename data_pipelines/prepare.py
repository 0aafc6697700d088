"""Prepare the `phrasecut` TFDS dataset (array_record) from a manual dir.

    python -m data_pipelines.prepare --manual_dir DIR [--data_dir ~/tensorflow_datasets]
"""
from __future__ import annotations

import argparse
import logging
import os

from data_pipelines.phrasecut import build


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manual_dir", required=True, help="folder with PhraseCut's VGPhraseCut_v0 contents")
    p.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    b = build(a.manual_dir, a.data_dir)
    print({k: v.num_examples for k, v in b.info.splits.items()}, "skipped:", dict(b.info.metadata["skipped"]))


if __name__ == "__main__":
    main()
