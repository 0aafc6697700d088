"""Host batches -> global device arrays: each process builds its own PC+ shard, tokenizes the prompts to a fixed
length, and hands its rows to `jax.make_array_from_process_local_data`; validation batches likewise, padded so
that every process runs the same number of steps."""

from __future__ import annotations

import math
from typing import Iterator

import jax
import numpy as np

from clipseg_jax.tokenizer import CLIPTokenizer

#: Batch keys the train step reads, by what the recipe needs.
BASE_KEYS = ("image", "mask", "input_ids", "attention_mask")
VISUAL_KEYS = ("support_image", "support_valid")


def train_keys(with_visual: bool, support_render: str) -> tuple[str, ...]:
    keys = BASE_KEYS + (VISUAL_KEYS if with_visual else ())
    return keys + (("support_mask",) if with_visual and support_render == "device" else ())


def tokenize(tokenizer: CLIPTokenizer, prompts, length: int) -> tuple[np.ndarray, np.ndarray]:
    texts = [p.decode() if isinstance(p, bytes) else str(p) for p in prompts]
    import warnings

    with warnings.catch_warnings():  # a phrase over `length` tokens is cut (EOS kept), as CLIP's tokenize does
        warnings.simplefilter("ignore")
        return tokenizer(texts, length=length)


def to_global(local: dict[str, np.ndarray], sharding, global_batch: int) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
            for k, v in local.items()}


class TrainBatches:
    """Consecutive training batches from `start_step` as global arrays (`PCPlus.batch(step)` on every host)."""

    def __init__(self, pipeline, tokenizer: CLIPTokenizer, text_length: int, keys: tuple[str, ...], sharding,
                 global_batch: int, start_step: int):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.keys = keys
        self.sharding = sharding
        self.global_batch = global_batch
        self._it = pipeline.iterator(start_step)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        b = next(self._it)
        ids, mask = tokenize(self.tokenizer, b["prompt"], self.text_length)
        b = {**b, "input_ids": ids, "attention_mask": mask}
        return to_global({k: b[k] for k in self.keys}, self.sharding, self.global_batch)

    def close(self) -> None:
        self._it.close()


def eval_batches(source, tokenizer: CLIPTokenizer, text_length: int, image_size: int, global_batch: int,
                 sharding, process_index: int, process_count: int) -> Iterator[tuple[dict[str, jax.Array], np.ndarray]]:
    """The validation view of `source` (image squashed to image_size², mask nearest, the raw phrase; CLIPSeg's
    PhraseCut test view, `clipseg_jax.evaluate.phrasecut.eval_view`, via `pcplus.eval_dataset`), sharded over processes, as (global batch, global task index with
    -1 for padding). Every process yields the same number of batches."""
    from data_pipelines.pcplus import eval_dataset

    local = global_batch // process_count
    n_local_max = math.ceil(len(source) / process_count)
    n_batches = math.ceil(n_local_max / local)
    ds = eval_dataset(source, batch_size=local, image_size=image_size, process_index=process_index,
                      process_count=process_count).as_numpy_iterator()
    s = image_size
    for _ in range(n_batches):
        b = next(ds, None)
        n = 0 if b is None else len(b["task_index"])
        image = np.zeros((local, s, s, 3), np.uint8)
        mask = np.zeros((local, s, s), np.uint8)
        index = np.full((local,), -1, np.int64)
        phrases = ["padding"] * local
        if n:
            image[:n], mask[:n], index[:n] = b["image"], b["mask"], b["task_index"]
            phrases[:n] = list(b["phrase"])
        ids, attn = tokenize(tokenizer, phrases, text_length)
        batch = to_global({"image": image, "mask": mask, "input_ids": ids, "attention_mask": attn}, sharding,
                          global_batch)
        yield batch, to_global({"index": index}, sharding, global_batch)["index"]
