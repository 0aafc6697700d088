"""End-to-end runs of ``main_eval`` on tiny datasets in the official layouts with a tiny
converted model, checked against a reference built from transformers' PyTorch CLIPSeg and
the NumPy metric reference of test_metrics."""

import argparse
import json

import numpy as np
import pytest

from clipseg_jax.evaluate import main_eval, pascal5i, pascal_zs, phrasecut
from clipseg_jax.tokenizer import CLIPTokenizer

from eval_fixtures import write_phrasecut, write_tiny_model
from test_metrics import ref_metrics

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import CLIPSegForImageSegmentation

    return CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()


def args(model_dir, dataset, data_dir, out=None, **kw):
    a = dict(checkpoint=str(model_dir), dataset=dataset, data_dir=str(data_dir), fold=0,
             output=None if out is None else str(out), batch_size=3, dtype="float32", limit=None,
             support="visual", split="test")
    a.update(kw)
    return argparse.Namespace(**a)


def hf_text_probs(hf_model, px, prompts):
    ids, mask = CLIPTokenizer.from_pretrained(None)(prompts)
    with torch.no_grad():
        out = hf_model(pixel_values=torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2))),
                       input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return torch.sigmoid(out.logits).reshape(len(px), *px.shape[1:3]).numpy()


def hf_visual_probs(hf_model, px, spx):
    with torch.no_grad():
        out = hf_model(pixel_values=torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2))),
                       conditional_pixel_values=torch.from_numpy(np.ascontiguousarray(spx.transpose(0, 3, 1, 2))))
    return torch.sigmoid(out.logits).reshape(len(px), *px.shape[1:3]).numpy()


def assert_close_metrics(res, ref, atol=2e-3):
    for name in ("fgiou", "miou", "biniou"):
        np.testing.assert_allclose(res[f"{name}_scores"], ref[name], rtol=0, atol=atol)
    assert res["ap"] == pytest.approx(ref["ap"], abs=atol)


def test_phrasecut_end_to_end(model_dir, hf_model, pc_root, tmp_path, capsys):
    out = tmp_path / "pc.json"
    assert main_eval(args(model_dir, "phrasecut", pc_root, out)) == 0
    printed = capsys.readouterr().out
    assert "PhraseCut test (Table 3)" in printed and "paper CLIPSeg (PC+)" in printed and "43.4" in printed
    res = json.loads(out.read_text())
    assert res["n_samples"] == 4 and res["n_skipped_invalid_images"] == 1
    assert res["paper"]["rows"][0] == {"model": "CLIPSeg (PC+)", "t": 0.3, "miou": 43.4, "fgiou": 54.7, "ap": 76.7}
    m = res["metrics"]
    for k in ("fgiou_0.3", "miou_0.3", "biniou_0.3", "ap", "fgiou_best", "miou_best", "fgiou_best_t", "miou_best_t"):
        assert k in m
    assert m["n_classes"] == 4  # every sample is its own class
    assert 0.0 < m["fgiou_best"] <= 1.0
    # reference: the transformers model on the protocol's inputs, NumPy metric formulas
    root, tasks, _ = phrasecut.read_tasks(pc_root)
    samples = [phrasecut.load_sample(root, t) for t in tasks]
    probs = hf_text_probs(hf_model, np.stack([s[0] for s in samples]), [t.phrase for t in tasks])
    ref = ref_metrics([(probs[i], samples[i][1], np.ones((352, 352), bool), i) for i in range(4)])
    assert_close_metrics(m, ref)
    assert not list(tmp_path.glob(".pc.json.*"))  # no temp file left behind


def test_pascal5i_visual_end_to_end(model_dir, hf_model, voc_root, tmp_path, capsys):
    out = tmp_path / "p5.json"
    assert main_eval(args(model_dir, "pascal5i", voc_root, out, fold=0)) == 0
    assert "Pascal-5i one-shot, visual support (Table 5)" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["n_samples"] == 4 and res["fold"] == 0 and res["seed"] == 0
    eps = pascal5i.make_episodes(pascal5i.read_list(voc_root)[0], 0, seed=0)
    loaded = [pascal5i.load_episode(e, "visual") for e in eps]
    probs = hf_visual_probs(hf_model, np.stack([x[0] for x in loaded]), np.stack([x[1] for x in loaded]))
    samples = []
    for e, p, (_, _, tgt, ign) in zip(eps, probs, loaded):
        pr = F.interpolate(torch.from_numpy(p)[None, None], size=tgt.shape, mode="bilinear",
                           align_corners=True)[0, 0].numpy()
        samples.append((pr, tgt, ~ign, e.fold_index))
    assert_close_metrics(res["metrics"], ref_metrics(samples))


def test_pascal5i_text_all_folds(model_dir, voc_root, tmp_path, capsys):
    out = tmp_path / "p5t.json"
    assert main_eval(args(model_dir, "pascal5i", voc_root, out, fold=-1, support="text", limit=2)) == 0
    assert "mean of folds 0-3" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [f["fold"] for f in res["folds"]] == [0, 1, 2, 3] and res["support"] == "text"
    for k in ("miou_0.3", "biniou_0.3", "ap"):
        assert res["metrics"][k] == pytest.approx(np.mean([f["metrics"][k] for f in res["folds"]]))
    assert [f["n_samples"] for f in res["folds"]] == [2, 2, 2, 2] and res["n_samples"] == 8


def test_pascal_zero_shot_end_to_end(model_dir, hf_model, voc_root, tmp_path, capsys):
    out = tmp_path / "zs.json"
    assert main_eval(args(model_dir, "pascal_zs", voc_root, out, batch_size=2, limit=3)) == 0
    printed = capsys.readouterr().out
    assert "Pascal-VOC zero-shot (Table 4)" in printed and "as released score.py" in printed
    res = json.loads(out.read_text())
    cm = np.array(res["confusion_matrix"])
    _, items = pascal_zs.read_split(voc_root)
    items = items[:3]
    assert res["n_samples"] == 3
    loaded = [pascal_zs.load_sample(it) for it in items]
    labels = np.stack([x[1] for x in loaded])
    assert cm.sum() == (labels != 255).sum()
    px = np.stack([x[0] for x in loaded])
    k = len(pascal_zs.JOEM_VOC)
    scores = hf_text_probs(hf_model, np.repeat(px, k, axis=0), list(pascal_zs.JOEM_VOC) * len(px))
    scores = scores.reshape(len(px), k, *scores.shape[1:])
    scores[:, 0] *= 3
    pred = scores.argmax(1)
    keep = labels != 255
    ref = np.bincount(21 * labels[keep].astype(int) + pred[keep], minlength=441).reshape(21, 21)
    assert np.abs(cm - ref).sum() <= 1e-4 * keep.sum()  # float32 ties between prompts may flip a pixel
    m = res["metrics"]
    np.testing.assert_allclose(
        [m["per_class_iou"][n] for n in pascal_zs.JOEM_VOC], pascal_zs.iou_per_class(ref), atol=1e-3)


@pytest.mark.slow
def test_limit_and_bfloat16(model_dir, pc_root, tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main_eval(args(model_dir, "phrasecut", pc_root, out, limit=2, dtype="bfloat16", batch_size=2)) == 0
    res = json.loads(out.read_text())
    assert res["n_samples"] == 2 and res["metrics"]["n_samples"] == 2 and res["dtype"] == "bfloat16"


def test_bad_input_one_line(model_dir, pc_root, tmp_path, capsys):
    def run(**kw):
        capsys.readouterr()
        rc = main_eval(args(model_dir, **kw))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    assert "no such directory" in run(dataset="phrasecut", data_dir=tmp_path / "missing")
    empty = write_phrasecut(tmp_path / "e", tasks=[])
    assert "no tasks to evaluate" in run(dataset="phrasecut", data_dir=empty)
    assert "JPEGImages" in run(dataset="pascal5i", data_dir=tmp_path)
    assert "folds are 0, 1, 2, 3" in run(dataset="pascal5i", data_dir=tmp_path, fold=7)
    assert "--dataset" in run(dataset="coco", data_dir=tmp_path)
    assert "directory" in run(dataset="phrasecut", data_dir=pc_root, output=str(tmp_path / "no" / "x.json"))
    err = run(dataset="phrasecut", data_dir=pc_root, checkpoint=str(tmp_path / "nockpt"), output=str(tmp_path / "o.json"))
    assert "nockpt" in err
    assert not (tmp_path / "o.json").exists()
