"""rd64-uni-refined: rd64-uni with the complex transposed-convolution head, 50k steps (cosine T_max 50k)."""
from configs.common import train_config


def get_config():
    c = train_config()
    c.model.use_complex_transposed_convolution = True
    c.total_steps = 50000
    return c
