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


# ----------------------------------------------------------------------------- Qwen2 byte-level BPE
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]  # added, never split, but special: false in Qwen2.5's files
SCALE_RAE = ["<im_start>", "<im_end>"]  # what Scale-RAE adds (special, normalized: false)
WORDS = ("a photo of the cat dog red blue green small large wooden table window sill sitting on under next to "
         "painting city night street people running It's they're we've I'm you'll he'd DON'T 'S 'LL x1 42 3.14 "
         "naïve café Straße Ärger façade señor Ελλάδα γάτα кошка окно мир Ўсё ქართული Հայաստան 猫 の 写真 東京 "
         "猫咪坐在窗台上 고양이 사진 한국어 القطة على النافذة שלום עולם नमस्ते बिल्ली ภาษาไทย แมว ኢትዮጵያ தமிழ் "
         "١٢٣ ४५ ๑๒ Ⅻ ½ ² 🙂 👍🏽 🐈‍⬛ ✨ → € $ % & * # @ ( ) [ ] { } : ; , . ! ? - _ = + / \\ | ~ ` ^ < >").split()


def caption(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) + rng.choice([".", "", "!", "\n", " "])


def chatml(prompt):
    """Scale-RAE's prompt (conversation template qwen_2): ChatML, system "You are a helpful assistant.\""""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + prompt +
            "<|im_end|>\n<|im_start|>assistant\n")


def unicode_pools():
    """Code points by general category (Unicode of this Python), plus letters/numbers newer than it (Cn here)."""
    import unicodedata
    pools = {}
    for cp in range(0x110000):
        if not 0xD800 <= cp < 0xE000:  # lone surrogates cannot be encoded, by us or by HF
            pools.setdefault(unicodedata.category(chr(cp)), []).append(chr(cp))
    newer = [*range(0x31350, 0x31360), *range(0x13460, 0x13470), 0x1C89, *range(0x10D40, 0x10D4A)]  # Unicode 15-16
    pools["newer"] = [chr(cp) for cp in newer]
    return pools


def qwen2_texts(seed=3):
    """The strings both Qwen2 tests compare on: ChatML, every category, whitespace, contractions, NFC, random."""
    rng, pools = random.Random(seed), unicode_pools()
    cats = sorted(pools)
    ws = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\u00a0", "\u3000", "\x0b", "\x0c", "\x1c", "\x1f", "\x85",
          "\u2028", "\u2029", "\u200b", "\u180e", "\u2007", "\u202f"]
    marks = ["\u0301", "\u0300", "\u0323", "\u0302", "\u0308", "\u030a", "\u0327", "\u0338", "\u3099", "\u0c56"]
    bases = list("aeiouAEOUnscCzZ<>=") + ["\u1100", "\u1161", "\u11a8", "\u212b", "\u2126", "\u212a", "ſ", "\u0386"]
    specials = QWEN2_SPECIALS + QWEN2_PLAIN + SCALE_RAE
    texts = [chatml(caption(rng)) for _ in range(600)]
    texts += [chatml(caption(rng) + "<im_start>" + caption(rng) + "<im_end>") + "Here you go:\n<im_start>"
              for _ in range(200)]
    for cat in cats:  # every general category, alone and between letters, digits, spaces and specials
        for _ in range(60):
            pick = lambda: rng.choice(pools[cat])  # noqa: E731
            texts.append("".join(rng.choice([pick(), pick() * 3, rng.choice(WORDS), " ", "1", "x", rng.choice(ws),
                                             rng.choice(specials), "'s"]) for _ in range(rng.randint(1, 12))))
    for _ in range(600):  # whitespace runs, trailing ones, and the contractions in mixed case
        texts.append("".join(rng.choice(ws * 3 + WORDS + ["'s", "'S", "'T", "'Re", "'rE", "'VE", "'m", "'LL", "'lL",
                                                          "'d", "'D", "'x", "’s", "''s", "'ſ", "'K"])
                             for _ in range(rng.randint(1, 20))))
    for _ in range(600):  # combining sequences that NFC reorders and composes, Hangul jamo, singletons
        texts.append("".join(rng.choice(bases + [" ", rng.choice(WORDS), rng.choice(specials)]) +
                             "".join(rng.choice(marks) for _ in range(rng.randint(0, 3)))
                             for _ in range(rng.randint(1, 8))))
    for _ in range(3200):  # random code points, weighted toward the common ranges
        n = rng.choice([1, 2, 5, 20, 80])
        texts.append("".join(rng.choice(pools[rng.choice(cats)]) if rng.random() < 0.3 else
                             chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0, 0xFF), rng.randint(0, 0x2FFF),
                                             rng.randint(0x3000, 0xD7FF), rng.randint(0x1F300, 0x1FAFF)]))
                             if rng.random() < 0.9 else rng.choice(ws + specials) for _ in range(n)))
    texts += ["", " ", "\n", "   trailing   ", "x" * 3000, "猫" * 500, "1" * 200, " \n" * 100, caption(rng) * 50]
    return texts


def same_nfc(text):
    """Whether the slow tokenizer's NFC (Python's, on the whole text) and tokenizers' NFC (Unicode 9.0 data, after
    the added tokens are cut out) agree on `text`: U+0338 composes with an added token's ">"."""
    import unicodedata
    from tokenizers import normalizers
    return "\u0338" not in text and normalizers.NFC().normalize_str(text) == unicodedata.normalize("NFC", text)


@pytest.fixture(scope="module")
def qwen2_folders(tmp_path_factory):
    """A tiny Qwen2 tokenizer: BPE trained by HF `tokenizers` with Qwen2's pipeline (tokenizers' Qwen2Converter:
    NFC, Split on the Qwen2 regex + ByteLevel without prefix space or regex, ByteLevel decoder and post-processor)
    and Qwen2's added tokens after the BPE vocab, then Scale-RAE's two. Written as tokenizer.json (folder "fast")
    and as the files transformers 4.x's slow Qwen2Tokenizer.save_pretrained writes (folder "slow")."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    rng = random.Random(0)
    hf = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [caption(rng) for _ in range(3000)] + [chatml(caption(rng)) for _ in range(300)]
    hf.train_from_iterator(corpus, BpeTrainer(vocab_size=1500, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_tokens([AddedToken(t, special=t not in QWEN2_PLAIN, normalized=False) for t in QWEN2_SPECIALS + QWEN2_PLAIN])
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in SCALE_RAE])
    spec = json.loads(hf.to_str())
    # as in Qwen2's file (the trainer leaves null, which means the same)
    spec["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
    fast, slow = tmp_path_factory.mktemp("fast"), tmp_path_factory.mktemp("slow")
    (fast / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (slow / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    (slow / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in spec["model"]["merges"]),
                                     encoding="utf-8")
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(t["id"]): {"content": t["content"], **flags, "special": t["special"]} for t in spec["added_tokens"]}
    config = {"added_tokens_decoder": decoder, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + SCALE_RAE,
              "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (slow / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (slow / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in spec["added_tokens"]}))
    (slow / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": config["additional_special_tokens"],
        "eos_token": {"content": "<|im_end|>", **flags}, "pad_token": {"content": "<|endoftext|>", **flags}}))
    return str(fast), str(slow)


def test_qwen2_matches_hf_tokenizers(qwen2_folders):
    """0 mismatches against HF `tokenizers` on ~7,000 strings, from both file kinds; decode inverts encode."""
    import unicodedata
    from tokenizers import Tokenizer
    fast, slow = qwen2_folders
    hf = Tokenizer.from_file(fast + "/tokenizer.json")
    ours, ours_slow = tokenizer.Qwen2Tokenizer(fast), tokenizer.Qwen2Tokenizer(slow)
    texts = qwen2_texts()
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    got = [ours.encode(t) for t in texts]
    bad = [t for t, a, b in zip(texts, got, want) if a != b]
    assert not bad, f"{len(bad)} mismatches of {len(texts)}, first {bad[0][:80]!r}"
    # the slow files give the same ids, but where the two NFCs differ (see test_qwen2_nfc_of_slow_and_fast_files)
    bad = [t for t, a in zip(texts, want) if ours_slow.encode(t) != a and same_nfc(t)]
    assert not bad, f"slow files: {len(bad)} mismatches of {len(texts)}, first {bad[0][:80]!r}"
    assert [ours.decode(i) for i in got] == hf.decode_batch(got, skip_special_tokens=False)
    assert all(ours_slow.decode(ours_slow.encode(t)) == unicodedata.normalize("NFC", t) for t in texts)
    assert len(ours) == len(ours_slow) == hf.get_vocab_size(with_added_tokens=True)
    assert len(texts) > 6000 and sum(map(len, got)) > 200_000


def test_qwen2_chatml_ids(qwen2_folders):
    fast, _ = qwen2_folders
    tok = tokenizer.Qwen2Tokenizer(fast)
    ids = tok.encode(chatml("A cat.") + "Here you go:\n<im_start>")
    im_start, im_end, new_start = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<im_start>"))
    assert ids[0] == im_start and ids[-1] == new_start and ids.count(im_end) == 2 and ids.count(im_start) == 3
    assert new_start == len(tok) - 2 and tok.id_to_token(new_start) == "<im_start>"  # appended last, like 151665
    assert tok.token_to_id("<im_star>") is None and tok.id_to_token(10 ** 9) is None
    assert tok.decode(ids) == chatml("A cat.") + "Here you go:\n<im_start>"
    assert tok.decode([tok.token_to_id(tokenizer.bytes_to_unicode()[0xE7])]) == "\ufffd"  # half a character


def test_qwen2_reads_merges_as_strings(qwen2_folders, tmp_path):
    """Older tokenizer.json files (Qwen2's own among them) spell each merge "a b", not ["a", "b"]."""
    fast, _ = qwen2_folders
    spec = json.loads(open(fast + "/tokenizer.json", encoding="utf-8").read())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    texts = qwen2_texts()[::20]
    old, new = tokenizer.Qwen2Tokenizer(fast), tokenizer.Qwen2Tokenizer(str(tmp_path))
    assert [old.encode(t) for t in texts] == [new.encode(t) for t in texts]


def test_qwen2_pretokenizer_on_every_code_point():
    """qwen2_pretokenize (Python re with Unicode classes) cuts every code point, in order and shuffled among the
    others, exactly where HF's Split on the Qwen2 regex (onig, \\p{L} / \\p{N}) cuts it."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert tokenizer.QWEN2_REGEX == PRETOKENIZE_REGEX
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
    random.Random(0).shuffle(shuffled := chars[:])
    for text in ["".join(chars), "".join(shuffled)]:
        assert tokenizer.qwen2_pretokenize(text) == [piece for piece, _ in split.pre_tokenize_str(text)]


def test_qwen2_slow_files_match_transformers(qwen2_folders):
    """The slow files read as transformers reads them: its slow Qwen2Tokenizer (4.x, what Scale-RAE ran) where
    installed, else its own reading of vocab.json + merges.txt + tokenizer_config.json (5.x)."""
    transformers = pytest.importorskip("transformers")
    _, slow = qwen2_folders
    ref = transformers.AutoTokenizer.from_pretrained(slow, use_fast=False)
    is_slow = hasattr(ref, "bpe_ranks")
    ours = tokenizer.Qwen2Tokenizer(slow)
    texts = [t for t in qwen2_texts(seed=4)[::2] if is_slow or same_nfc(t)]
    bad = [t for t in texts if ours.encode(t) != ref.encode(t, add_special_tokens=False)]
    assert not bad, f"{len(bad)} mismatches of {len(texts)} (slow: {is_slow}), first {bad[0][:80]!r}"
    assert len(ours) == len(ref)


def test_qwen2_nfc_of_slow_and_fast_files(qwen2_folders):
    """Where the two file kinds differ, each follows its reference. (1) ">" + U+0338 is NFC's U+226F: the slow
    tokenizer (NFC first) no longer sees "<|im_end|>", `tokenizers` (added tokens first, then NFC) does. (2) The NFC
    of `tokenizers` has Unicode 9.0 data, so it leaves marks of Unicode 10.0+ (U+08FC, U+07FD: 11.0) unordered."""
    import unicodedata
    from tokenizers import Tokenizer
    fast, slow = qwen2_folders
    hf = Tokenizer.from_file(fast + "/tokenizer.json")
    ours, ours_slow = tokenizer.Qwen2Tokenizer(fast), tokenizer.Qwen2Tokenizer(slow)
    for text in ["hi<|im_end|>\u0338", "a\u08fc\u07fd", "e\u0301\u1df6\u0323"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids and ids != ours_slow.encode(text), text
        assert ours_slow.decode(ours_slow.encode(text)) == unicodedata.normalize("NFC", text)
    assert ours_slow.decode(ours_slow.encode("hi<|im_end|>\u0338")) == "hi<|im_end|\u226f"


def test_qwen2_bad_folders(tmp_path, qwen2_folders):
    """A folder without the files, with half the slow files, or with a foreign tokenizer.json: one line each."""
    with pytest.raises(ValueError) as e:
        tokenizer.Qwen2Tokenizer(str(tmp_path))
    one_line_naming(e, str(tmp_path), "no tokenizer.json", "merges.txt + vocab.json")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        tokenizer.Qwen2Tokenizer(str(tmp_path))
    one_line_naming(e, str(tmp_path), "no merges.txt")
    (tmp_path / "vocab.json").unlink()
    spec = json.loads(open(qwen2_folders[0] + "/tokenizer.json", encoding="utf-8").read())
    spec["normalizer"], spec["model"]["dropout"] = None, 0.1
    spec["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = True  # GPT-2's regex after Qwen2's: other pieces
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as e:
        tokenizer.Qwen2Tokenizer(str(tmp_path))
    one_line_naming(e, str(tmp_path), "key 'model.dropout' is 0.1", "key 'normalizer' is None", "key 'pre_tokenizer'")
