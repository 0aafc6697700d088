"""Offline CLIP BPE tokenizer with length buckets.

Built on HF's Rust ``tokenizers`` only (no torch/transformers needed). The default vocabulary is OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` shipped in ``clipseg_jax/assets``; the backend is assembled the same way
``transformers``' CLIP tokenizer assembles it, so ids match ``transformers.CLIPTokenizer`` exactly.

Note: like the HF tokenizer (and unlike OpenAI's ``clip.tokenize``) no ``ftfy`` fixing or ``html.unescape`` is applied,
so e.g. ``"&amp;"`` is tokenized literally.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = ["CLIPTokenizer", "SHIPPED_VOCAB", "build_clip_backend", "shipped_vocab_and_merges"]

SHIPPED_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's split pattern, verbatim from OpenAI simple_tokenizer / transformers CLIPTokenizer (literal special tokens are
# matched before this, as added tokens on the raw text).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# OpenAI keeps merges[1 : 49152-256-2+1] of the gz file: 48,894 merges (line 0 is a version header).
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (same order as OpenAI's, which fixes the first 256 ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=4)
def _read_gz_merges(path: str) -> tuple[tuple[str, str], ...]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable gzip CLIP BPE merges file ({e})") from e
    merges = []
    for i, line in enumerate(lines[1 : _N_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{i}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _N_MERGES:
        raise ValueError(f"{path}: expected {_N_MERGES} merges after the header line, got {len(merges)}")
    return tuple(merges)


def shipped_vocab_and_merges(path: str | os.PathLike = SHIPPED_VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges exactly as OpenAI's ``SimpleTokenizer`` derives them from the ``.txt.gz`` file."""
    merges = list(_read_gz_merges(str(path)))
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` configured like ``transformers``' CLIP tokenizer (no post-processor: we add BOS/EOS)."""
    for tok in (BOS_TOKEN, EOS_TOKEN):
        if tok not in vocab:
            raise ValueError(f"CLIP vocabulary lacks the special token {tok!r}")
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            # use_regex stays at its default (True) because that is what transformers builds.
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Special tokens written literally in a prompt map to their ids (matched on the raw, un-normalised text), as in HF.
    tok.add_special_tokens(
        [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True) for t in (BOS_TOKEN, EOS_TOKEN)]
    )
    return tok


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if (i == 1 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{i}: expected a merge 'a b', got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """CLIP BPE tokenizer returning padded ``(input_ids, attention_mask)`` int32 arrays with bucketed lengths.

    Buckets keep the number of distinct text shapes (and hence jit compilations) small.
    """

    BUCKETS: tuple[int, ...] = (8, 16, 32, 77)

    def __init__(self, backend: Tokenizer, pad_token: str = EOS_TOKEN, max_length: int = 77) -> None:
        # encode() must be untruncated/unpadded; a tokenizer.json may carry either setting. Only touch the backend when
        # set, so the cached shipped backend (which has neither) is shared read-only between instances.
        self._tok = backend
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        ids = {}
        for name, tok in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", pad_token)):
            i = self._tok.token_to_id(tok)
            if i is None:
                raise ValueError(f"tokenizer vocabulary has no {name} token {tok!r}")
            ids[name] = i
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.max_length: int = int(max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "CLIPTokenizer":
        """Load ``tokenizer.json``, else ``vocab.json`` + ``merges.txt`` from ``path``; else the shipped vocabulary.

        ``pad_token`` is read from ``tokenizer_config.json`` when present (CIDAS: ``<|endoftext|>``), default EOS.
        """
        if path is not None:
            d = Path(path)
            if not d.exists():
                raise FileNotFoundError(f"tokenizer path does not exist: {d}")
            if d.is_file():
                raise ValueError(f"{d}: expected a directory (with tokenizer.json or vocab.json + merges.txt), got a file")
            pad = EOS_TOKEN
            cfg = d / "tokenizer_config.json"
            if cfg.is_file():
                try:
                    p = json.loads(cfg.read_text(encoding="utf-8")).get("pad_token")
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg}: invalid JSON ({e})") from e
                if isinstance(p, dict):  # serialised AddedToken
                    p = p.get("content")
                if isinstance(p, str):
                    pad = p
            if (d / "tokenizer.json").is_file():
                try:
                    backend = Tokenizer.from_file(str(d / "tokenizer.json"))
                except Exception as e:  # tokenizers raises plain Exception subclasses
                    raise ValueError(f"{d / 'tokenizer.json'}: cannot load tokenizer ({e})") from e
                return cls(backend, pad_token=pad)
            if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                try:
                    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{d / 'vocab.json'}: invalid JSON ({e})") from e
                return cls(build_clip_backend(vocab, _read_merges_txt(d / "merges.txt")), pad_token=pad)
        return cls(_shipped_backend())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with BOS/EOS, not truncated."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str prompt, got {type(text).__name__}: {text!r}")
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_id]

    def bucket_for(self, n_tokens: int) -> int:
        """Smallest bucket >= ``n_tokens`` (capped at ``max_length``: longer sequences get truncated)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        for b in self.BUCKETS:
            if b >= n_tokens and b <= self.max_length:
                return b
        return self.max_length

    def __call__(self, texts: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch: ``(input_ids, attention_mask)``, both int32 of shape ``(K, L)``.

        ``L = length`` if given, else ``bucket_for(longest)``. Padding uses ``pad_id`` with mask 0. Sequences longer than
        ``L`` (at most ``max_length``) are cut to ``L`` with EOS kept as the last token, with one warning per call.
        A bare ``str`` is treated as a batch of one.
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("texts is empty: need at least one prompt")
        if length is not None and not (isinstance(length, (int, np.integer)) and 2 <= length <= self.max_length):
            raise ValueError(f"length must be an int in [2, {self.max_length}] (BOS + EOS .. max_length), got {length!r}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r}")
        bodies = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        seqs = [[self.bos_id, *b, self.eos_id] for b in bodies]
        longest = max(len(s) for s in seqs)
        L = int(length) if length is not None else self.bucket_for(longest)
        ids = np.full((len(seqs), L), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), L), dtype=np.int32)
        too_long = [i for i, s in enumerate(seqs) if len(s) > L]
        if too_long:
            i = too_long[0]
            more = f" (and {len(too_long) - 1} more prompts)" if len(too_long) > 1 else ""
            warnings.warn(
                f"prompt {texts[i][:40]!r} has {len(seqs[i])} tokens > {L}; truncated to {L} with EOS last{more}",
                stacklevel=2,
            )
        for i, s in enumerate(seqs):
            if len(s) > L:
                s = s[: L - 1] + [self.eos_id]  # same as clip.tokenize(truncate=True) / HF truncation
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self._tok.get_vocab_size()}, max_length={self.max_length}, buckets={self.BUCKETS})"


@functools.lru_cache(maxsize=1)
def _shipped_backend() -> Tokenizer:
    # Cached: building 48,894 merges takes ~0.1-0.3 s and is identical every time; CLIPTokenizer copies it.
    return build_clip_backend(*shipped_vocab_and_merges())
