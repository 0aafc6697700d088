"""clipseg_jax.weights.original: original timojl/clipseg + OpenAI CLIP files <-> HF CLIPSeg state dict.

Tiny random HF models are exported to the original layout, written as .pth files, read back and converted again.
Layout semantics are checked independently of the round trip by running the exported weights through the torch
modules the original code uses (nn.TransformerEncoderLayer for decoder blocks, nn.MultiheadAttention-based OpenAI
residual blocks, ``x @ proj`` projections) and comparing with the HF modules.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clipseg_jax.weights.original import RULES, hf_to_original, load_torch_state_dict, original_to_hf  # noqa: E402

REFERENCE = Path(__file__).parent / "reference"

# Widths are multiples of 64 because OpenAI infers heads = width // 64.
CASES = {
    "plain_rd16": dict(refined=False, reduce_dim=16, v_layers=4, extract=[1, 2, 3], image=64),
    "refined_rd64": dict(refined=True, reduce_dim=64, v_layers=10, extract=None, image=32),  # default [3, 6, 9]
}


def _hf_config(refined: bool, reduce_dim: int, v_layers: int, extract: list[int] | None, image: int):
    return transformers.CLIPSegConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=128, intermediate_size=160, num_hidden_layers=v_layers, num_attention_heads=2,
                           image_size=image, patch_size=16),
        projection_dim=32,
        reduce_dim=reduce_dim,
        extract_layers=extract if extract is not None else [3, 6, 9],
        decoder_num_attention_heads=4,
        decoder_intermediate_size=48,
        use_complex_transposed_convolution=refined,
    )  # fmt: skip


def _random_model(cfg, seed: int):
    torch.manual_seed(seed)
    model = transformers.CLIPSegForImageSegmentation(cfg).eval()
    with torch.no_grad():  # every parameter random: constant inits (LN=1, bias=0) would hide swapped keys
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _np_sd(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.text_config.vocab_size, (2, 7), generator=g)
    ids[:, -1] = 2  # EOS (legacy id 2 in this config) ...
    ids[1, 4:] = 2  # ... padding with EOS keeps argmax pooling at the first EOS
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    s = cfg.vision_config.image_size
    pix = torch.randn(2, 3, s, s, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    spec = CASES[request.param]
    cfg = _hf_config(**spec)
    model = _random_model(cfg, seed=len(request.param))
    hf_sd = _np_sd(model)
    dec, clip = hf_to_original(hf_sd, cfg)
    d = tmp_path_factory.mktemp(request.param)
    name = "rd{}-uni{}.pth".format(spec["reduce_dim"], "-refined" if spec["refined"] else "")
    torch.save({k: torch.from_numpy(v) for k, v in dec.items()}, d / name)
    torch.save({k: torch.from_numpy(v) for k, v in clip.items()}, d / "clip.pth")
    return dict(spec=spec, cfg=cfg, model=model, hf_sd=hf_sd, dec=dec, clip=clip, dec_path=d / name, clip_path=d / "clip.pth")


def _convert(case, dec=None, clip=None):
    kw = {} if case["spec"]["extract"] is None else {"extract_layers": case["spec"]["extract"]}
    return original_to_hf(case["dec"] if dec is None else dec, case["clip"] if clip is None else clip, **kw)


def _assert_sd_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    for k in a:
        assert a[k].dtype == np.float32, k
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_original_layout_keys(case):
    dec, clip, spec = case["dec"], case["clip"], case["spec"]
    trans = {"trans_conv.0.weight", "trans_conv.2.weight", "trans_conv.4.bias"} if spec["refined"] else {"trans_conv.weight"}
    assert trans <= set(dec)
    assert {"film_mul.weight", "film_add.bias", "reduce.weight", "reduces.2.bias", "blocks.0.self_attn.in_proj_weight",
            "blocks.2.linear1.weight", "blocks.1.norm2.bias", "blocks.0.self_attn.out_proj.weight"} <= set(dec)  # fmt: skip
    assert not any(k.startswith(("clip", "decoder", "model")) for k in dec)
    assert {"visual.conv1.weight", "visual.proj", "visual.class_embedding", "visual.transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.1.mlp.c_proj.bias", "token_embedding.weight", "positional_embedding", "ln_final.weight",
            "text_projection", "logit_scale"} <= set(clip)  # fmt: skip
    assert dec["blocks.0.self_attn.in_proj_weight"].shape == (3 * spec["reduce_dim"], spec["reduce_dim"])


def test_files_roundtrip_exact_and_same_logits(case):
    dec = load_torch_state_dict(case["dec_path"])
    clip = load_torch_state_dict(case["clip_path"])
    sd, cfg = _convert(case, dec, clip)
    _assert_sd_equal(sd, case["hf_sd"])
    assert "decoder.reduce.weight" not in sd

    hf_cfg = transformers.CLIPSegConfig(**json.loads(json.dumps(cfg)))  # JSON-serialisable, like a config.json
    assert hf_cfg.vision_config.patch_size == 16
    assert (hf_cfg.text_config.eos_token_id, hf_cfg.text_config.bos_token_id) == (2, 0)
    assert hf_cfg.extract_layers == (case["spec"]["extract"] or [3, 6, 9])
    assert hf_cfg.use_complex_transposed_convolution == case["spec"]["refined"]
    new = transformers.CLIPSegForImageSegmentation(hf_cfg).eval()
    ref_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items() if not k.endswith("position_ids")}
    assert ref_shapes == {k: v.shape for k, v in sd.items()}
    new.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)

    inputs = _inputs(case["cfg"])
    with torch.no_grad():
        a = case["model"](**inputs).logits
        b = new(**inputs).logits
    s = case["cfg"].vision_config.image_size
    assert a.shape == (2, s, s)
    assert torch.equal(a, b)


def test_config_matches_cidas_reference_fields(case):
    _, cfg = _convert(case)
    ref = json.loads((REFERENCE / "clipseg-rd64-refined.config.json").read_text())
    for k in ("decoder_num_attention_heads", "conditional_layer", "decoder_hidden_act", "logit_scale_init_value",
              "decoder_attention_dropout"):  # fmt: skip
        assert cfg[k] == ref[k], k
    for sub in ("text_config", "vision_config"):
        for k, v in cfg[sub].items():
            assert k in ref[sub], (sub, k)
        for k in ("hidden_act", "layer_norm_eps", "attention_dropout") + (("bos_token_id", "eos_token_id", "pad_token_id") if sub == "text_config" else ("patch_size", "num_channels")):  # fmt: skip
            assert cfg[sub][k] == ref[sub][k], (sub, k)
    assert set(cfg) - {"text_config", "vision_config"} <= set(ref)


def test_decoder_blocks_match_torch_transformer_encoder_layer(case):
    """The original decoder blocks are nn.TransformerEncoderLayer(d_model=D, nhead=4) (post-norm, ReLU, seq-first)."""
    D, hd = case["spec"]["reduce_dim"], case["model"].decoder
    x = torch.randn(5, 2, D, generator=torch.Generator().manual_seed(1))  # (seq, batch, D)
    for i, hf_layer in enumerate(hd.layers):
        blk = {k[len(f"blocks.{i}.") :]: torch.from_numpy(v) for k, v in case["dec"].items() if k.startswith(f"blocks.{i}.")}
        ref = torch.nn.TransformerEncoderLayer(d_model=D, nhead=4, dim_feedforward=blk["linear1.weight"].shape[0], dropout=0.0)
        ref.load_state_dict(blk, strict=True)
        ref.eval()
        with torch.no_grad():
            want = ref(x)
            got = hf_layer(x.transpose(0, 1), attention_mask=None).transpose(0, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _OpenAIBlock(torch.nn.Module):
    """OpenAI CLIP ResidualAttentionBlock (clip/model.py), written out with its state-dict names."""

    def __init__(self, w: int, mlp: int) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(w, w // 64)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(w), torch.nn.LayerNorm(w)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(w, mlp))
        self.mlp.add_module("gelu", torch.nn.Identity())  # QuickGELU applied in forward
        self.mlp.add_module("c_proj", torch.nn.Linear(mlp, w))

    def forward(self, x):  # (seq, batch, w)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


def test_clip_layout_matches_openai_modules(case):
    clip, model = case["clip"], case["model"]
    g = torch.Generator().manual_seed(2)
    for tower, hf_layers in (("visual.transformer", model.clip.vision_model.encoder.layers),
                             ("transformer", model.clip.text_model.encoder.layers)):  # fmt: skip
        pre = f"{tower}.resblocks.0."
        blk = {k[len(pre) :]: torch.from_numpy(v) for k, v in clip.items() if k.startswith(pre)}
        w, mlp = blk["ln_1.weight"].shape[0], blk["mlp.c_fc.weight"].shape[0]
        ref = _OpenAIBlock(w, mlp)
        ref.load_state_dict(blk, strict=True)
        x = torch.randn(6, 2, w, generator=g)
        with torch.no_grad():
            want = ref(x)
            got = hf_layers[0](x.transpose(0, 1), attention_mask=None).transpose(0, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # OpenAI projections: x @ proj
    v = torch.randn(3, clip["visual.proj"].shape[0], generator=g)
    t = torch.randn(3, clip["text_projection"].shape[0], generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.clip.visual_projection(v), v @ torch.from_numpy(clip["visual.proj"]))
        torch.testing.assert_close(model.clip.text_projection(t), t @ torch.from_numpy(clip["text_projection"]))


def test_merged_full_state_dict_and_metadata_keys(case):
    merged = {f"clip_model.{k}": v for k, v in case["clip"].items()}
    merged.update({f"model.{k[len('visual.'):]}": v for k, v in case["clip"].items() if k.startswith("visual.")})
    merged.update(case["dec"])
    kw = {} if case["spec"]["extract"] is None else {"extract_layers": case["spec"]["extract"]}
    sd, _ = original_to_hf(merged, **kw)  # CLIP weights come from the clip_model.* keys
    _assert_sd_equal(sd, case["hf_sd"])
    # TorchScript-archive metadata entries and fp16 storage (as in OpenAI's ViT-B-16.pt)
    clip = {k: v.astype(np.float16) for k, v in case["clip"].items()}
    clip.update(input_resolution=np.array(224), context_length=np.array(77), vocab_size=np.array(49408))
    sd16, _ = _convert(case, clip=clip)
    k = "clip.vision_model.encoder.layers.0.self_attn.k_proj.weight"
    assert sd16[k].dtype == np.float32
    np.testing.assert_array_equal(sd16[k], case["hf_sd"][k].astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="pass only one"):
        original_to_hf(merged, case["clip"])


def test_fp16_file_loads_as_float32(case, tmp_path):
    p = tmp_path / "clip16.pth"
    torch.save({k: torch.from_numpy(v).half() for k, v in case["clip"].items()}, p)
    sd = load_torch_state_dict(p)
    assert all(v.dtype == np.float32 for v in sd.values())
    np.testing.assert_array_equal(sd["visual.proj"], case["clip"]["visual.proj"].astype(np.float16).astype(np.float32))


def test_bad_state_dicts(case):
    dec = dict(case["dec"])
    dec["reduces.1.weight"] = dec["reduces.1.weight"][:, :-1]
    D = case["spec"]["reduce_dim"]
    with pytest.raises(ValueError, match=rf"'reduces.1.weight' has shape \({D}, 127\), expected \({D}, 128\)"):
        _convert(case, dec=dec)
    dec = dict(case["dec"])
    del dec["blocks.0.linear2.bias"]
    with pytest.raises(ValueError, match="missing key 'blocks.0.linear2.bias'"):
        _convert(case, dec=dec)
    clip = dict(case["clip"])
    del clip["ln_final.bias"]
    with pytest.raises(ValueError, match="CLIP state dict: missing key 'ln_final.bias'"):
        _convert(case, clip=clip)
    clip = dict(case["clip"])
    clip["text_projection"] = clip["text_projection"].T
    with pytest.raises(ValueError, match="'text_projection' has shape"):
        _convert(case, clip=clip)
    dec = dict(case["dec"], shift_vector=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="unexpected keys.*shift_vector"):
        _convert(case, dec=dec)
    with pytest.raises(ValueError, match="extract_layers"):
        original_to_hf(case["dec"], case["clip"], extract_layers=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        original_to_hf(case["dec"], case["clip"], extract_layers=[1, 2, 99])
    with pytest.raises(ValueError, match="no CLIP weights"):
        original_to_hf(case["dec"])


def test_default_extract_layers_checked_against_depth():
    cfg = _hf_config(**CASES["plain_rd16"])
    dec, clip = hf_to_original(_np_sd(_random_model(cfg, 0)), cfg)
    with pytest.raises(ValueError, match=r"\[3, 6, 9\].*out of range for a 4-layer"):
        original_to_hf(dec, clip)


# Sizes named by the rules' shapes, pairwise distinct so a transpose or a split along the wrong axis shows.
_RULE_SIZES = dict(vw=10, n_ch=3, patch=8, k=2, n_pos=5, v_layers=2, v_mlp=14, proj=6, vocab=17, tw=7, ctx=9,
                   t_layers=3, t_mlp=11, rd=4, d_mlp=13, depth=2, refined=True)  # fmt: skip


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.original)
def test_every_rule_round_trips(rule):
    shape = rule.original_shape(_RULE_SIZES)
    a = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if rule.transform is None:  # reduce.*: HF has no such parameter
        assert rule.original.startswith("reduce.") and rule.hf == ()
        return
    parts = rule.transform.to_hf(a)
    assert len(parts) == len(rule.hf)
    assert [p.shape for p in parts] == list(rule.transform.hf_shapes(shape))
    back = rule.transform.to_original(parts)
    assert back.shape == shape
    np.testing.assert_array_equal(back, a)
    keys = rule.expand(_RULE_SIZES)
    assert len(keys) == (_RULE_SIZES[rule.layers] if rule.layers else 1)
    assert all(rule.matches(o) and all(rule.matches(h, "hf") for h in hs) for o, hs in keys)


def test_original_to_hf_to_original_is_exact(case):
    sd, cfg = _convert(case)
    dec, clip = hf_to_original(sd, cfg)
    _assert_sd_equal(dec, case["dec"])  # reduce.* comes back as the zeros hf_to_original wrote
    _assert_sd_equal(clip, case["clip"])
    dec, _ = hf_to_original(sd, cfg, include_unused_reduce=False)
    assert set(case["dec"]) - set(dec) == {"reduce.weight", "reduce.bias"}


def test_every_key_is_matched_by_exactly_one_rule(case):
    for side, keys in (("original", [*case["dec"], *case["clip"]]), ("hf", case["hf_sd"])):
        for k in keys:
            assert len([r for r in RULES if r.matches(k, side)]) == 1, (side, k)
    for refined in (False, True):  # ViT-B/16 key sets (arrays are broadcast views)
        dec, clip = _full_size_original(64, refined)
        for k in [*dec, *clip]:
            assert len([r for r in RULES if r.matches(k)]) == 1, k


def test_an_unmatched_key_is_one_error_naming_it(case):
    key = "visual.transformer.resblocks.0.attn.bias_k"  # nn.MultiheadAttention(add_bias_kv=True): not CLIP's
    assert not any(r.matches(key) for r in RULES)
    clip = dict(case["clip"], **{key: np.zeros((1, 1, 128), np.float32)})
    with pytest.raises(ValueError, match=r"^CLIP state dict: unexpected keys \['visual\.transformer\.resblocks\.0\.attn\.bias_k'\]$"):
        _convert(case, clip=clip)
    sd = dict(case["hf_sd"], **{"decoder.layers.0.extra.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"^HF state dict: unexpected keys \['decoder\.layers\.0\.extra\.weight'\]$"):
        hf_to_original(sd, case["cfg"])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_state_dict(tmp_path / "missing.pth")
    txt = tmp_path / "notes.pth"
    txt.write_text("definitely not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth: not a readable PyTorch"):
        load_torch_state_dict(txt)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(ValueError, match=r"list\.pth: expected a state dict"):
        load_torch_state_dict(lst)
    obj = tmp_path / "obj.pth"
    torch.save({"w": torch.zeros(2), "step": 3}, obj)
    with pytest.raises(ValueError, match=r"obj\.pth: entry 'step' is a int"):
        load_torch_state_dict(obj)
    pickled = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1.0)}, pickled)  # a global weights_only refuses
    with pytest.raises(ValueError, match=r"pickled\.pth: not a readable PyTorch") as ei:
        load_torch_state_dict(pickled)
    assert "\n" not in str(ei.value)  # torch's message runs over many lines; ours is one
    bad_zip = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    with pytest.raises(ValueError, match=r"bad\.pth"):
        load_torch_state_dict(bad_zip)


def test_torchscript_needs_opt_in(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Parameter(torch.arange(6, dtype=torch.float16).reshape(2, 3))

        def forward(self, x):
            return x @ self.proj

    p = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(p))
    with pytest.raises(ValueError, match=r"ViT-tiny\.pt: is a TorchScript archive.*--allow-torchscript \(main.py convert\)"):
        load_torch_state_dict(p)
    sd = load_torch_state_dict(p, allow_torchscript=True)
    assert list(sd) == ["proj"] and sd["proj"].dtype == np.float32
    np.testing.assert_array_equal(sd["proj"], np.arange(6, dtype=np.float32).reshape(2, 3))
    # the CLI's --allow-torchscript reaches the loader: the archive is read, then found not to be a CLIP
    from clipseg_jax.commands import run_convert

    torch.save({"film_mul.weight": torch.zeros(2)}, tmp_path / "dec.pth")
    with pytest.raises(ValueError, match="TorchScript"):
        run_convert(None, str(tmp_path / "o"), original_decoder=str(tmp_path / "dec.pth"), clip_weights=str(p))
    with pytest.raises(ValueError) as ei:
        run_convert(None, str(tmp_path / "o"), original_decoder=str(tmp_path / "dec.pth"), clip_weights=str(p),
                    allow_torchscript=True)
    assert "TorchScript" not in str(ei.value) and not (tmp_path / "o").exists()


def test_converted_original_weights_get_a_working_processor(case, tmp_path):
    """Original .pth weights carry no tokenizer or image processor: convert --to-hf writes CIDAS-like ones."""
    from transformers import CLIPSegProcessor

    from clipseg_jax.commands import run_convert
    from clipseg_jax.tokenizer import CLIPTokenizer

    kw = {} if case["spec"]["extract"] is None else {"extract_layers": case["spec"]["extract"]}
    out = run_convert(None, str(tmp_path / "hf"), to_hf=True, original_decoder=str(case["dec_path"]),
                      clip_weights=str(case["clip_path"]), **kw)
    proc = CLIPSegProcessor.from_pretrained(out)
    texts = ["a photo of a cat", "A Red umbrella!"]
    ids, _ = CLIPTokenizer.from_pretrained(None)(texts)
    got = proc(text=texts, padding="max_length", max_length=ids.shape[1], return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(got, ids)
    assert proc.image_processor.size == {"height": 352, "width": 352} and proc.image_processor.resample == 2


def _full_size_original(reduce_dim: int, refined: bool) -> tuple[dict, dict]:
    """ViT-B/16 CLIP + decoder shapes (section 4.3 of the spec) as zero-cost broadcast views."""
    z = lambda *s: np.broadcast_to(np.float32(0.5), s)  # noqa: E731
    clip = {"visual.class_embedding": z(768), "visual.positional_embedding": z(197, 768), "visual.proj": z(768, 512),
            "visual.conv1.weight": z(768, 3, 16, 16), "token_embedding.weight": z(49408, 512),
            "positional_embedding": z(77, 512), "text_projection": z(512, 512), "logit_scale": z(),
            "ln_final.weight": z(512), "ln_final.bias": z(512)}  # fmt: skip
    for n in ("ln_pre", "ln_post"):
        clip[f"visual.{n}.weight"], clip[f"visual.{n}.bias"] = z(768), z(768)
    for pre, w in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            b = f"{pre}.resblocks.{i}."
            clip.update({b + "attn.in_proj_weight": z(3 * w, w), b + "attn.in_proj_bias": z(3 * w),
                         b + "attn.out_proj.weight": z(w, w), b + "attn.out_proj.bias": z(w),
                         b + "ln_1.weight": z(w), b + "ln_1.bias": z(w), b + "ln_2.weight": z(w), b + "ln_2.bias": z(w),
                         b + "mlp.c_fc.weight": z(4 * w, w), b + "mlp.c_fc.bias": z(4 * w),
                         b + "mlp.c_proj.weight": z(w, 4 * w), b + "mlp.c_proj.bias": z(w)})  # fmt: skip
    D = reduce_dim
    dec = {"film_mul.weight": z(D, 512), "film_mul.bias": z(D), "film_add.weight": z(D, 512), "film_add.bias": z(D),
           "reduce.weight": z(D, 768), "reduce.bias": z(D)}  # fmt: skip
    for i in range(3):
        dec.update({f"reduces.{i}.weight": z(D, 768), f"reduces.{i}.bias": z(D),
                    f"blocks.{i}.self_attn.in_proj_weight": z(3 * D, D), f"blocks.{i}.self_attn.in_proj_bias": z(3 * D),
                    f"blocks.{i}.self_attn.out_proj.weight": z(D, D), f"blocks.{i}.self_attn.out_proj.bias": z(D),
                    f"blocks.{i}.linear1.weight": z(2048, D), f"blocks.{i}.linear1.bias": z(2048),
                    f"blocks.{i}.linear2.weight": z(D, 2048), f"blocks.{i}.linear2.bias": z(D),
                    f"blocks.{i}.norm1.weight": z(D), f"blocks.{i}.norm1.bias": z(D),
                    f"blocks.{i}.norm2.weight": z(D), f"blocks.{i}.norm2.bias": z(D)})  # fmt: skip
    if refined:
        dec.update({"trans_conv.0.weight": z(D, D, 3, 3), "trans_conv.0.bias": z(D), "trans_conv.2.weight": z(D, D // 2, 4, 4),
                    "trans_conv.2.bias": z(D // 2), "trans_conv.4.weight": z(D // 2, 1, 4, 4), "trans_conv.4.bias": z(1)})  # fmt: skip
    else:
        dec.update({"trans_conv.weight": z(D, 1, 16, 16), "trans_conv.bias": z(1)})
    return dec, clip


@pytest.mark.slow
@pytest.mark.parametrize("name,rd,refined", [("clipseg-rd64-refined", 64, True), ("clipseg-rd64", 64, False),
                                             ("clipseg-rd16", 16, False)])  # fmt: skip
def test_full_size_config_matches_cidas(name, rd, refined):
    """ViT-B/16 shapes -> config equal to the CIDAS config.json fields, keys/shapes equal to the HF model's."""
    sd, cfg = original_to_hf(*_full_size_original(rd, refined))
    ref = json.loads((REFERENCE / f"{name}.config.json").read_text())
    hf_cfg = transformers.CLIPSegConfig(**cfg).to_dict()
    for k, v in cfg.items():
        if k in ("text_config", "vision_config"):
            for kk in v:
                assert hf_cfg[k][kk] == ref[k][kk], (k, kk, hf_cfg[k][kk], ref[k][kk])
        else:
            assert hf_cfg[k] == ref[k], (k, hf_cfg[k], ref[k])
    with torch.device("meta"):  # shapes only, no 600 MB allocation
        model = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig(**cfg))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert want == {k: v.shape for k, v in sd.items()}
