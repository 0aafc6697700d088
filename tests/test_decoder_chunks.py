"""The decoder's `pair_chunk`: chunked (lax.map over groups of pairs) and batched passes give the same logits; the
chunked pass is an inference option (no dropout, a dropout_key refused); callers choose it from their device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipseg_jax.config import CLIPSegConfig, TextConfig, VisionConfig
from clipseg_jax.model.decoder import CLIPSegDecoder, resolve_pair_chunk


def _tiny(refined: bool = False) -> tuple[CLIPSegDecoder, list[jax.Array]]:
    cfg = CLIPSegConfig(
        text_config=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                   image_size=64, patch_size=16),
        projection_dim=24, reduce_dim=16, decoder_intermediate_size=40, extract_layers=(1, 2, 3),
        use_complex_transposed_convolution=refined, decoder_dropout=0.3,
    )
    decoder = CLIPSegDecoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    acts = [jnp.asarray(rng.standard_normal((3, 17, 48)), jnp.float32) for _ in cfg.extract_layers]
    return decoder, acts


@pytest.mark.parametrize("refined", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_and_batched_passes_agree(refined, chunk):
    """3 images x 2 prompts = 6 pairs: chunk 4 leaves a padded last group, 64 covers all pairs in one group."""
    decoder, acts = _tiny(refined)
    cond = jnp.asarray(np.random.default_rng(1).standard_normal((6, 24)), jnp.float32)
    want = decoder(acts, cond, prompts_per_image=2)
    got = decoder(acts, cond, prompts_per_image=2, pair_chunk=chunk)
    assert got.shape == want.shape == (6, 64, 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_seven_pairs_in_chunks_of_three_under_jit():
    """A pair count not divisible by the chunk (7 = 3 + 3 + 1 padded), traced as the Predictor traces it."""
    decoder, acts = _tiny()
    acts = [jnp.concatenate([a, a[:1] * 0.5]) for a in acts]  # 4 images
    cond = jnp.asarray(np.random.default_rng(2).standard_normal((4, 24)), jnp.float32)
    graphdef, state = nnx.split(decoder)
    run = jax.jit(lambda s, a, c, chunk: nnx.merge(graphdef, s)(a, c, pair_chunk=chunk), static_argnums=3)
    acts7 = [jnp.concatenate([a, a[:3]]) for a in acts]
    cond7 = jnp.concatenate([cond, cond[:3] * -1.0])
    want = run(state, acts7, cond7, None)
    for chunk in (1, 3):
        np.testing.assert_allclose(np.asarray(run(state, acts7, cond7, chunk)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_chunking_is_inference_only():
    decoder, acts = _tiny()
    cond = jnp.asarray(np.random.default_rng(3).standard_normal((3, 24)), jnp.float32)
    with pytest.raises(ValueError, match="dropout_key"):
        decoder(acts, cond, dropout_key=jax.random.key(0), pair_chunk=1)
    for bad in (0, -2, 1.5, True, "1"):
        with pytest.raises(ValueError, match="pair_chunk"):
            decoder(acts, cond, pair_chunk=bad)
    evaluated = decoder(acts, cond)
    decoder.train()  # module dropout on: the batched pass drops out, the chunked pass does not
    try:
        assert float(jnp.abs(decoder(acts, cond) - evaluated).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(decoder(acts, cond, pair_chunk=1)), np.asarray(evaluated),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(decoder(acts, cond, pair_chunk=8)), np.asarray(evaluated),
                                   rtol=1e-5, atol=1e-5)
    finally:
        decoder.eval()
    # eval mode again: the batched pass is deterministic
    np.testing.assert_array_equal(np.asarray(decoder(acts, cond)), np.asarray(evaluated))


def test_resolve_pair_chunk():
    cpu = jax.devices("cpu")[0]
    assert resolve_pair_chunk("auto", cpu) == 1
    assert resolve_pair_chunk(None, cpu) is None and resolve_pair_chunk(5, cpu) == 5

    class Accelerator:
        platform = "gpu"

    assert resolve_pair_chunk("auto", Accelerator()) is None
    with pytest.raises(ValueError, match="pair_chunk"):
        resolve_pair_chunk("always", cpu)


def test_engine_chooses_the_chunk_from_its_device_and_agrees_with_one_pass(tiny_hf_dir):
    pytest.importorskip("transformers")
    import clipseg_jax
    from clipseg_jax.evaluate._engine import Engine
    from clipseg_jax.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_hf_dir)
    model = clipseg_jax.from_pretrained(tiny_hf_dir)
    auto, batched = Engine(model, tok, batch_size=2), Engine(model, tok, batch_size=2, pair_chunk=None)
    assert auto.device.platform == "cpu" and auto.pair_chunk == 1 and batched.pair_chunk is None
    px = np.random.default_rng(4).standard_normal((2, 64, 64, 3)).astype(np.float32)
    cond = auto.text_embeddings(["a cat", "the dog", "a red umbrella"])
    np.testing.assert_allclose(np.asarray(auto.multi_prompt_probs(px, cond)),
                               np.asarray(batched.multi_prompt_probs(px, cond)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(auto.text_probs(px, ["a cat", "a dog"])),
                               np.asarray(batched.text_probs(px, ["a cat", "a dog"])), atol=1e-5)
