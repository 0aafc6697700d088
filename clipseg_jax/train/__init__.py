"""Training CLIPSeg: `python main.py train --config configs/NAME.py --workdir DIR [--config.key=value ...]`.

    config.py      configs/NAME.py + typed overrides, checked
    state.py       the model to start from, trainable / frozen split, optimizer, sharding rule
    step.py        the original's conditioning and loss, the train and validation steps
    data.py        host batches -> global device arrays (each process its own shard)
    checkpoint.py  orbax checkpoints with what an exact resume needs
    loop.py        the loop: log, checkpoint, validate, faults, the trained model
"""

from clipseg_jax.train.config import ConfigError, load_config
from clipseg_jax.train.loop import TrainingError, train

__all__ = ["ConfigError", "TrainingError", "load_config", "train"]
