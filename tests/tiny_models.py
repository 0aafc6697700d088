"""Random-initialised `transformers.CLIPSegForImageSegmentation` checkpoints for tests (tiny and full size)."""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "reference"
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 eos_token_id=2, bos_token_id=0)
TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   image_size=64, patch_size=16)


def hf_config(text=None, vision=None, **top):
    from transformers import CLIPSegConfig

    kw = dict(projection_dim=24, reduce_dim=16, decoder_intermediate_size=40, extract_layers=[1, 2, 3])
    kw.update(top)
    return CLIPSegConfig(text_config={**TINY_TEXT, **(text or {})}, vision_config={**TINY_VISION, **(vision or {})}, **kw)


def reference_config(name: str):
    """One of the published configs (rd64-refined, rd64, rd16), as copied from the hub into tests/reference."""
    from transformers import CLIPSegConfig

    return CLIPSegConfig.from_dict(json.loads((REFERENCE_DIR / f"clipseg-{name}.config.json").read_text()))


def make_model(config, seed: int = 0, decoder_scale: float = 3.0):
    """Random weights; the decoder's FiLM and head scaled up so logits are far from zero and differences show.

    (Scaling every decoder weight makes the random decoder ill-conditioned in float32: torch's own float32 result is
    then further from its float64 result than ours is, so the comparison would measure rounding, not the port.)"""
    import torch
    from transformers import CLIPSegForImageSegmentation

    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.startswith(("film_", "transposed_convolution")):
                p.mul_(decoder_scale)
    return model


def save_checkpoint(model, out: Path, safe: bool = True, processor: bool = True) -> Path:
    """`save_pretrained` the model (and a CLIPSegProcessor with the shipped vocabulary, which writes tokenizer.json)."""
    model.save_pretrained(out, safe_serialization=safe)
    if processor:
        make_processor(out).save_pretrained(out)
    return out


def make_processor(tmp: Path):
    """A CLIPSegProcessor like CIDAS' (ImageNet mean/std, 352, PIL bilinear) with the shipped BPE vocabulary."""
    from transformers import CLIPSegProcessor, CLIPTokenizer, ViTImageProcessor

    from clipseg_jax.tokenizer import shipped_vocab_and_merges

    vocab, merges = shipped_vocab_and_merges()
    d = Path(tmp) / "_vocab"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    # Positional: transformers 5 silently ignores the old `vocab_file=` keywords and builds an empty vocabulary.
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>")
    ids = tok(["a photo of a cat"])["input_ids"][0]
    if ids != [49406, 320, 1125, 539, 320, 2368, 49407]:
        raise AssertionError(f"reference tokenizer is broken: {ids}")
    image = ViTImageProcessor(size={"height": 352, "width": 352}, resample=2,
                              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return CLIPSegProcessor(image_processor=image, tokenizer=tok)
