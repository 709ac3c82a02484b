"""Pure-Python BPE tokenizers, equal to Hugging Face `tokenizers` on the same tokenizer.json.

`GemmaTokenizer` reads the Gemma tokenizer.json that ships with SigLIP-2 (normalizer " " -> "\u2581", BPE with merges
by rank, byte fallback to <0xHH>, fused <unk>, added tokens matched before normalization) and gives the same ids as
`tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`; called on a list of texts it makes SigLIP-2's text
input (lowercase, 63 tokens + EOS, right-padded to 64). `gemma_tokenizer_json` writes a Gemma-format file whose
vocabulary spells each word of a list as one token: the tokenizer of the toy encoder and of the tests.
`Qwen2Tokenizer` is the byte-level BPE of Scale-RAE's LLM: added tokens split off, NFC, Qwen2's pre-tokenizer regex
(Python's `re`, with \\p{L} / \\p{N} built from unicodedata), GPT-2's bytes_to_unicode, merges by rank. It reads
tokenizer.json (the ids of `tokenizers`) or vocab.json + merges.txt + tokenizer_config.json (the ids of transformers'
slow Qwen2Tokenizer, which Scale-RAE loads). Imports only torch. Tests: python -m pytest -q test_tokenizer.py
"""
import functools
import heapq
import json
import os
import re
import unicodedata

import torch


# ----------------------------------------------------------------------------- shared by both BPEs
def bpe_merge(sym, merges):
    """Merge the lowest-rank adjacent pair (leftmost on ties) until none is left, as HF `tokenizers` does; O(n log n)
    with a heap. sym: the word's symbols; merges: {(a, b): (rank, a + b)}. Returns the merged symbols."""
    sym = list(sym)
    n = len(sym)
    nxt = list(range(1, n)) + [-1]
    prv = list(range(-1, n - 1))
    heap = [(merges[sym[i], sym[i + 1]][0], i, sym[i], sym[i + 1])
            for i in range(n - 1) if (sym[i], sym[i + 1]) in merges]
    heapq.heapify(heap)
    while heap:
        _, i, a, b = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] != a or j < 0 or sym[j] != b:  # stale: one side was merged away since the push
            continue
        sym[i], sym[j] = a + b, None
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        for l, r in ((prv[i], i), (i, nxt[i])):
            if l >= 0 and r >= 0 and (sym[l], sym[r]) in merges:
                heapq.heappush(heap, (merges[sym[l], sym[r]][0], l, sym[l], sym[r]))
    return [s for s in sym if s is not None]


def added_regex(tokens):
    """One regex over added tokens ({"content", "lstrip", "rstrip", "single_word"} dicts), longest first so that
    the match is leftmost-longest, as HF's Aho-Corasick split; None for no tokens."""
    if not tokens:
        return None
    alts = []
    for t in sorted(tokens, key=lambda t: -len(t["content"])):
        pat = re.escape(t["content"])
        if t.get("single_word"):
            pat = r"(?<!\w)" + pat + r"(?!\w)"
        alts.append((r"\s*" if t.get("lstrip") else "") + "(" + pat + ")" + (r"\s*" if t.get("rstrip") else ""))
    return re.compile("|".join(alts))


def split_added(s, regex, added):
    """Yield (text, None) for plain stretches of s and (None, id) for the added tokens (added: content -> id)."""
    pos = 0
    for m in regex.finditer(s) if regex else ():
        if m.start() > pos:
            yield s[pos:m.start()], None
        yield None, added[next(g for g in m.groups() if g is not None)]
        pos = m.end()
    if pos < len(s):
        yield s[pos:], None


# ----------------------------------------------------------------------------- Gemma BPE
class GemmaTokenizer:
    """Pure-Python BPE equal to HF `tokenizers` on a Gemma tokenizer.json: added tokens split first, then
    the normalizer (" " -> "\u2581"), then BPE with merges by rank, byte fallback to <0xHH>, fused <unk>."""
    def __init__(self, path, max_len=64, vocab_size=None):
        """path: a tokenizer.json file (or its parsed dict); vocab_size: the text tower's embedding rows, if known."""
        self.path, self.max_len = path if isinstance(path, str) else "<tokenizer dict>", max_len
        self.vocab_size = vocab_size
        try:
            if isinstance(path, dict):
                spec = path
            else:
                with open(path, encoding="utf-8") as f:
                    spec = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
        model, merges, added = self._check(spec)
        self.vocab = model["vocab"]
        # rank of each mergeable pair, and the token it makes (that token must exist in the vocab)
        self.merges = {(a, b): (rank, a + b) for rank, (a, b) in enumerate(merges)}
        for (a, b), (_, ab) in self.merges.items():
            if ab not in self.vocab:
                raise ValueError(f"{self.path}: merge {a!r} + {b!r} makes {ab!r}, which is not in the vocab")
        self.byte_fallback = model.get("byte_fallback", False)
        self.fuse_unk = model.get("fuse_unk", False)
        self.unk = model.get("unk_token")
        self.ignore_merges = model.get("ignore_merges", False)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        try:
            self.normalizers = self._flatten(spec.get("normalizer"), "normalizer")
            self.split = self._pre_tokenizer(spec.get("pre_tokenizer"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.path}: key 'normalizer' or 'pre_tokenizer' is malformed "
                             f"({type(e).__name__}: {e})") from None
        self.added = {t["content"]: t["id"] for t in added}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        # Added tokens are matched leftmost-longest before normalization (normalized=false), as HF does.
        raw = [t for t in added if not t.get("normalized", False)]
        norm = [t for t in added if t.get("normalized", False)]
        self.raw_re, self.norm_re = added_regex(raw), added_regex(norm)
        self.eos_id = self.added.get("<eos>", self.vocab.get("<eos>", 1))
        self.pad_id = self.added.get("<pad>", self.vocab.get("<pad>", 0))
        # Merges never cross a "x|\u2581" boundary when no merged token has "\u2581" after another character, so
        # the text can then be cut there and each piece BPE'd (and cached) alone: same ids, much faster.
        self.cut_at_spaces = all("\u2581" not in ab.lstrip("\u2581") for _, ab in self.merges.values())
        self.cache = {}

    def _check(self, spec):
        """The parts of tokenizer.json this class reads, checked: a foreign or hand-edited file fails here with one
        message naming every bad key, not later inside the BPE loop."""
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict):
            raise ValueError(f"{self.path}: missing key 'model' (not a tokenizer.json)")
        vocab, merges, added = model.get("vocab"), model.get("merges"), spec.get("added_tokens") or []
        merges = [m.split(" ") if isinstance(m, str) else m for m in merges] if isinstance(merges, list) else None
        bad_merge = next((m for m in merges or [] if not (isinstance(m, list) and len(m) == 2 and
                                                          all(isinstance(s, str) for s in m))), None)
        checks = [
            (model.get("type") == "BPE", f"key 'model.type' is {model.get('type')!r}, only 'BPE' is supported"),
            (isinstance(vocab, dict) and all(type(i) is int and i >= 0 for i in vocab.values()),
             "key 'model.vocab' must map each token to an integer id"),
            (merges is not None, "key 'model.merges' must be a list"),
            (bad_merge is None, f"key 'model.merges' has an entry that is not a pair of tokens: {bad_merge!r}"),
            *((model.get(k) is None, f"key 'model.{k}' is {model.get(k)!r}; only null is supported")  # each would
              for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")),  # change the ids
            (isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str) and
                                             type(t.get("id")) is int for t in added),
             "key 'added_tokens' must be a list of {\"content\": str, \"id\": int, ...}")]
        problems = [what for ok, what in checks if not ok]
        if problems:
            raise ValueError(f"{self.path}: {'; '.join(problems)}")
        return model, merges, added

    def _flatten(self, node, kind):
        if node is None:
            return []
        if node["type"] == "Sequence":
            return [n for child in node[kind + "s"] for n in self._flatten(child, kind)]
        if node["type"] == "Replace" and "String" in node["pattern"]:
            return [("replace", node["pattern"]["String"], node["content"])]
        if node["type"] in ("Lowercase", "NFC", "NFKC"):
            return [(node["type"],)]
        if node["type"] == "Prepend":
            return [("prepend", node["prepend"])]
        raise ValueError(f"{self.path}: {kind} type {node['type']!r} is not supported")

    def _pre_tokenizer(self, node):
        # Gemma files have none, or Split(" ", MergedWithPrevious), a no-op once spaces became "\u2581".
        if node is None or (node["type"] == "Split" and node.get("pattern", {}).get("String") == " "):
            return None
        raise ValueError(f"{self.path}: pre_tokenizer type {node['type']!r} is not supported")

    def _normalize(self, s):
        for op in self.normalizers:
            if op[0] == "replace":
                s = s.replace(op[1], op[2])
            elif op[0] == "Lowercase":
                s = s.lower()
            elif op[0] == "prepend":
                s = op[1] + s if s else s
            else:
                s = unicodedata.normalize(op[0], s)
        return s

    def _symbols(self, word):
        """Characters of a word as vocab symbols: byte pieces for unknown characters, else one fused <unk>."""
        out, unk = [], False
        for ch in word:
            if ch in self.vocab:
                out.append(ch)
                unk = False
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in ch.encode()):
                out.extend(f"<0x{b:02X}>" for b in ch.encode())
                unk = False
            elif self.unk is not None and not (unk and self.fuse_unk):
                out.append(self.unk)
                unk = True
        return out

    def _bpe(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        return [self.vocab[s] for s in bpe_merge(self._symbols(word), self.merges)]

    def _encode_word(self, word):
        if not self.cut_at_spaces or (self.ignore_merges and word in self.vocab):
            return self._bpe(word)
        ids = []
        for piece in re.findall("\u2581*[^\u2581]*", word):
            if piece:
                if piece not in self.cache:
                    if len(self.cache) > 200_000:
                        self.cache.clear()
                    self.cache[piece] = self._bpe(piece)
                ids.extend(self.cache[piece])
        return ids

    def encode(self, text):
        """Ids of `text` exactly as given: no lowercasing, no BOS/EOS (HF: add_special_tokens=False)."""
        ids = []
        for raw, tid in split_added(text, self.raw_re, self.added):
            if tid is not None:
                ids.append(tid)
                continue
            for part, tid in split_added(self._normalize(raw), self.norm_re, self.added):
                ids.extend([tid] if tid is not None else self._encode_word(part))
        return ids

    def decode(self, ids):
        out, pending = [], b""
        for i in ids:
            tok = self.id_to_token.get(int(i), "")
            if re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
                pending += bytes([int(tok[3:5], 16)])
                continue
            out.append(pending.decode("utf-8", errors="replace") + tok)
            pending = b""
        return ("".join(out) + pending.decode("utf-8", errors="replace")).replace("\u2581", " ")

    def __call__(self, texts):
        """SigLIP-2 text input: lowercase, encode, keep <= 63 tokens, append EOS, right-pad -> LongTensor (B, 64)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text.lower())[: self.max_len - 1] + [self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        if self.vocab_size is not None and out.max() >= self.vocab_size:  # else an IndexError deep in the tower
            top = out.max().item()
            raise ValueError(f"{self.path}: token {self.id_to_token[top]!r} has id {top}, past the "
                             f"text_config.vocab_size {self.vocab_size} of config.json (a tokenizer of another model?)")
        return out


# ----------------------------------------------------------------------------- writing a Gemma-format tokenizer.json
def gemma_tokenizer_json(words, max_len=64):
    """A tokenizer.json with the structure of Gemma's (normalizer, BPE with byte fallback, merges, specials)
    whose vocabulary spells each of `words` as one token, with or without its leading "\u2581"."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    chars = sorted(set("\u2581abcdefghijklmnopqrstuvwxyz0123456789.,'\"-!?").union(*map(set, words)))
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merges = []
    # "\u2581word" chains first, so that their merges outrank the bare-word ones and "\u2581cat" becomes one
    # token; bare words are for the start of a text, which has no leading "\u2581".
    for word in ["\u2581" + w for w in words] + list(words):
        for i in range(2, len(word) + 1):
            if word[:i] not in vocab:
                vocab[word[:i]] = len(vocab)
                merges.append([word[: i - 1], word[i - 1]])
    eos = {"id": "<eos>", "type_id": 0}
    spec = {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": max_len, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": max_len}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"},
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos},
                                    {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": eos}],
                           "special_tokens": {"<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    # One word's merges can outrank another's ("at" before "cat" splits "cat" into c + at): join what is left
    # with extra merges, ranked last, until every word is one token with and without its "\u2581".
    for _ in range(10):
        tok = GemmaTokenizer(spec)
        split = [w for w in ["\u2581" + w for w in words] + list(words) if len(tok._bpe(w)) > 1]
        if not split:
            return spec
        for word in split:
            pieces = [tok.id_to_token[i] for i in tok._bpe(word)]
            for i in range(1, len(pieces)):
                left = "".join(pieces[:i])
                vocab.setdefault(left + pieces[i], len(vocab))
                if [left, pieces[i]] not in merges:
                    merges.append([left, pieces[i]])
    raise ValueError("gemma_tokenizer_json: could not make every word a single token")


# ----------------------------------------------------------------------------- Qwen2 byte-level BPE
# Qwen2's pre-tokenizer (transformers tokenization_qwen2.PRETOKENIZE_REGEX), as tokenizer.json spells it for onig.
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The same for Python's re, which has no \p{..}: {L}, {N}, {S} become explicit classes. {S} is Unicode White_Space,
# as onig and `regex` read \s; Python's own \s would also take \x1c-\x1f (it follows str.isspace).
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*"
             r"|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
_WHITE_SPACE = r"\t-\r\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Letters and numbers that Unicode 15.0-16.0 added: onig (tokenizers 0.23) and `regex` know them, the unicodedata of
# Python 3.11 (Unicode 14.0) does not, and without them they would be split off like punctuation.
_NEWER = {"L": "1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240 11380-11389 "
               "1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 11F04-11F10 11F12-11F33 1342F 13441-13446 "
               "13460-143FA 16100-1611D 16D40-16D6C 18CFF 1B132 1B155 1DF25-1DF2A 1E030-1E06D 1E4D0-1E4EB 1E5D0-1E5ED "
               "1E5F0 2B739 2EBF0-2EE5D 31350-323AF",
          "N": "10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9 1D2C0-1D2D3 "
               "1E4F0-1E4F9 1E5F1-1E5FA"}
# HF tokenizers' NFC (the crate unicode-normalization-alignments) has Unicode 9.0 data: to it, these later combining
# marks and second halves of compositions (through Unicode 15.1) are plain starters, so its NFC equals Python's on the
# stretches between them.
_AFTER_UNICODE_9 = re.compile("([" + "".join(
    "-".join(f"\\U{int(x, 16):08x}" for x in span.split("-")) for span in (
        "7FD 898-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1ACE 1DF6-1DFA A82C 10D24-10D27 10EAB-10EAC 10EFD-10EFF "
        "10F46-10F50 10F82-10F85 11070 1133B 1145E 11839-1183A 11930 11938 1193D-1193E 11943 119E0 11A34 11A47 "
        "11A99 11D42 11D44-11D45 11D97 11F41-11F42 16FF0-16FF1 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF"
        ).split()) + "])")


@functools.lru_cache(maxsize=None)
def _qwen2_re():
    """_QWEN2_RE compiled, with {L} and {N} built from unicodedata over all code points once (~0.3 s)."""
    points = {"L": set(), "N": set()}
    for cp in range(0x110000):
        points.get(unicodedata.category(chr(cp))[0], set()).add(cp)
    classes = {}
    for major, cps in points.items():
        for span in _NEWER[major].split():
            lo, hi = (int(x, 16) for x in (span + "-" + span).split("-")[:2])
            cps.update(range(lo, hi + 1))
        cps, runs = sorted(cps), []
        for cp in cps:  # code points -> "\Ulo-\Uhi" runs: a few hundred ranges, not 140k characters
            if runs and runs[-1][1] == cp - 1:
                runs[-1][1] = cp
            else:
                runs.append([cp, cp])
        classes[major] = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in runs)
    pattern = _QWEN2_RE.replace("{L}", classes["L"]).replace("{N}", classes["N"]).replace("{S}", _WHITE_SPACE)
    return re.compile(pattern)


def qwen2_pretokenize(text):
    """The pieces Qwen2's pre-tokenizer cuts `text` into (HF: Split(QWEN2_REGEX, "Isolated")); the pattern matches
    every character, so the pieces join back to `text`."""
    return _qwen2_re().findall(text)


def bytes_to_unicode():
    """GPT-2's byte -> character map: the printable Latin-1 bytes stand for themselves, the 68 others (controls,
    space, 0x7F-0xA0, 0xAD) become U+0100 onwards, so that every token of a byte-level vocab is printable."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(0x100 + n) for n, b in enumerate(rest)}}


class Qwen2Tokenizer:
    """Pure-Python Qwen2 byte-level BPE, equal to HF `tokenizers` on Qwen2's tokenizer.json and to transformers'
    slow Qwen2Tokenizer on vocab.json + merges.txt: added tokens split off first and never merged, NFC, the Qwen2
    regex, each piece's UTF-8 bytes as GPT-2 characters, BPE with merges by rank. No BOS or EOS is added.

    path: a folder with vocab.json + merges.txt (+ tokenizer_config.json / added_tokens.json /
    special_tokens_map.json for the added tokens), or with tokenizer.json. The slow files win when both are there:
    they are what the official code reads (use_fast=False). The two readings differ only in NFC, each as its
    reference: the slow tokenizer applies Python's NFC before it looks for added tokens, `tokenizers` its own
    (Unicode 9.0 data) after, which matters for an added token followed by U+0338 (">" + U+0338 is U+226F) and for
    combining marks of Unicode 10.0 or later."""
    def __init__(self, path):
        self.path = path
        if not os.path.isdir(path):
            raise ValueError(f"{path}: not a folder (a Qwen2 tokenizer is tokenizer.json or vocab.json + merges.txt)")
        files = set(os.listdir(path))
        self.nfc_first = {"vocab.json", "merges.txt"} <= files
        if self.nfc_first:
            vocab, merges, added = self._read_slow()
        elif "tokenizer.json" in files:
            vocab, merges, added = self._read_fast()
        else:
            missing = " + ".join(sorted({"vocab.json", "merges.txt"} - files))
            raise ValueError(f"{path}: not a Qwen2 tokenizer folder: no tokenizer.json, and no {missing}")
        self.vocab = vocab
        self.merges = {(a, b): (rank, a + b) for rank, (a, b) in enumerate(merges)}
        bad = [f"{a} {b}" for (a, b), (_, ab) in self.merges.items() if ab not in vocab]
        if bad:
            raise ValueError(f"{path}: {len(bad)} merges make a token that is not in the vocab, first {bad[0]!r}")
        self.added = {t["content"]: t["id"] for t in added}
        self.tokens = {**{i: t for t, i in vocab.items()}, **{i: t for t, i in self.added.items()}}  # id -> token
        self.vocab_size = len(set(vocab) | set(self.added))  # distinct tokens, as transformers' len(tokenizer)
        # tokenizers matches normalized=false tokens in the raw text, the others after NFC; the slow one all after
        raw = [t for t in added if self.nfc_first or not t.get("normalized", False)]
        self.raw_re, self.norm_re = added_regex(raw), added_regex([t for t in added if t not in raw])
        self.char_bytes = {c: b for b, c in bytes_to_unicode().items()}
        self.byte_chars = str.maketrans({chr(b): c for c, b in self.char_bytes.items()})
        self.regex = _qwen2_re()
        self.cache = {}

    def _json(self, name, default=None):
        """A JSON file of the folder; `default` when it is absent (None: it must be there)."""
        file = os.path.join(self.path, name)
        if default is not None and not os.path.exists(file):
            return default
        try:
            with open(file, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: {name} is not readable JSON ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{self.path}: {name} is not a JSON object")
        return obj

    def _read_fast(self):
        """vocab, merges, added tokens of tokenizer.json, after checking that it describes Qwen2's pipeline."""
        spec = self._json("tokenizer.json")
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        merges = model.get("merges")
        merges = [m.split(" ") if isinstance(m, str) else m for m in merges] if isinstance(merges, list) else None
        pre = spec.get("pre_tokenizer") or {}
        steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
        qwen2_pre = (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("invert") is False and
                     steps[0].get("pattern") == {"Regex": QWEN2_REGEX} and steps[0].get("behavior") == "Isolated" and
                     steps[1] == {**steps[1], "type": "ByteLevel", "add_prefix_space": False, "use_regex": False})
        added = spec.get("added_tokens") or []
        checks = [(model.get("type") == "BPE", f"key 'model.type' is {model.get('type')!r}, not 'BPE'"),
                  (isinstance(model.get("vocab"), dict), "key 'model.vocab' must map each token to an id"),
                  (merges is not None and all(len(m) == 2 for m in merges), "key 'model.merges' must list pairs"),
                  *((not model.get(k), f"key 'model.{k}' is {model.get(k)!r}, only null is supported")
                    for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")),
                  (spec.get("normalizer") == {"type": "NFC"}, f"key 'normalizer' is {spec.get('normalizer')}, not NFC"),
                  (qwen2_pre, "key 'pre_tokenizer' is not Qwen2's (Split on its regex, then ByteLevel without "
                              "prefix space or regex)"),
                  (all(isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int
                       for t in added), "key 'added_tokens' must list {\"content\": str, \"id\": int, ...}")]
        problems = [what for ok, what in checks if not ok]
        if problems:
            raise ValueError(f"{self.path}: tokenizer.json: {'; '.join(problems)}")
        self.ignore_merges = model.get("ignore_merges", False)
        return model["vocab"], merges, added

    def _read_slow(self):
        """vocab.json, merges.txt and the added tokens, read as transformers 4.x's slow Qwen2Tokenizer reads them."""
        vocab = self._json("vocab.json")
        try:
            with open(os.path.join(self.path, "merges.txt"), encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: merges.txt is not readable ({type(e).__name__}: {e})") from None
        # a "#version: ..." first line and blank lines are skipped; each other line is "a b"
        merges = [line.split() for i, line in enumerate(lines)
                  if line and not (i == 0 and line.startswith("#version:"))]
        bad = next((line for line in merges if len(line) != 2), None)
        if bad:
            raise ValueError(f"{self.path}: merges.txt has a line that is not a pair: {' '.join(bad)!r}")
        self.ignore_merges = False
        return vocab, merges, self._slow_added(vocab)

    def _slow_added(self, vocab):
        """The added tokens as transformers 4.x loads them: tokenizer_config.json's added_tokens_decoder, or (older
        folders) added_tokens.json with special_tokens_map.json; then every named special token not among them is
        added too (never split, even one in vocab.json), with its vocab id or the next free one."""
        cfg = self._json("tokenizer_config.json", {})
        named = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", **cfg}
        if "added_tokens_decoder" in cfg:
            added = [{**t, "id": int(i)} for i, t in cfg["added_tokens_decoder"].items()]
        else:
            named.update(self._json("special_tokens_map.json", {}))
            added = [{"content": t, "id": i} for t, i in self._json("added_tokens.json", {}).items()]
        keys = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        specials = [named.get(k) for k in keys] + list(named.get("additional_special_tokens") or [])
        contents = {t["content"] for t in added}
        next_id = len(set(vocab) | contents)
        for t in specials:
            t = t.get("content") if isinstance(t, dict) else t
            if t and t not in contents:
                added.append({"content": t, "id": vocab[t] if t in vocab else next_id})
                next_id, contents = next_id + (t not in vocab), contents | {t}
        return added

    def _word_ids(self, word):
        """Ids of one pre-token: its UTF-8 bytes as GPT-2 characters, then BPE; cached, as words repeat."""
        ids = self.cache.get(word)
        if ids is None:
            sym = word.encode("utf-8").decode("latin-1").translate(self.byte_chars)
            if self.ignore_merges and sym in self.vocab:
                ids = [self.vocab[sym]]
            else:  # a byte missing from the vocab is dropped, as `tokenizers` does without an unk token
                ids = [self.vocab[s] for s in bpe_merge([c for c in sym if c in self.vocab], self.merges)]
            if len(self.cache) > 200_000:
                self.cache.clear()
            self.cache[word] = ids
        return ids

    def _nfc(self, s):
        """NFC as the reference applies it: Python's for the slow files (as transformers 4.x), tokenizers' otherwise."""
        if self.nfc_first:
            return unicodedata.normalize("NFC", s)
        parts = _AFTER_UNICODE_9.split(s)  # [stretch, mark, stretch, ...]: the marks stay as they are
        return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))

    def encode(self, text):
        """Ids of `text`, added tokens in it included (HF: encode(text, add_special_tokens=False).ids)."""
        ids = []
        for raw, tid in split_added(self._nfc(text) if self.nfc_first else text, self.raw_re, self.added):
            if tid is not None:
                ids.append(tid)
                continue
            for part, tid in split_added(self._nfc(raw), self.norm_re, self.added):
                if tid is not None:
                    ids.append(tid)
                    continue
                for word in self.regex.findall(part):
                    ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids):
        """The text of `ids`: the bytes of the tokens joined, added tokens as their text, invalid UTF-8 as U+FFFD;
        unknown ids are skipped (HF: decode(ids, skip_special_tokens=False))."""
        out = bytearray()
        for i in ids:
            tok = self.tokens.get(int(i))
            if tok is None:
                continue
            try:
                out += bytes(self.char_bytes[c] for c in tok)
            except KeyError:  # not a byte-level token (an added token with a space, say): its own UTF-8, as HF
                out += tok.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def token_to_id(self, token):
        return self.added.get(token, self.vocab.get(token))

    def id_to_token(self, i):
        return self.tokens.get(int(i))

    def __len__(self):
        return self.vocab_size
