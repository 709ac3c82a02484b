"""Pure-Python BPE tokenizers, equal to Hugging Face `tokenizers` on the same tokenizer.json.

`GemmaTokenizer` reads the Gemma tokenizer.json that ships with SigLIP-2 (normalizer " " -> "\u2581", BPE with merges
by rank, byte fallback to <0xHH>, fused <unk>, added tokens matched before normalization) and gives the same ids as
`tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`; called on a list of texts it makes SigLIP-2's text
input (lowercase, 63 tokens + EOS, right-padded to 64). `gemma_tokenizer_json` writes a Gemma-format file whose
vocabulary spells each word of a list as one token: the tokenizer of the toy encoder and of the tests.
Imports only torch. Tests: python -m pytest -q test_tokenizer.py
"""
import heapq
import json
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
