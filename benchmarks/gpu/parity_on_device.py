"""GPU parity check: ours on the default JAX device vs transformers on CPU (tiny at 64, rd64-refined at 352), plus
the Predictor path at 352 against the HF processor + model. Run on the GPU machine from the repo root.
(The run of 2026-11-26 also passed "default" to `run`; those rows reused the compiled highest-precision functions
from the jit cache, so they measured nothing new and were dropped.)"""
import pathlib
import sys
import tempfile
import time

sys.path[:0] = [".", "tests"]
import jax
import numpy as np
from tiny_models import hf_config, make_model, reference_config, save_checkpoint

from clipseg_jax import compare as cmp
from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.predict import Predictor
from clipseg_jax.tokenizer import CLIPTokenizer
from clipseg_jax.weights.hf import model_from_state_dict

print("jax", jax.__version__, jax.devices(), flush=True)
tok = CLIPTokenizer.from_pretrained(None)
prompts = ("a cat", "a red umbrella on the beach", "something to fill")
def run(name, hf, size, precs):
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    m = model_from_state_dict(sd, CLIPSegConfig.from_dict(hf.config.to_dict()))
    x, ids, mask, cx = cmp.standard_inputs(m, tok, prompts=prompts, size=size)
    for prec in precs:
        t = time.time()
        with jax.default_matmul_precision(prec):
            for d in cmp.compare(m, hf, x, ids, mask, cx):
                print(f"{name:<12} {prec:<8} {d.path:<10} dlogits {d.logits:.3e} / {d.logits_scale:.3e} "
                      f"rel {d.logits / max(1, d.logits_scale):.2e}  dcond {d.cond:.3e} / {d.cond_scale:.3e}", flush=True)
        print(f"  ({time.time() - t:.1f}s)", flush=True)
tiny = make_model(hf_config())
run("tiny", tiny, 64, ["highest"])
with jax.default_matmul_precision("highest"):
    d = save_checkpoint(tiny, pathlib.Path(tempfile.mkdtemp()))
    pred = Predictor.from_pretrained(d)
    img = (np.random.default_rng(0).random((120, 90, 3)) * 255).astype(np.uint8)
    import torch
    from transformers import CLIPSegProcessor
    proc = CLIPSegProcessor.from_pretrained(d)
    texts = ["a cat", "a remote control", "the blue sky."]
    with torch.no_grad():
        ref = torch.sigmoid(tiny(**proc(text=texts, images=[img] * 3, padding=True, return_tensors="pt")).logits).numpy()
    px, _ = pred.preprocess([img])
    print("predictor highest max|dp| at 352:", float(np.abs(pred.predict_batch(px, pred.encode_text(texts))[0] - ref).max()), flush=True)
run("rd64-refined", make_model(reference_config("rd64-refined"), seed=3), 352, ["highest"])
