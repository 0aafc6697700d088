"""clipseg-jax: CLIPSeg (Lüddecke & Ecker, CVPR 2022) in JAX/Flax NNX.

    import clipseg_jax
    model = clipseg_jax.from_pretrained("CIDAS/clipseg-rd64-refined")      # or an HF dir / our checkpoint dir
    pred = clipseg_jax.Predictor.from_pretrained("CIDAS/clipseg-rd64-refined")
    probs = pred.predict(["cats.jpg"], ["a cat", "a remote"])              # (1, 2, H, W) in [0, 1]
"""

from typing import TYPE_CHECKING

from clipseg_jax._lazy import lazy_attributes
from clipseg_jax.config import CLIPSegConfig, TextConfig, VisionConfig

# Heavy names (jax, flax, the model) load on first use: `import clipseg_jax` stays cheap for the data
# pipelines' worker processes and for tools that only read configs.
_LAZY = {
    "CLIPSeg": "clipseg_jax.model.clipseg",
    "CLIPSegOutput": "clipseg_jax.model.clipseg",
    "CLIPTokenizer": "clipseg_jax.tokenizer",
    "Predictor": "clipseg_jax.predict",
    "from_pretrained": "clipseg_jax.loading",
}

if TYPE_CHECKING:
    from clipseg_jax.loading import from_pretrained
    from clipseg_jax.model.clipseg import CLIPSeg, CLIPSegOutput
    from clipseg_jax.predict import Predictor
    from clipseg_jax.tokenizer import CLIPTokenizer


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)


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
