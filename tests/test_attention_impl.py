"""The optional `jax.nn.dot_product_attention` path computes what the default einsum attention computes."""
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import hf_config, make_model

from clipseg_jax import compare as cmp
from clipseg_jax.config import CLIPSegConfig
from clipseg_jax.model.clip import Attention, set_attention_implementation
from clipseg_jax.tokenizer import CLIPTokenizer
from clipseg_jax.weights.hf import model_from_state_dict


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_dot_product_attention_path_matches_einsum(dtype, tol):
    hf = make_model(hf_config(extract_layers=[1, 3], conditional_layer=1))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    model = model_from_state_dict(sd, CLIPSegConfig.from_dict(hf.config.to_dict()), dtype)
    # Prompts of different lengths: padding and the causal mask go in as the attention bias.
    x, ids, mask, _ = cmp.standard_inputs(model, CLIPTokenizer.from_pretrained(None),
                                          prompts=("a cat", "a remote control on a red sofa by the window", "x"), size=96)
    run = lambda: np.asarray(model(jnp.asarray(x), input_ids=ids, attention_mask=mask).logits, np.float32)  # noqa: E731
    want = run()
    assert set_attention_implementation(model, "xla") is model
    impls = {m.implementation for _, m in model.iter_modules() if isinstance(m, Attention)}
    assert impls == {"xla"}
    got = run()
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()))
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        set_attention_implementation(model, "flash")
