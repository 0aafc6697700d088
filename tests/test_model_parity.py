"""Ours vs transformers.CLIPSegForImageSegmentation in float32, random weights: text, visual-prompt and
given-embedding paths; max |Δ| <= 1e-4 * max(1, max|reference|) for logits and conditional embeddings."""

import jax.numpy as jnp
import numpy as np
import pytest

from clipseg_jax import compare as cmp
from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.tokenizer import CLIPTokenizer
from clipseg_jax.weights.hf import model_from_state_dict
from tiny_models import hf_config, make_model, reference_config

TOK = CLIPTokenizer.from_pretrained(None)


def _ours(hf_model, dtype=jnp.float32):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return model_from_state_dict(sd, CLIPSegConfig.from_dict(hf_model.config.to_dict()), dtype)


def _check(hf_model, size, prompts=cmp.DEFAULT_PROMPTS, seed=0):
    model = _ours(hf_model)
    x, ids, mask, cx = cmp.standard_inputs(model, TOK, prompts=prompts, size=size, seed=seed)
    diffs = cmp.compare(model, hf_model, x, ids, mask, cx)
    for d in diffs:
        assert d.logits_scale > 1.0, "reference logits too small for a meaningful comparison"
        assert d.ok(), d
    return diffs


TINY_CASES = {
    # name: (config overrides, input size)
    "plain-p16-352": (dict(), 352),
    "refined-p8-cond1": (dict(vision=dict(patch_size=8, image_size=32), use_complex_transposed_convolution=True,
                              extract_layers=[0, 2], conditional_layer=1), 48),
    "plain-p4-not-divisible": (dict(vision=dict(patch_size=4, image_size=16), extract_layers=[3, 1]), 30),
    "no-film-cond-layer-out-of-range": (dict(conditional_layer=5), 64),
    "new-eos-pooling-gelu": (dict(text=dict(eos_token_id=49407, bos_token_id=49406, hidden_act="gelu"),
                                  vision=dict(hidden_act="gelu", layer_norm_eps=1e-6), decoder_num_attention_heads=2,
                                  reduce_dim=12), 80),
    "same-grid-no-interpolation": (dict(vision=dict(image_size=64, patch_size=16)), 64),
}


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_tiny_parity(name):
    over, size = TINY_CASES[name]
    _check(make_model(hf_config(**over), seed=len(name)), size)


def test_padding_length_does_not_change_text_embedding():
    hf = make_model(hf_config())
    model = _ours(hf)
    ids8, m8 = TOK(["a photo of a cat."], length=8)
    ids77, m77 = TOK(["a photo of a cat."], length=77)
    e8 = np.asarray(model.get_text_features(jnp.asarray(ids8), jnp.asarray(m8)))
    e77 = np.asarray(model.get_text_features(jnp.asarray(ids77), jnp.asarray(m77)))
    np.testing.assert_allclose(e8, e77, atol=1e-6)


def test_vision_stops_after_last_extract_layer():
    """Logits do not depend on blocks after max(extract_layers): breaking them changes nothing."""
    from flax import nnx

    hf = make_model(hf_config(extract_layers=[0, 1]))
    model = _ours(hf)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    c = jnp.ones((1, 24))
    before = np.asarray(model(x, conditional_embeddings=c).logits)
    last = model.clip.vision_model.encoder.layers[3]
    last.mlp.fc1.kernel[...] = jnp.full_like(last.mlp.fc1.kernel[...], jnp.nan)
    after = np.asarray(model(x, conditional_embeddings=c).logits)
    np.testing.assert_array_equal(before, after)
    assert np.isnan(np.asarray(model(x, conditional_embeddings=c, output_pooled=True).pooled_output)).all()
    del nnx


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_bfloat16_masks_agree_tiny():
    hf = make_model(hf_config(), decoder_scale=3.0)
    f32, bf16 = _ours(hf), _ours(hf, jnp.bfloat16)
    x, ids, mask, _ = cmp.standard_inputs(f32, TOK, size=352)
    a = np.asarray(f32(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits) > 0
    b = np.asarray(bf16(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits, np.float32) > 0
    assert _iou(a, b) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rd64-refined", "rd64", "rd16"])
def test_full_size_parity_352(name):
    """The published architectures at 352x352 (random weights)."""
    _check(make_model(reference_config(name), seed=3), 352, prompts=("a cat", "a red umbrella on the beach"))


@pytest.mark.slow
def test_full_size_bfloat16_masks_agree():
    hf = make_model(reference_config("rd64-refined"), seed=4)
    f32, bf16 = _ours(hf), _ours(hf, jnp.bfloat16)
    x, ids, mask, _ = cmp.standard_inputs(f32, TOK, prompts=("a cat", "a dog"), size=352)
    lf = np.asarray(f32(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits)
    lb = np.asarray(bf16(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits, np.float32)
    # threshold 0.5 on probabilities == 0 on logits
    iou = _iou(lf > 0, lb > 0)
    print(f"bf16 vs f32 mask IoU {iou:.5f}, foreground fraction {(lf > 0).mean():.3f}")
    assert 0.05 < (lf > 0).mean() < 0.95, "degenerate masks: scale the decoder differently"
    assert iou >= 0.99
