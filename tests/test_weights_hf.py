"""Loading, conversion round trips and bad checkpoints."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import clipseg_jax
from clipseg_jax.weights import hf, store


def _sd(model):
    return hf.state_dict_from_model(model)


def test_from_pretrained_safetensors_and_bin_agree(tiny_hf_dir, tmp_path):
    import torch
    from transformers import CLIPSegForImageSegmentation

    a = clipseg_jax.from_pretrained(tiny_hf_dir)
    tm = CLIPSegForImageSegmentation.from_pretrained(tiny_hf_dir)
    # transformers 5 writes safetensors only; older uploads (CIDAS 2022) ship pytorch_model.bin like this.
    (tmp_path / "bin").mkdir()
    shutil.copyfile(tiny_hf_dir / "config.json", tmp_path / "bin" / "config.json")
    torch.save(tm.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    b = clipseg_jax.from_pretrained(tmp_path / "bin")
    ref = {k: v.numpy() for k, v in tm.state_dict().items()}
    for k, v in _sd(a).items():
        np.testing.assert_array_equal(v, ref[k])
        np.testing.assert_array_equal(v, _sd(b)[k])
    del torch


def test_round_trip_ours_hf_ours_is_exact(tiny_refined_hf_dir, tmp_path):
    m = clipseg_jax.from_pretrained(tiny_refined_hf_dir)
    ours = store.save(m, tmp_path / "ours")
    m2 = clipseg_jax.from_pretrained(ours)
    hf_dir = hf.write_hf_directory(m2, tmp_path / "hf")
    m3 = clipseg_jax.from_pretrained(hf_dir)
    a, c = _sd(m), _sd(m3)
    assert a.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    assert m3.config == m.config


def test_exported_hf_directory_loads_in_transformers(tiny_refined_hf_dir, tmp_path):
    import torch
    from transformers import CLIPSegForImageSegmentation

    m = clipseg_jax.from_pretrained(tiny_refined_hf_dir)
    out = hf.write_hf_directory(m, tmp_path / "hf")
    tm = CLIPSegForImageSegmentation.from_pretrained(out).eval()
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    c = np.random.default_rng(1).normal(size=(1, 24)).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                 conditional_embeddings=torch.from_numpy(c)).logits.numpy()
    ours = np.asarray(m(jnp.asarray(x), conditional_embeddings=jnp.asarray(c)).logits)
    np.testing.assert_allclose(ours, ref.reshape(ours.shape), atol=1e-4 * max(1, np.abs(ref).max()))


def test_original_pth_layout_converts_to_the_same_params(tmp_path):
    """The original repo's decoder .pth + OpenAI CLIP state dict give the same params as the HF layout."""
    import torch

    from clipseg_jax.commands import run_convert
    from clipseg_jax.weights.original import hf_to_original
    from tiny_models import hf_config, make_model, save_checkpoint

    # OpenAI's CLIP derives heads = width // 64, so widths must be multiples of 64 here.
    cfg = hf_config(text=dict(hidden_size=64, num_attention_heads=1), vision=dict(hidden_size=128, num_attention_heads=2),
                    use_complex_transposed_convolution=True)
    m = clipseg_jax.from_pretrained(save_checkpoint(make_model(cfg), tmp_path / "hf", processor=False))
    sd = _sd(m)
    dec, clip = hf_to_original(sd, m.config.to_dict())
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in dec.items()}, tmp_path / "rd-uni.pth")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in clip.items()}, tmp_path / "clip.pt")
    out = run_convert(None, str(tmp_path / "ours"), original_decoder=str(tmp_path / "rd-uni.pth"),
                      clip_weights=str(tmp_path / "clip.pt"), extract_layers=list(m.config.extract_layers))
    m2 = clipseg_jax.from_pretrained(out)
    sd2 = _sd(m2)
    assert sd.keys() == sd2.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k])


def _copy_with(tiny_hf_dir, tmp_path, edit):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_dir, d)
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")
    return d


def test_missing_key_is_named(tiny_hf_dir, tmp_path):
    key = "decoder.layers.1.mlp.fc1.weight"
    d = _copy_with(tiny_hf_dir, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=r"missing key 'decoder\.layers\.1\.mlp\.fc1\.weight' \(expected shape \(40, 16\)\)"):
        clipseg_jax.from_pretrained(d)


def test_mis_shaped_key_names_both_shapes(tiny_hf_dir, tmp_path):
    key = "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    d = _copy_with(tiny_hf_dir, tmp_path, lambda sd: sd.__setitem__(key, np.zeros((48, 40), np.float32)))
    with pytest.raises(ValueError, match=r"q_proj\.weight' has shape \(48, 40\), the config expects \(48, 48\)"):
        clipseg_jax.from_pretrained(d)


def test_unexpected_key_is_an_error(tiny_hf_dir, tmp_path):
    d = _copy_with(tiny_hf_dir, tmp_path, lambda sd: sd.__setitem__("decoder.reduces.3.weight", np.zeros((16, 48), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder\.reduces\.3\.weight'\]"):
        clipseg_jax.from_pretrained(d)


def test_our_checkpoint_loads_like_the_hf_directory(tiny_hf_dir, tmp_path):
    """Same parameters (float32), compute dtypes and seeded dropout streams as loading the HF directory."""
    import jax
    from flax import nnx

    d = store.save(clipseg_jax.from_pretrained(tiny_hf_dir), tmp_path / "ours")
    kw = dict(dtype=jnp.bfloat16, decoder_dtype=jnp.float32)
    ours, ref = clipseg_jax.from_pretrained(d, seed=3, **kw), clipseg_jax.from_pretrained(tiny_hf_dir, seed=3, **kw)
    a, b = _sd(ours), _sd(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    rng = np.random.default_rng(0)
    x, cond = jnp.asarray(rng.normal(size=(1, 64, 64, 3)), jnp.float32), jnp.asarray(rng.normal(size=(1, 24)), jnp.float32)
    acts = ours.encode_image(x)
    assert acts[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours.decode(acts, cond), ref.decode(ref.encode_image(x), cond))
    other = clipseg_jax.from_pretrained(d, seed=4, **kw)
    for m in (ours, ref, other):
        m.train()  # dropout from the modules' own streams, seeded at load
    train = ours.decode(acts, cond)
    np.testing.assert_array_equal(train, ref.decode(acts, cond))
    assert float(jnp.abs(train - other.decode(acts, cond)).max()) > 1e-3


def _with_config(ours, **changes):
    meta = json.loads((ours / store.MARKER).read_text())
    meta["config"].update(changes)
    (ours / store.MARKER).write_text(json.dumps(meta))
    return ours


def test_our_checkpoint_against_another_config_names_the_key(tiny_hf_dir, tmp_path):
    import re

    m = clipseg_jax.from_pretrained(tiny_hf_dir)
    d = store.save(m, tmp_path / "ours")
    at = re.escape(str(d))
    _with_config(d, decoder_intermediate_size=48)
    with pytest.raises(ValueError, match=rf"^{at}: key 'decoder/layers/0/mlp/fc1/bias' has shape \(40,\), "
                                         rf"the config expects \(48,\)$"):
        store.load(d)
    _with_config(d, decoder_intermediate_size=40, extract_layers=[1, 2])
    with pytest.raises(ValueError, match=rf"^{at}: unexpected keys \['decoder/layers/2/.*\(and \d+ more\): the config"):
        store.load(d)
    _with_config(d, extract_layers=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=rf"^{at}: missing key 'decoder/(layers|reduces)/3/\S+' \(expected shape \(\d+"):
        clipseg_jax.from_pretrained(d)
    _with_config(d, extract_layers=[1, 2, 3])
    assert _sd(store.load(d)).keys() == _sd(m).keys()
    shutil.rmtree(d / "params")
    with pytest.raises(ValueError, match=rf"^{at}/params: cannot restore parameters"):
        store.load(d)


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="CIDAS/clipseg-does-not-exist: not in the local Hugging Face cache"):
        clipseg_jax.from_pretrained("CIDAS/clipseg-does-not-exist")


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        clipseg_jax.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        clipseg_jax.from_pretrained(str(tmp_path / "nope"))


def test_corrupt_weights_and_config(tiny_hf_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_dir, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        clipseg_jax.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        clipseg_jax.from_pretrained(d)


def test_unreadable_pytorch_bin_is_one_line_naming_the_file(tiny_hf_dir, tmp_path):
    import argparse

    import torch

    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copyfile(tiny_hf_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a PyTorch state dict readable with weights_only=True"):
        clipseg_jax.from_pretrained(d)
    # A pickled object weights_only refuses: torch's message runs over many lines of advice, ours is one.
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1.0)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a PyTorch state dict .*UnpicklingError") as ei:
        clipseg_jax.from_pretrained(d)
    assert "\n" not in str(ei.value)
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: expected a state dict"):
        clipseg_jax.from_pretrained(d)


def test_patch_size_default_trap_is_visible(tiny_hf_dir, tmp_path):
    """A config without patch_size takes transformers' default 32: the weights then do not fit, loudly."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"].pop("patch_size")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="patch_embedding.weight' has shape"):
        clipseg_jax.from_pretrained(d)


def test_store_refuses_to_overwrite(tiny_hf_dir, tmp_path):
    m = clipseg_jax.from_pretrained(tiny_hf_dir)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(FileExistsError):
        store.save(m, tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def _tracer_error_names_its_origin() -> bool:
    """Whether jax's tracer errors say where the tracer came from (what abstract_model switches off inside)."""
    import jax

    try:
        jax.jit(lambda x: bool(x > 0))(1.0)
    except jax.errors.TracerBoolConversionError as e:
        return "The error occurred while tracing the function" in str(e)
    raise AssertionError("no tracer error")


def test_abstract_model_matches_a_built_model_and_leaves_jax_as_it_was():
    """abstract_model silences jax's tracer-origin messages while it traces (12 s of 14.6 s for ViT-B/16); jax's
    errors name the tracer's origin again afterwards, also after a failing constructor."""
    import jax
    from flax import nnx

    from clipseg_jax.config import CLIPSegConfig
    from clipseg_jax.model.clipseg import CLIPSeg
    from clipseg_jax.weights.hf import abstract_model
    from tiny_models import hf_config

    cfg = CLIPSegConfig.from_dict(hf_config().to_dict())
    assert _tracer_error_names_its_origin()
    abstract = nnx.state(abstract_model(cfg))
    built = nnx.state(CLIPSeg(cfg, rngs=nnx.Rngs(0)))
    shapes = lambda st: jax.tree.map(lambda x: (x.shape, x.dtype), st)  # noqa: E731
    assert shapes(abstract) == shapes(built)
    assert _tracer_error_names_its_origin()
    with pytest.raises(AttributeError):  # a failing constructor restores it too
        abstract_model("not a config")
    assert _tracer_error_names_its_origin()
