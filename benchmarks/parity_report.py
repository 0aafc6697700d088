"""Parity of clipseg-jax against transformers.CLIPSegForImageSegmentation, float32, random weights (decoder FiLM and
head scaled up so logits are far from zero), for the three published architectures at 352x352; plus bfloat16 vs
float32 mask agreement (IoU of the 0.5-thresholded masks).

    python benchmarks/parity_report.py [--configs rd64-refined rd64 rd16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["rd64-refined", "rd64", "rd16"])
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from clipseg_jax import compare as cmp
    from clipseg_jax.config import CLIPSegConfig
    from clipseg_jax.tokenizer import CLIPTokenizer
    from clipseg_jax.weights.hf import model_from_state_dict
    from tiny_models import make_model, reference_config

    tok = CLIPTokenizer.from_pretrained(None)
    prompts = ("a cat", "a red umbrella on the beach", "something to fill")
    print(f"{'config':<13} {'path':<10} {'max|Δlogits|':>13} {'max|logits|':>12} {'rel':>9} {'max|Δcond|':>11} "
          f"{'max|cond|':>10} {'bf16 IoU':>9}")
    for name in args.configs:
        hf = make_model(reference_config(name), seed=3)
        sd = {k: v.numpy() for k, v in hf.state_dict().items()}
        cfg = CLIPSegConfig.from_dict(hf.config.to_dict())
        f32 = model_from_state_dict(sd, cfg)
        bf16 = model_from_state_dict(sd, cfg, jnp.bfloat16)
        x, ids, mask, cx = cmp.standard_inputs(f32, tok, prompts=prompts, size=352)
        diffs = cmp.compare(f32, hf, x, ids, mask, cx)
        a = np.asarray(f32(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits) > 0
        b = np.asarray(bf16(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits, np.float32) > 0
        iou = (a & b).sum() / max((a | b).sum(), 1)
        for d in diffs:
            print(f"{name:<13} {d.path:<10} {d.logits:13.3e} {d.logits_scale:12.3e} "
                  f"{d.logits / max(1, d.logits_scale):9.2e} {d.cond:11.3e} {d.cond_scale:10.3e} "
                  f"{iou if d.path == 'text' else float('nan'):9.4f}", flush=True)


if __name__ == "__main__":
    main()
