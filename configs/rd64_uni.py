"""The paper's rd64-uni ("CLIPSeg (PC+)"): PhraseCut+, 20k steps, batch 64, AdamW 1e-3 cosine to 1e-4, 20 %
negatives, visual supports mixed with text (w ~ U(0, 0.5)), decoder dropout 0.1 (spec §3)."""
from configs.common import train_config


def get_config():
    return train_config()
