"""Training CLIPSeg: `python main.py train --config configs/NAME.py --workdir DIR [--config.key=value ...]`.

    config.py      configs/NAME.py + typed overrides, checked
    state.py       the model to start from, trainable / frozen split, optimizer, sharding rule
    step.py        the original's conditioning and loss, the train and validation steps
    data.py        host batches -> global device arrays (each process its own shard)
    checkpoint.py  orbax checkpoints with what an exact resume needs
    loop.py        the loop: log, checkpoint, validate, faults, the trained model
"""

from typing import TYPE_CHECKING

from clipseg_jax._lazy import lazy_attributes
from clipseg_jax.train.config import ConfigError, load_config

# The loop (jax, flax, orbax, the model) loads on first use, so that configs are read and checked without it.
_LAZY = {"TrainingError": "clipseg_jax.train.loop", "train": "clipseg_jax.train.loop"}

if TYPE_CHECKING:
    from clipseg_jax.train.loop import TrainingError, train


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)

__all__ = ["ConfigError", "TrainingError", "load_config", "train"]
