"""The paper's "CLIPSeg (PC)" (rd64-uni-novis): text prompts only (no visual supports, no mixing), 20 % negatives."""
from configs.common import train_config


def get_config():
    c = train_config()
    c.data.with_visual = False
    return c
