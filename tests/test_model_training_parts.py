"""What the model offers the trainer: distinct, seeded dropout streams; dropout from an explicit key; separate
compute dtypes for the towers and the decoder; a pretrained CLIP with a new decoder (`init_clip`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clipseg_jax
from clipseg_jax.model.decoder import DecoderLayer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _dropout_masks(model) -> dict[str, np.ndarray]:
    """The mask every dropout module of the decoder draws (train mode, module streams) on a ones tensor."""
    model.train()
    out = {}
    for path, m in model.iter_modules():
        if isinstance(m, nnx.Dropout) and m.rate > 0:
            out["/".join(map(str, path))] = np.asarray(m(jnp.ones((64, 64))) == 0)
    model.eval()
    return out


def test_dropout_streams_are_distinct_and_seeded(tiny_hf_dir):
    masks = _dropout_masks(clipseg_jax.from_pretrained(tiny_hf_dir, seed=3))
    assert len(masks) == 12  # 3 layers x (attention probabilities, dropout1, dropout_act, dropout2)
    flat = list(masks.values())
    assert all(0.03 < m.mean() < 0.2 for m in flat)  # rate 0.1
    for i in range(len(flat)):
        for j in range(i):
            assert (flat[i] != flat[j]).any(), "two dropout modules draw the same mask"
    again = _dropout_masks(clipseg_jax.from_pretrained(tiny_hf_dir, seed=3))
    other = _dropout_masks(clipseg_jax.from_pretrained(tiny_hf_dir, seed=4))
    assert all((again[k] == masks[k]).all() for k in masks)
    assert all((other[k] != masks[k]).any() for k in masks)


def test_dropout_from_an_explicit_key(tiny_hf_dir):
    model = clipseg_jax.from_pretrained(tiny_hf_dir)
    rng = np.random.RandomState(0)
    acts = model.encode_image(jnp.asarray(rng.randn(2, 64, 64, 3), jnp.float32))
    cond = jnp.asarray(rng.randn(2, 24), jnp.float32)
    plain = model.decode(acts, cond)
    k1 = model.decode(acts, cond, dropout_key=jax.random.key(1))
    assert float(jnp.abs(k1 - plain).max()) > 1e-3  # dropout on
    np.testing.assert_array_equal(k1, model.decode(acts, cond, dropout_key=jax.random.key(1)))
    assert float(jnp.abs(k1 - model.decode(acts, cond, dropout_key=jax.random.key(2))).max()) > 1e-3
    np.testing.assert_array_equal(plain, model.decode(acts, cond))  # without a key: eval, the module state unchanged


def test_decoder_layer_sites_draw_different_masks():
    layer = DecoderLayer(16, 4, 32, 1e-5, 0.5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 5, 16))
    a = layer(x, dropout_key=jax.random.key(0))
    b = layer(x, dropout_key=jax.random.key(1))
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_towers_and_decoder_have_their_own_dtype(tiny_hf_dir):
    model = clipseg_jax.from_pretrained(tiny_hf_dir, dtype=jnp.bfloat16, decoder_dtype=jnp.float32)
    x = jnp.zeros((1, 64, 64, 3))
    acts = model.encode_image(x)
    assert all(a.dtype == jnp.bfloat16 for a in acts)
    cond = model.get_text_features(jnp.array([[49406, 320, 49407]]))
    assert cond.dtype == jnp.bfloat16
    assert model.decode(acts, cond).dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))


def _tiny_clip(tmp_path):
    from tiny_models import TINY_TEXT, TINY_VISION

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    return model, tmp_path / "clip"


DECODER = dict(reduce_dim=16, extract_layers=[1, 2, 3], decoder_intermediate_size=40)


def _features(ours, hf_clip):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 64, 64, 3).astype(np.float32)
    ids = np.array([[49406, 320, 1125, 49407, 0, 0], [49406, 320, 2368, 539, 320, 49407]])
    with torch.no_grad():
        ti = hf_clip.get_image_features(pixel_values=torch.tensor(x).permute(0, 3, 1, 2))
        tt = hf_clip.get_text_features(input_ids=torch.tensor(ids))
    ti, tt = (getattr(t, "pooler_output", t).numpy() for t in (ti, tt))
    return (np.asarray(ours.get_image_features(x)), ti), (np.asarray(ours.get_text_features(ids)), tt)


def test_init_clip_from_a_transformers_clip_model(tmp_path):
    from clipseg_jax.weights.clip_backbone import clipseg_from_clip

    hf_clip, path = _tiny_clip(tmp_path)
    ours, tok_dir = clipseg_from_clip(path, DECODER, seed=0)
    for got, want in _features(ours, hf_clip):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert tok_dir == path and ours.config.reduce_dim == 16 and ours.config.vision_config.patch_size == 16
    # The decoder: torch's default init (U(±1/sqrt(fan_in)) for Linear), a function of the seed.
    w = np.asarray(ours.decoder.film_mul.kernel[...])
    bound = 1 / np.sqrt(24)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    other, _ = clipseg_from_clip(path, DECODER, seed=1)
    assert not np.allclose(w, np.asarray(other.decoder.film_mul.kernel[...]))
    np.testing.assert_array_equal(w, np.asarray(clipseg_from_clip(path, DECODER, seed=0)[0].decoder.film_mul.kernel[...]))


def test_init_clip_from_an_openai_state_dict(tmp_path):
    """OpenAI's layout (as `clip.load(...)[0].state_dict()`), made from a CLIPSeg's towers with `hf_to_original`."""
    from tiny_models import hf_config, make_model

    from clipseg_jax.weights.clip_backbone import clipseg_from_clip
    from clipseg_jax.weights.original import hf_to_original

    cfg = hf_config(text={"hidden_size": 64, "num_attention_heads": 1},
                    vision={"hidden_size": 128, "num_attention_heads": 2})
    seg = make_model(cfg)
    sd = {k: v.numpy() for k, v in seg.state_dict().items()}
    _, openai_sd = hf_to_original(sd, cfg.to_dict())
    torch.save({k: torch.tensor(v) for k, v in openai_sd.items()}, tmp_path / "ViT.pth")
    ours, tok_dir = clipseg_from_clip(tmp_path / "ViT.pth", DECODER)
    assert tok_dir is None
    ref = clipseg_jax.from_pretrained(_save(seg, tmp_path / "seg"))
    flat = lambda m: {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m.clip, nnx.Param))}
    a, b = flat(ours), flat(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _save(model, path):
    model.save_pretrained(path)
    return path


def test_init_clip_errors(tmp_path, tiny_hf_dir):
    from clipseg_jax.weights.clip_backbone import clipseg_from_clip

    with pytest.raises(ValueError, match="init"):
        clipseg_from_clip(tiny_hf_dir, DECODER)  # a CLIPSeg checkpoint: it belongs in `init`
    with pytest.raises(FileNotFoundError, match="no such directory"):
        clipseg_from_clip(tmp_path / "nope", DECODER)


def test_engines_over_one_model_structure_share_compilations(tiny_hf_dir, lowerings):
    """Periodic validation builds an Engine per evaluation: the second one must not compile again."""
    from clipseg_jax.evaluate._engine import Engine
    from clipseg_jax.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_hf_dir)
    # Engines share compiled functions process-wide: shapes no other test uses, so the first call compiles.
    px = np.zeros((7, 64, 64, 3), np.float32)
    prompts = list("abcdefg")
    engine = Engine(clipseg_jax.from_pretrained(tiny_hf_dir), tok, batch_size=7)
    n = len(lowerings)
    first = engine.text_probs(px, prompts)
    assert len(lowerings) > n
    model = clipseg_jax.from_pretrained(tiny_hf_dir)
    for _, var in nnx.to_flat_state(nnx.state(model.decoder, nnx.Param)):  # other weights, same structure
        var[...] = var[...] * 0.5
    engine = Engine(model, tok, batch_size=7)
    n = len(lowerings)
    second = engine.text_probs(px, prompts)
    assert len(lowerings) == n
    assert float(jnp.abs(first - second).max()) > 0
