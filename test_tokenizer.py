"""Tests of tokenizer.py: GemmaTokenizer gives the ids of Hugging Face `tokenizers` on the same tokenizer.json.

    python -m pytest -q test_tokenizer.py
"""
import json
import random

import pytest
import torch

import tokenizer
from conftest import one_line_naming


def train_bpe(corpus, n_merges, cut_words):
    """A tiny BPE trainer (most frequent pair first) so the tokenizer test has real, irregular merges."""
    seqs = [list(w) for s in corpus for w in (s.replace("\u2581", " \u2581").split(" ") if cut_words else [s]) if w]
    merges = []
    for _ in range(n_merges):
        counts = {}
        for s in seqs:
            for a, b in zip(s, s[1:]):
                counts[a, b] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: kv[1])
        merges.append([a, b])
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return merges


ALPHABET = list("abcdeéèfghijklmnoöpqrstuvwxyz ABCXYZ0123.,!\"'\n\t") + ["  ", "   ", "\n\n", "猫", "写真", "🙂", "👍🏽", "ß", "İ"]


def random_text(rng, n):
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture(scope="module", params=["cut", "cross"])
def tokenizers_pair(request, tmp_path_factory):
    """A Gemma-structured tokenizer.json (normalizer, BPE byte_fallback, merges, added tokens) + HF's reading."""
    rng = random.Random(0)
    spec = tokenizer.gemma_tokenizer_json(["photo", "cat", "red"])
    corpus = [random_text(rng, 40).replace(" ", "\u2581") for _ in range(300)]
    vocab = spec["model"]["vocab"]
    for ch in "abcdeéfghijklmnopqrstuvwxyz\u2581ABC0123.,\n猫":  # some characters are missing: byte fallback
        vocab.setdefault(ch, len(vocab))
    corpus = ["".join(c for c in s if c in vocab) for s in corpus]
    for a, b in train_bpe(corpus, 250, cut_words=request.param == "cut"):
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            spec["model"]["merges"].append([a, b])
    for content in ["<start_of_turn>", "\n\n", "\u2581\u2581"]:  # Gemma's user-defined pieces: matched whole
        vocab.setdefault(content, max(vocab.values()) + 1)  # keeps its id if BPE already made that token
        spec["added_tokens"].append({"id": vocab[content], "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": content[0] == "<"})
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return tokenizer.GemmaTokenizer(str(path)), str(path), request.param


def test_tokenizer_matches_hf_on_random_strings(tokenizers_pair):
    from tokenizers import Tokenizer
    ours, path, mode = tokenizers_pair
    hf = Tokenizer.from_file(path)  # with the file's fixed padding to 64, truncation and "$A <eos>" template
    assert ours.cut_at_spaces == (mode == "cut")
    rng = random.Random(1)
    texts = [random_text(rng, rng.randint(0, 60)) for _ in range(2500)]
    texts += ["", " ", "   lead and trail   ", "a photo of a cat", "A Photo Of A CAT", "<start_of_turn>user\n\nhi",
              "naïve café ñandú", "猫の写真 🙂👍🏽", "x" * 10000, "cat " * 2500, random_text(rng, 10000)]
    batch = texts[:300] + texts[-5:]
    assert ours(batch).tolist() == [e.ids for e in hf.encode_batch([t.lower() for t in batch])]
    hf.no_padding()
    hf.no_truncation()
    bad = [t for t in texts if ours.encode(t) != hf.encode(t, add_special_tokens=False).ids]
    assert not bad, f"{len(bad)} mismatches of {len(texts)}, first {bad[0][:80]!r}"


def test_tokenizer_call_layout(tokenizers_pair):
    ours, _, _ = tokenizers_pair
    ids = ours(["A Photo", "cat " * 100])
    assert ids.shape == (2, 64) and ids.dtype == torch.long
    n = len(ours.encode("a photo"))
    assert ids[0, n].item() == 1 and (ids[0, n + 1:] == 0).all()  # EOS then pad 0
    assert ids[1, 63].item() == 1 and (ids[1, :63] != 0).all()  # truncated to 63 + EOS
    assert ours.decode(ours.encode("naïve café 猫 🙂")) == "naïve café 猫 🙂"


def test_gemma_tokenizer_json_words_are_single_tokens():
    """gemma_tokenizer_json (the toy encoder's tokenizer) spells each word as one token, with and without its leading
    space, and HF `tokenizers` reads the dict it returns the same way (a spec given as a dict, not a file)."""
    from tokenizers import Tokenizer
    words = ["cat", "at", "category", "red", "circle", "über"]  # "at" inside "cat": merges that compete
    spec = tokenizer.gemma_tokenizer_json(words)
    ours, hf = tokenizer.GemmaTokenizer(spec), Tokenizer.from_str(json.dumps(spec))
    hf.no_padding()
    hf.no_truncation()
    for w in words:
        assert len(ours.encode(w)) == 1 and len(ours.encode(" " + w)) == 1, w
    text = "a red category über cat at the circle"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_bad_tokenizer_json_reports_every_key(tmp_path):
    """A tokenizer.json with several unsupported settings fails in one line naming the file and each key."""
    spec = tokenizer.gemma_tokenizer_json(["cat"])
    spec["model"].update(type="WordPiece", dropout=0.1)
    spec["model"]["merges"].append(["r", "e", "d"])
    path = str(tmp_path / "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    with pytest.raises(ValueError) as e:
        tokenizer.GemmaTokenizer(path)
    one_line_naming(e, path, "key 'model.type' is 'WordPiece'", "key 'model.dropout' is 0.1",
                    "key 'model.merges' has an entry that is not a pair of tokens: ['r', 'e', 'd']")
