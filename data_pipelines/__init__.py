"""Data pipelines of clipseg-jax: PhraseCut TFDS builder, PC+ tf.data pipeline, own data.

Importing this package registers the TFDS builder `phrasecut`.
"""
from data_pipelines import phrasecut  # noqa: F401  (registers the `phrasecut` TFDS builder)
from data_pipelines.phrasecut import Phrasecut  # noqa: F401


def make_pcplus(config, **overrides):
    """Build a `PCPlus` pipeline from `configs/data_phrasecut.py`-style config (plus overrides).

    Overrides go to `PCPlus` (e.g. batch_size, process_index, process_count, threads).
    """
    from data_pipelines.pcplus import PCPlus
    from data_pipelines.sources import CachedSource, OwnDataSource, TfdsSource

    if config.source == "tfds":
        source = TfdsSource(config.split, config.data_dir or None)
    elif config.source == "cached":
        source = CachedSource(config.cache_dir)
    elif config.source == "own":
        source = OwnDataSource(config.own_data_dir)
    else:
        raise ValueError(f"config.source must be 'tfds', 'cached' or 'own'; got {config.source!r}")
    kw = dict(batch_size=config.batch_size, seed=config.seed, negative_prob=config.negative_prob,
              visual_prompt_mode=config.visual_prompt_mode, image_size=config.image_size,
              support_excludes_query=config.support_excludes_query, min_crop_fg=config.min_crop_fg,
              crop_iterations=config.crop_iterations, support_render=config.get("support_render", "host"),
              workers=config.get("workers", 0))
    kw.update(overrides)
    return PCPlus(source, **kw)
