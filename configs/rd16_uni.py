"""rd16-uni (ablation.yaml #5): rd64-uni with reduce_dim 16."""
from configs.common import train_config


def get_config():
    c = train_config()
    c.model.reduce_dim = 16
    return c
