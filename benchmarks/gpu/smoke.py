"""Device smoke: tiny random checkpoint, our Predictor on the default JAX device vs transformers.

Prints max|dp| at 352 against the HF processor + model. Where torchvision is installed (as on the GPU image),
transformers' processor resizes with torchvision (uint8 antialiased bilinear), which differs from PIL's by one level
on ~0.5 % of pixels: ~0.048 in this tiny model's probabilities (docs/benchmarks.md, GPU)."""
import pathlib
import sys
import tempfile

sys.path[:0] = [".", "tests"]
import flax
import jax
import numpy as np
import torch
from tiny_models import hf_config, make_model, save_checkpoint
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from clipseg_jax.predict import Predictor

print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, flax.__file__, flush=True)
d = save_checkpoint(make_model(hf_config()), pathlib.Path(tempfile.mkdtemp()))
pred = Predictor.from_pretrained(d)
img = (np.random.default_rng(0).random((120, 90, 3)) * 255).astype(np.uint8)
texts = ["a cat", "the blue sky"]
proc = CLIPSegProcessor.from_pretrained(d)
tm = CLIPSegForImageSegmentation.from_pretrained(d).eval()
with torch.no_grad():
    ref = torch.sigmoid(tm(**proc(text=texts, images=[img] * 2, padding=True, return_tensors="pt")).logits).numpy()
px, _ = pred.preprocess([img])
ours = pred.predict_batch(px, pred.encode_text(texts))[0]
full = pred.predict([img, img], texts)
print("smoke max|dp| at 352:", float(np.abs(ours - ref).max()), "full", full.shape, pred.resize_on_device, flush=True)
assert full.shape == (2, 2, 120, 90)
print("SMOKE OK")
