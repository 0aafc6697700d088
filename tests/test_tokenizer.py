"""clipseg_jax.tokenizer: id parity with transformers.CLIPTokenizer, buckets, padding, truncation, offline use."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from clipseg_jax.tokenizer import SHIPPED_VOCAB, CLIPTokenizer, shipped_vocab_and_merges

BOS, EOS = 49406, 49407
REPO = Path(__file__).resolve().parents[1]

HAND_WRITTEN = [
    "",
    " ",
    "   \t\n  ",
    "a",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a   photo\tof\n\na cat  ",
    "  leading and trailing  ",
    "the dog's ball isn't here, they're sure we've I'm you'll he'd",
    "THE DOG'S BALL ISN'T HERE",
    "don`t ’s curly apostrophe’s",
    "hello, world! what?! ... -- ;;; :) (x) [y] {z} <tag> a/b\\c",
    "12345 3.14159 1,000,000 2nd 3rd 21st 0x1F 1e-5",
    "café naïve résumé Ångström façade coöperate",
    "cafe\u0301 nai\u0308ve",  # decomposed accents: NFC must compose them
    "Straße ß ǅ ﬁ ligature ＡＢＣ fullwidth",
    "日本語のテキスト 中文 한국어 русский текст ελληνικά עברית العربية हिन्दी",
    "emoji 🐱🐶 🚗💨 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ 👍🏽",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;",
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> b <|startoftext|> c",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "<|endoftext",
    "zero\u200bwidth\u00a0nbsp\u2003emspace",
    "tab\tnew\nline\rcr",
    "control \x00\x01\x7f chars",
    "mixedCase CamelCaseWord snake_case_word kebab-case-word",
    "www.example.com https://x.org/a?b=c&d=e#f user@mail.com",
    "#hashtag @mention $100 50% ^caret ~tilde *star* _under_",
    "a very very very very very very very very very very very very very long prompt",
    "red car. blue car! green car? yellow car;",
    "the object on the left",
    "something to fill",
    "a glass",
    "ΑΒΓ İstanbul ǈ Σσς",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    """Deterministic mixes of words, punctuation, digits, unicode, emoji, entities and odd whitespace."""
    rng = random.Random(seed)
    pieces = [
        "cat", "Dog", "PHOTO", "of", "a", "the", "glass", "'s", "'t", "'re", "'ll", "n't", "it's", "O'Neil",
        "!", "?", "...", ",", "-", "—", "–", "(", ")", "\"", "'", "`", "&amp;", "&lt;", "&#x27;", "&", "#", "@",
        "0", "7", "42", "1999", "3.5", "½", "²", "٣", "café", "Ünïcödé", "ñ", "ç", "ø", "日本", "猫", "😀", "🐈",
        "👍🏿", "🇩🇪", "\u0301", "\u200d", " ", "  ", "\t", "\n", "\u3000", "\u00a0", "ß", "ﬀ", "İ", "Σ",
    ]  # fmt: skip
    out = []
    for _ in range(n):
        k = rng.randint(1, 14)
        sep = rng.choice(["", " ", " ", " ", "  "])
        out.append(sep.join(rng.choice(pieces) for _ in range(k)))
    return out


STRINGS = HAND_WRITTEN + _random_strings(300)


def _bytes_to_unicode() -> dict[int, str]:
    # Written out here (not imported) so the files below are derived independently of the module under test.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    """vocab.json + merges.txt derived from the shipped gz as OpenAI's SimpleTokenizer does."""
    d = tmp_path_factory.mktemp("clip_vocab")
    lines = gzip.open(SHIPPED_VOCAB, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_tok(vocab_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained()


def test_shipped_vocab_layout(ours, vocab_dir):
    vocab, merges = shipped_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab == json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.max_length) == (BOS, EOS, EOS, 77)
    assert ours.BUCKETS == (8, 16, 32, 77)
    # Well-known CLIP ids (e.g. clip.tokenize("a photo of a cat")).
    assert ours.encode("a photo of a cat") == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ours.encode("a dog") == [BOS, 320, 1929, EOS]
    assert ours.encode("") == [BOS, EOS]


def test_ids_match_transformers_from_vocab_files(ours, hf_tok):
    assert len(STRINGS) > 300
    mismatches = [(s, ours.encode(s), hf_tok(s)["input_ids"]) for s in STRINGS if ours.encode(s) != hf_tok(s)["input_ids"]]
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("source", ["save_pretrained", "vocab_merges_dir"])
def test_ids_match_transformers_from_saved_dirs(source, hf_tok, vocab_dir, tmp_path):
    if source == "save_pretrained":
        hf_tok.save_pretrained(tmp_path)
        assert (tmp_path / "tokenizer.json").is_file()
        d = tmp_path
    else:
        d = vocab_dir
    ours = CLIPTokenizer.from_pretrained(d)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (BOS, EOS, EOS)
    for s in STRINGS:
        assert ours.encode(s) == hf_tok(s)["input_ids"], s


def test_fast_tokenizer_saved_dir_and_truncation_settings_ignored(hf_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.CLIPTokenizerFast.from_pretrained(_save(hf_tok, tmp_path / "slow"))
    fast.save_pretrained(tmp_path / "fast")
    # A tokenizer.json carrying truncation/padding must not truncate our untruncated encode().
    data = json.loads((tmp_path / "fast" / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "fast" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    ours = CLIPTokenizer.from_pretrained(tmp_path / "fast")
    s = "a photo of a cat on a red sofa"
    assert ours.encode(s) == fast(s, truncation=False)["input_ids"] and len(ours.encode(s)) == 11


def _save(tok, d: Path) -> Path:
    tok.save_pretrained(d)
    return d


def test_batch_matches_transformers_padding(ours, hf_tok):
    texts = STRINGS[:40]
    ids, mask = ours(texts)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    L = ids.shape[1]
    ref = hf_tok(texts, padding="max_length", max_length=L, truncation=True)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"]))


def test_buckets_and_explicit_length(ours):
    assert [ours.bucket_for(n) for n in (0, 2, 8, 9, 16, 17, 32, 33, 77, 78, 500)] == [8, 8, 8, 16, 16, 32, 32, 77, 77, 77, 77]
    ids, mask = ours(["a cat", "a photo of a cat"])
    assert ids.shape == (2, 8)
    np.testing.assert_array_equal(mask.sum(-1), [4, 7])
    ids, _ = ours(["word " * 10])  # 12 tokens -> 16
    assert ids.shape == (1, 16)
    ids, _ = ours(["word " * 20])  # 22 tokens -> 32
    assert ids.shape == (1, 32)
    ids, _ = ours(["word " * 40])  # 42 tokens -> 77
    assert ids.shape == (1, 77)
    ids, mask = ours(["a cat"], length=77)
    assert ids.shape == (1, 77) and mask.sum() == 4
    np.testing.assert_array_equal(ids[0, 4:], EOS)


def test_argmax_is_eos_position(ours):
    texts = STRINGS[:80] + ["word " * 100]
    # A prompt that literally contains "<|endoftext|>" gets EOS mid-sequence (as in HF); pooling then uses that one.
    literal = np.array(["<|endoftext|>" in t for t in texts])
    assert 0 < literal.sum() < len(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in (None, 77):
            ids, mask = ours(texts, length=length)
            n = mask.sum(-1)
            np.testing.assert_array_equal(ids.argmax(-1)[~literal], (n - 1)[~literal])
            np.testing.assert_array_equal((ids == EOS).argmax(-1)[~literal], (n - 1)[~literal])
            np.testing.assert_array_equal(ids[np.arange(len(texts)), n - 1], EOS)
            assert (ids[:, 0] == BOS).all()
            # mask is a prefix of ones, padding is pad_id
            np.testing.assert_array_equal(mask, (np.arange(ids.shape[1])[None] < n[:, None]).astype(np.int32))
            assert (ids[mask == 0] == ours.pad_id).all()


def test_truncation_warns_once_and_forces_eos(ours, hf_tok):
    long1 = "a photo of a very " + "big " * 100 + "cat"
    long2 = "another " * 90
    with pytest.warns(UserWarning) as rec:
        ids, mask = ours(["a cat", long1, long2])
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert long1[:40] in msg and str(len(ours.encode(long1))) in msg
    assert ids.shape == (3, 77) and mask[1:].all()
    assert ids[1, -1] == EOS and ids[2, -1] == EOS
    assert list(ids[1, :-1]) == ours.encode(long1)[:76]
    ref = hf_tok([long1, long2], padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids[1:], np.asarray(ref))
    # Explicit shorter length also truncates with EOS last.
    with pytest.warns(UserWarning, match="truncated to 8"):
        ids, _ = ours(["a photo of a cat on a red sofa"], length=8)
    assert list(ids[0]) == ours.encode("a photo of a cat on a red sofa")[:7] + [EOS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(["a cat"] * 3)  # no warning when nothing is truncated


def test_bad_input(ours, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ours([])
    for bad in (0, 1, 78, 2.5):
        with pytest.raises(ValueError, match="length"):
            ours(["a cat"], length=bad)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        ours(["a cat", 3])
    with pytest.raises(TypeError):
        ours.encode(None)
    with pytest.raises(ValueError):
        ours.bucket_for(-1)
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    # bare string = batch of one
    ids, _ = ours("a cat")
    assert ids.shape == (1, 8)


def test_dir_without_tokenizer_files_uses_shipped_vocab(tmp_path, ours):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.encode("a photo of a cat") == ours.encode("a photo of a cat")


def test_works_without_torch_and_transformers():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from clipseg_jax.tokenizer import CLIPTokenizer
        tok = CLIPTokenizer.from_pretrained()
        ids, mask = tok(["a photo of a cat", "a dog"])
        assert ids.tolist()[0] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407], ids
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
