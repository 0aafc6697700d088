"""Data pipelines of clipseg-jax: PhraseCut TFDS builder, PC+ tf.data pipeline, own data.

Importing this package registers the TFDS builder `phrasecut`.
"""
from data_pipelines import phrasecut  # noqa: F401  (registers the `phrasecut` TFDS builder)
from data_pipelines.phrasecut import Phrasecut  # noqa: F401
