"""clipseg-jax: CLIPSeg (Lüddecke & Ecker, CVPR 2022) in JAX/Flax NNX.

    import clipseg_jax
    model = clipseg_jax.from_pretrained("CIDAS/clipseg-rd64-refined")      # or an HF dir / our checkpoint dir
    pred = clipseg_jax.Predictor.from_pretrained("CIDAS/clipseg-rd64-refined")
    probs = pred.predict(["cats.jpg"], ["a cat", "a remote"])              # (1, 2, H, W) in [0, 1]
"""

from clipseg_jax.config import CLIPSegConfig, TextConfig, VisionConfig
from clipseg_jax.loading import from_pretrained
from clipseg_jax.model.clipseg import CLIPSeg, CLIPSegOutput
from clipseg_jax.predict import Predictor
from clipseg_jax.tokenizer import CLIPTokenizer

__all__ = [
    "CLIPSeg",
    "CLIPSegConfig",
    "CLIPSegOutput",
    "CLIPTokenizer",
    "Predictor",
    "TextConfig",
    "VisionConfig",
    "from_pretrained",
]
__version__ = "0.1.0"
