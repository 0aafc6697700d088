"""Data pipelines of clipseg-jax: PhraseCut TFDS builder, PC+ tf.data pipeline, own data.

Importing this package imports neither TensorFlow nor TFDS (worker processes import it); the TFDS builder
`phrasecut` is registered when `data_pipelines.phrasecut` is imported (`TfdsSource` does), and
`data_pipelines.Phrasecut` imports it on first use.
"""

from clipseg_jax._lazy import lazy_attributes

SOURCES = ("tfds", "cached", "own", "synthetic")


def make_source(config, apply_limit: bool = True):
    """The task `Source` a `configs/data_phrasecut.py`-style config names (its first `config.limit` tasks if
    set and `apply_limit`)."""
    from data_pipelines.sources import CachedSource, OwnDataSource, TfdsSource

    if config.source == "tfds":
        source = TfdsSource(config.split, config.data_dir or None)
    elif config.source == "cached":
        if not config.cache_dir:
            raise ValueError("data source 'cached' needs cache_dir (a folder written by sources.build_cache)")
        source = CachedSource(config.cache_dir)
    elif config.source == "own":
        if not config.own_data_dir:
            raise ValueError("data source 'own' needs own_data_dir (a folder with annotations.jsonl)")
        source = OwnDataSource(config.own_data_dir)
    elif config.source == "synthetic":
        source = TfdsSource(config.split, synthetic_data_dir(config))
    else:
        raise ValueError(f"config.source={config.source!r}: expected one of {', '.join(SOURCES)}")
    return _limited(source, config.get("limit", 0) if apply_limit else 0)


def _limited(source, limit: int):
    from data_pipelines.sources import SubsetSource

    return SubsetSource(source, range(min(int(limit), len(source)))) if limit else source


def synthetic_data_dir(config):
    """The prepared synthetic dataset's TFDS data_dir (written on first use, see `synthetic.prepare`)."""
    import os

    from data_pipelines import synthetic

    s = config.synthetic
    root = config.data_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "clipseg_jax",
        f"synthetic_shapes-{s.train_images}-{s.val_images}-{s.min_size}-{s.max_size}-{s.seed}"
        f"-o{int(s.overlap)}-g{s.grayscale_every}")
    return synthetic.prepare(root, s.train_images, s.val_images, s.min_size, s.max_size, s.seed, s.overlap,
                             s.grayscale_every)


def train_and_eval_sources(data, eval_data, eval_fraction: float = 0.1):
    """(training source, validation source) for a training config's `data` and `eval_data` blocks.

    `eval_data.source == ''` means the held-out part of the training source: PhraseCut's / the synthetic
    set's `validation` split, or, for an own-data folder, a deterministic `eval_fraction` of its images (those
    are then left out of training; `sources.held_out_split`). A cache is held out by its TFDS `validation` split.
    """
    from data_pipelines.sources import held_out_split

    ev = eval_data.copy_and_resolve_references()
    if not ev.source:
        with ev.unlocked():
            for key in ("data_dir", "own_data_dir"):  # where the training data is, unless given
                ev[key] = ev[key] or data[key]
            ev.synthetic = data.synthetic
            ev.source = {"cached": "tfds"}.get(data.source, data.source)
            ev.split = "validation"
    if data.source == "own" and ev.source == "own" and ev.own_data_dir in ("", data.own_data_dir):
        train, held = held_out_split(make_source(data, apply_limit=False), eval_fraction,
                                     relative_to=data.own_data_dir)
        return _limited(train, data.get("limit", 0)), _limited(held, ev.get("limit", 0))
    return make_source(data), make_source(ev)


def make_pcplus(config, source=None, **overrides):
    """Build a `PCPlus` pipeline from `configs/data_phrasecut.py`-style config (plus overrides).

    `source`: the task source (default: `make_source(config)`). Overrides go to `PCPlus` (e.g. batch_size,
    process_index, process_count, threads).
    """
    from data_pipelines.pcplus import PCPlus

    if source is None:
        source = make_source(config)
    kw = dict(batch_size=config.batch_size, seed=config.seed, negative_prob=config.negative_prob,
              visual_prompt_mode=config.visual_prompt_mode, image_size=config.image_size,
              support_excludes_query=config.support_excludes_query, min_crop_fg=config.min_crop_fg,
              crop_iterations=config.crop_iterations, support_render=config.get("support_render", "host"),
              workers=config.get("workers", 0), with_visual=config.get("with_visual", True))
    if config.get("templates"):
        kw["templates"] = tuple(config.templates)
    kw.update(overrides)
    return PCPlus(source, **kw)


__getattr__, __dir__ = lazy_attributes(globals(), {"Phrasecut": "data_pipelines.phrasecut"})
