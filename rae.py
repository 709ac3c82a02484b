"""Representation Autoencoder (RAE) pieces around a frozen SigLIP-2: encoder, text tower, tokenizer, decoder.

Implements, in plain PyTorch and from the Hugging Face checkpoint files alone:
  - the fixed-resolution SigLIP-2 vision and text towers (`model_type: "siglip"`), numerically equal to
    transformers' SiglipModel, loaded from a HF snapshot folder (config.json + model.safetensors [+ shards]);
  - a pure-Python Gemma BPE tokenizer read from tokenizer.json (equal to HF tokenizers' ids);
  - the RAE of arXiv 2510.11690 / 2601.16208: latent z = parameter-free LayerNorm of the last block output of
    the frozen vision tower, and a ViT-MAE-style decoder that maps z back to pixels;
  - `write_tiny_siglip2`, which writes a random-weight checkpoint in the real HF format (tests, toy world);
  - `python rae.py download REPO --out DIR`, a resumable snapshot download with urllib.
Conventions: pixels `img` (B, 3, H, W) in [-1, 1] (SigLIP's mean = std = 0.5 normalization); latents
`z` (B, N, C), N tokens in row-major patch order. Smoke test: `python rae.py` (builds and runs a tiny model).
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# ----------------------------------------------------------------------------- configs
# Defaults are transformers' SiglipVisionConfig / SiglipTextConfig: hub config.json files of SigLIP-2 omit
# every field that equals them (google/siglip2-base-patch16-224 only sets the text vocab_size).
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
                       hidden_act="gelu_pytorch_tanh", vision_use_head=True)
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64, layer_norm_eps=1e-6,
                     hidden_act="gelu_pytorch_tanh", projection_size=None)
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # all three are the tanh approximation


@dataclass
class DecoderConfig:
    latent_dim: int = 1152  # C: width of the encoder latent
    num_tokens: int = 256  # N: a square grid of latent tokens (16 x 16 for SigLIP-2 so400m/14 at 224)
    patch_size: int = 14  # output pixels per token side: image size = patch_size * sqrt(N)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_dim: int = 4096


# ViT-MAE decoder sizes of the RAE paper (XL is the released one), plus a tiny one for the CPU toy world.
DECODER_PRESETS = {
    "toy": dict(hidden_size=192, depth=4, num_heads=4, mlp_dim=768),
    "B": dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
}


# ----------------------------------------------------------------------------- small stateless functions
def attention(q, k, v, heads):
    """Multi-head attention on (B, Nq, D) queries and (B, Nk, D) keys/values, no mask -> (B, Nq, D)."""
    B, Nq, D = q.shape
    q = q.view(B, Nq, heads, D // heads).transpose(1, 2)  # (B, H, Nq, Dh)
    k = k.view(B, k.shape[1], heads, D // heads).transpose(1, 2)  # (B, H, Nk, Dh)
    v = v.view(B, v.shape[1], heads, D // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v)  # scale Dh^-0.5, softmax in fp32 on every backend we use
    return o.transpose(1, 2).reshape(B, Nq, D)


def sincos_pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos table (grid*grid, dim), MAE layout: first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    def embed_1d(pos):  # (grid*grid,) -> (grid*grid, dim/2)
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (grid*grid, dim)


def unpatchify(x, p):
    """(B, N, p*p*3) patch vectors ordered (py, px, c) -> image (B, 3, g*p, g*p), g = sqrt(N)."""
    B, N, _ = x.shape
    g = math.isqrt(N)
    x = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, g, p, g, p)
    return x.reshape(B, 3, g * p, g * p)


def noise_augment(z, tau, generator=None):
    """RAE decoder-training augmentation: z + sigma * eps with sigma ~ tau * U(0, 1) per sample (tau = 0.8)."""
    if tau <= 0:
        return z
    sigma = tau * torch.rand(z.shape[0], 1, 1, device=z.device, dtype=z.dtype, generator=generator)
    return z + sigma * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)


def check_image(img, patch):
    """Reject what the towers would silently mis-read: wrong layout, odd sizes, pixels outside [-1, 1]."""
    if not torch.is_tensor(img) or img.ndim != 4 or img.shape[1] != 3 or not img.is_floating_point():
        shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
        raise ValueError(f"expected a float image tensor (B, 3, H, W), got {shape}")
    if img.shape[2] % patch or img.shape[3] % patch:
        raise ValueError(f"image size {tuple(img.shape[2:])} is not a multiple of the patch size {patch}")
    lo, hi = torch.aminmax(img.detach())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"pixels must be in [-1, 1] (got min {lo.item():.3g}, max {hi.item():.3g}); "
                         "map [0, 255] images with img / 127.5 - 1")


# ----------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    # One fused qkv projection: a single (D -> 3D) matmul instead of three; HF's q/k/v_proj are concatenated
    # into it at load time (see the key map below).
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, D)
        return self.proj(attention(q, k, v, self.heads))


class MLP(nn.Module):
    def __init__(self, dim, hidden, approximate):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(dim, hidden), nn.Linear(hidden, dim), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LN ViT block. SigLIP: LN eps 1e-6 and tanh GELU; the ViT-MAE decoder: LN eps 1e-12 and exact GELU."""
    def __init__(self, dim, heads, mlp_dim, eps, approximate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, approximate)

    def forward(self, x):  # (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAPHead(nn.Module):
    """SigLIP's multihead attention pooling: one learned probe attends over all tokens, then a residual MLP."""
    def __init__(self, dim, heads, mlp_dim, eps):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn_in = nn.Linear(dim, 3 * dim)  # rows q | k | v, as nn.MultiheadAttention's in_proj
        self.attn_out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, "tanh")

    def forward(self, x):  # (B, N, D) post-LayerNorm tokens -> (B, D)
        wq, wk, wv = self.attn_in.weight.chunk(3)
        bq, bk, bv = self.attn_in.bias.chunk(3)
        q = F.linear(self.probe.expand(x.shape[0], -1, -1), wq, bq)  # (B, 1, D)
        o = self.attn_out(attention(q, F.linear(x, wk, bk), F.linear(x, wv, bv), self.heads))  # (B, 1, D)
        return (o + self.mlp(self.norm(o)))[:, 0]  # no residual from the probe itself, as in SigLIP


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, self.patch = cfg["hidden_size"], cfg["patch_size"]
        self.grid = cfg["image_size"] // self.patch
        self.patch_embed = nn.Conv2d(cfg["num_channels"], D, self.patch, self.patch)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid * self.grid, D))  # (N, D), row-major grid
        self.blocks = nn.ModuleList(Block(D, cfg["num_attention_heads"], cfg["intermediate_size"],
                                          cfg["layer_norm_eps"], "tanh") for _ in range(cfg["num_hidden_layers"]))
        self.post_norm = nn.LayerNorm(D, eps=cfg["layer_norm_eps"])
        self.head = MAPHead(D, cfg["num_attention_heads"], cfg["intermediate_size"],
                            cfg["layer_norm_eps"]) if cfg["vision_use_head"] else None

    def pos_for(self, h, w):
        """Position table for an h x w patch grid: bicubic resize of the learned grid when it differs."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        table = self.pos_embed.T.reshape(1, -1, self.grid, self.grid)  # (1, D, g, g)
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
        return table.flatten(2)[0].T  # (h*w, D)

    def forward(self, img):
        """(B, 3, H, W) in [-1, 1] -> last block output before post_layernorm (B, N, D) = HF hidden_states[-1]."""
        return self.features(img, [len(self.blocks) - 1])[0]

    def features(self, img, layers):
        """Outputs of the blocks numbered in `layers` (0-based): a list of (B, N, D). Stops after the deepest
        one; used by the decoder's perceptual loss and discriminator, which tap several depths."""
        check_image(img, self.patch)
        x = self.patch_embed(img.to(self.pos_embed.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.pos_for(*x.shape[2:])  # (B, N, D)
        out = []
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            x = block(x)
            if i in layers:
                out.append(x)
        return out

    def pool(self, h):
        """(B, N, D) block output -> (B, D) = HF pooler_output (post_layernorm, then MAP head).

        Also works on an RAE latent z = LayerNorm(h) without affine: LayerNorm is idempotent, so
        post_norm(z) == post_norm(h) up to eps. This is how generated latents are scored without decoding."""
        if self.head is None:
            raise ValueError("this checkpoint has vision_use_head=false: there is no pooled vision embedding")
        return self.head(self.post_norm(h))


class TextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg["hidden_size"]
        self.token_embed = nn.Embedding(cfg["vocab_size"], D)
        self.pos_embed = nn.Parameter(torch.zeros(cfg["max_position_embeddings"], D))  # (T, D)
        self.blocks = nn.ModuleList(Block(D, cfg["num_attention_heads"], cfg["intermediate_size"],
                                          cfg["layer_norm_eps"], "tanh") for _ in range(cfg["num_hidden_layers"]))
        self.final_norm = nn.LayerNorm(D, eps=cfg["layer_norm_eps"])
        self.head = nn.Linear(D, cfg["projection_size"] or D)

    def forward(self, ids):
        """(B, T) token ids -> (B, T, D) = HF last_hidden_state. Bidirectional, no padding mask: SigLIP was
        trained with pad tokens attending and attended to, so masking them would change the embedding."""
        if ids.ndim != 2 or ids.shape[1] > self.pos_embed.shape[0]:
            raise ValueError(f"expected token ids (B, T<={self.pos_embed.shape[0]}), got {tuple(ids.shape)}")
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def pool(self, h):
        """(B, T, D) -> (B, P) = HF pooler_output: the head on the LAST position (index T-1, usually a pad)."""
        return self.head(h[:, -1])


class SigLIP2(nn.Module):
    """Both towers and the sigmoid-loss logit scale/bias. `tokenizer` is attached by `load_siglip2`."""
    def __init__(self, vision_cfg, text_cfg=None):
        super().__init__()
        self.vision = VisionTower(vision_cfg)
        self.text = TextTower(text_cfg) if text_cfg is not None else None
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.tokenizer = None

    def logits(self, img_emb, txt_emb):
        """(Bi, P) and (Bt, P) pooled embeddings -> (Bi, Bt) logits; sigmoid(logit) is the match probability."""
        img_emb = F.normalize(img_emb, dim=-1)
        txt_emb = F.normalize(txt_emb, dim=-1)
        return img_emb @ txt_emb.T * self.logit_scale.exp() + self.logit_bias

    @torch.no_grad()
    def score(self, img, texts):
        """Zero-shot scores: images (Bi, 3, H, W) in [-1, 1] and a list of Bt strings -> logits (Bi, Bt)."""
        ids = self.tokenizer(texts).to(self.logit_scale.device)
        return self.logits(self.vision.pool(self.vision(img)), self.text.pool(self.text(ids)))


# ----------------------------------------------------------------------------- the RAE
class Decoder(nn.Module):
    """ViT-MAE-style decoder of RAE: Linear in, trainable cls token, fixed 2-D sin-cos positions, pre-LN
    blocks (LN eps 1e-12, exact GELU), LayerNorm, Linear to patch pixels, unpatchify."""
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        D, g = cfg.hidden_size, math.isqrt(cfg.num_tokens)
        if g * g != cfg.num_tokens:
            raise ValueError(f"decoder num_tokens must be a square grid, got {cfg.num_tokens}")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"decoder hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.embed = nn.Linear(cfg.latent_dim, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))  # zero-init, as in RAE
        self.register_buffer("pos_embed", self.pos_table(), persistent=False)  # fixed: rebuilt, never loaded
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_dim, 1e-12, "none") for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-12)
        self.pred = nn.Linear(D, cfg.patch_size ** 2 * 3)

    def pos_table(self):  # (1 + N, D): a zero row for the cls slot, then the sin-cos grid
        D, g = self.cfg.hidden_size, math.isqrt(self.cfg.num_tokens)
        return torch.cat([torch.zeros(1, D), sincos_pos_embed_2d(D, g)]).to(self.embed.weight.device)

    def forward(self, z):  # (B, N, C) -> (B, 3, H, W), pixels in [-1, 1] (not clamped)
        if z.ndim != 3 or z.shape[1:] != (self.cfg.num_tokens, self.cfg.latent_dim):
            raise ValueError(f"decoder expects latents (B, {self.cfg.num_tokens}, {self.cfg.latent_dim}), "
                             f"got {tuple(z.shape)}")
        x = self.embed(z)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        for block in self.blocks:
            x = block(x)
        x = self.pred(self.norm(x))[:, 1:]  # drop cls: (B, N, p*p*3)
        return unpatchify(x, self.cfg.patch_size)


class RAE(nn.Module):
    """encode: frozen vision tower -> parameter-free LayerNorm [-> per-channel standardization] = z (B, N, C).
    decode: [undo standardization ->] ViT decoder -> pixels. `stats` = {"mean", "var"} of shape (C,) or (N, C)."""
    def __init__(self, encoder: VisionTower, decoder: Decoder | None = None, stats=None, eps=1e-5):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoder = decoder
        self.eps = eps
        self.register_buffer("mean", None if stats is None else stats["mean"].float(), persistent=False)
        self.register_buffer("var", None if stats is None else stats["var"].float(), persistent=False)

    @torch.no_grad()
    def encode(self, img):
        h = self.encoder(img)  # (B, N, C), last block output
        z = F.layer_norm(h.float(), h.shape[-1:], eps=1e-6)  # per-token, no affine (Scale-RAE)
        if self.mean is not None:
            z = (z - self.mean) / torch.sqrt(self.var + self.eps)
        return z

    def decode(self, z):
        if self.mean is not None:
            z = z * torch.sqrt(self.var + self.eps) + self.mean
        return self.decoder(z)

    def unnormalize(self, z):
        """Latent back to the LayerNorm space the SigLIP head expects (for `vision.pool` on generated z)."""
        return z if self.mean is None else z * torch.sqrt(self.var + self.eps) + self.mean


@torch.no_grad()
def compute_latent_stats(rae, images, per="channel"):
    """Exact dataset mean/var of the (un-standardized) latents over an iterable of image batches.
    per="channel" -> (C,), per="element" -> (N, C). Accumulates in float64 (not RAE's EMA of batch stats)."""
    n, s, s2 = 0, 0.0, 0.0
    for img in images:
        z = F.layer_norm(rae.encoder(img).double(), (rae.encoder.pos_embed.shape[1],), eps=1e-6)  # (B, N, C)
        z = z.reshape(-1, z.shape[-1]) if per == "channel" else z
        n, s, s2 = n + z.shape[0], s + z.sum(0), s2 + (z * z).sum(0)
    if n == 0:
        raise ValueError("compute_latent_stats: the image iterator yielded no batch")
    mean = s / n
    return {"mean": mean.float(), "var": (s2 / n - mean * mean).clamp_min(0).float()}


def save_latent_stats(path, stats):
    save_safetensors(path, stats)


def load_latent_stats(path, channels, tokens=None):
    """{"mean", "var"} written by `save_latent_stats`, checked against the latent (N = tokens, C = channels) it will
    standardize: a stats file of another encoder or resolution fails here, not as a broadcast error mid-run."""
    stats = read_safetensors(path)
    shapes = f"({channels},) or ({tokens or 'N'}, {channels})"
    for key in sorted(set(stats) | {"mean", "var"}):
        if key not in ("mean", "var"):
            raise ValueError(f"{path}: unexpected key '{key}' (expected 'mean' and 'var')")
        if key not in stats:
            raise ValueError(f"{path}: missing key '{key}' (expected 'mean' and 'var')")
        t = stats[key]
        if t.ndim not in (1, 2) or t.shape[-1] != channels or (t.ndim == 2 and tokens and t.shape[0] != tokens):
            raise ValueError(f"{path}: key '{key}' has shape {tuple(t.shape)}, expected {shapes}")
        if not t.is_floating_point():
            raise ValueError(f"{path}: key '{key}' has dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all() or (key == "var" and (t < 0).any()):
            raise ValueError(f"{path}: key '{key}' has {'negative' if torch.isfinite(t).all() else 'non-finite'} entries")
    if stats["mean"].shape != stats["var"].shape:
        raise ValueError(f"{path}: key 'mean' has shape {tuple(stats['mean'].shape)} but 'var' has "
                         f"{tuple(stats['var'].shape)}")
    return stats


# ----------------------------------------------------------------------------- tokenizer
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
        self.raw_re, self.norm_re = self._added_regex(raw), self._added_regex(norm)
        self.eos_id = self.added.get("<eos>", self.vocab.get("<eos>", 1))
        self.pad_id = self.added.get("<pad>", self.vocab.get("<pad>", 0))
        # Merges never cross a "x|\u2581" boundary when no merged token has "\u2581" after another character, so
        # the text can then be cut there and each piece BPE'd (and cached) alone: same ids, much faster.
        self.cut_at_spaces = all("\u2581" not in ab.lstrip("\u2581") for _, ab in self.merges.values())
        self.cache = {}

    def _check(self, spec):
        """The parts of tokenizer.json this class reads, checked: a foreign or hand-edited file fails here with one
        line naming the key, not later inside the BPE loop."""
        def need(ok, what):
            if not ok:
                raise ValueError(f"{self.path}: {what}")
        need(isinstance(spec, dict) and isinstance(spec.get("model"), dict), "missing key 'model' (not a tokenizer.json)")
        model = spec["model"]
        need(model.get("type") == "BPE", f"key 'model.type' is {model.get('type')!r}, only 'BPE' is supported")
        vocab = model.get("vocab")
        need(isinstance(vocab, dict) and all(type(i) is int and i >= 0 for i in vocab.values()),
             "key 'model.vocab' must map each token to an integer id")
        need(isinstance(model.get("merges"), list), "key 'model.merges' must be a list")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        bad = next((m for m in merges if not (isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m))),
                   None)
        need(bad is None, f"key 'model.merges' has an entry that is not a pair of tokens: {bad!r}")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):  # each would change the ids
            need(model.get(key) is None, f"key 'model.{key}' is {model.get(key)!r}; only null is supported")
        added = spec.get("added_tokens") or []
        need(isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str) and
                                             type(t.get("id")) is int for t in added),
             "key 'added_tokens' must be a list of {\"content\": str, \"id\": int, ...}")
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

    def _added_regex(self, tokens):
        if not tokens:
            return None
        alts = []
        for t in sorted(tokens, key=lambda t: -len(t["content"])):  # longest first = leftmost-longest
            pat = re.escape(t["content"])
            if t.get("single_word"):
                pat = r"(?<!\w)" + pat + r"(?!\w)"
            alts.append((r"\s*" if t.get("lstrip") else "") + "(" + pat + ")" + (r"\s*" if t.get("rstrip") else ""))
        return re.compile("|".join(alts))

    def _normalize(self, s):
        import unicodedata
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

    def _split_added(self, s, regex):
        """Yield (text, None) for plain stretches and (None, id) for added tokens."""
        pos = 0
        for m in regex.finditer(s) if regex else ():
            if m.start() > pos:
                yield s[pos:m.start()], None
            yield None, self.added[next(g for g in m.groups() if g is not None)]
            pos = m.end()
        if pos < len(s):
            yield s[pos:], None

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
        """Merge the lowest-rank adjacent pair (leftmost on ties) until none is left; O(n log n) with a heap."""
        import heapq
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        sym = self._symbols(word)
        n = len(sym)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        heap = [(self.merges[sym[i], sym[i + 1]][0], i, sym[i], sym[i + 1])
                for i in range(n - 1) if (sym[i], sym[i + 1]) in self.merges]
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
                if l >= 0 and r >= 0 and (sym[l], sym[r]) in self.merges:
                    heapq.heappush(heap, (self.merges[sym[l], sym[r]][0], l, sym[l], sym[r]))
        return [self.vocab[s] for s in sym if s is not None]

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
        for raw, tid in self._split_added(text, self.raw_re):
            if tid is not None:
                ids.append(tid)
                continue
            for part, tid in self._split_added(self._normalize(raw), self.norm_re):
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


# ----------------------------------------------------------------------------- checkpoint files
def save_safetensors(path, tensors, metadata=None):
    """Write tensors atomically (temp file, then os.replace: a crash never leaves a half file under `path`), readable
    by the group as any file the user writes (safetensors >= 0.8 creates its files 0600, unreadable on a shared
    cluster filesystem)."""
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def read_safetensors(path, keep=None):
    """Tensors of a .safetensors file, checked first so that a truncated or foreign file fails with one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 2 or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file or truncated ({size} bytes, header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{path}: truncated: tensor data ends at byte {8 + n + max(ends)}, file has {size} bytes")
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}


def read_metadata(path):
    read_safetensors(path, keep=lambda k: False)  # validates the file
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


# The explicit HF -> ours key map. Our blocks fuse q/k/v into one `attn.qkv`: (pattern, ours, qkv slot).
_BLOCK_MAP = [("layer_norm1.", "norm1.", None), ("layer_norm2.", "norm2.", None),
              ("self_attn.q_proj.", "attn.qkv.", 0), ("self_attn.k_proj.", "attn.qkv.", 1),
              ("self_attn.v_proj.", "attn.qkv.", 2), ("self_attn.out_proj.", "attn.proj.", None),
              ("mlp.fc1.", "mlp.fc1.", None), ("mlp.fc2.", "mlp.fc2.", None)]
_SIGLIP_MAP = [("vision_model.embeddings.patch_embedding.", "vision.patch_embed."),
               ("vision_model.embeddings.position_embedding.weight", "vision.pos_embed"),
               ("vision_model.encoder.layers.", "vision.blocks."),
               ("vision_model.post_layernorm.", "vision.post_norm."),
               ("vision_model.head.probe", "vision.head.probe"),
               ("vision_model.head.attention.in_proj_weight", "vision.head.attn_in.weight"),
               ("vision_model.head.attention.in_proj_bias", "vision.head.attn_in.bias"),
               ("vision_model.head.attention.out_proj.", "vision.head.attn_out."),
               ("vision_model.head.layernorm.", "vision.head.norm."),
               ("vision_model.head.mlp.", "vision.head.mlp."),
               ("text_model.embeddings.token_embedding.", "text.token_embed."),
               ("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
               ("text_model.encoder.layers.", "text.blocks."),
               ("text_model.final_layer_norm.", "text.final_norm."),
               ("text_model.head.", "text.head."),
               ("logit_scale", "logit_scale"), ("logit_bias", "logit_bias")]


def hf_to_ours(key):
    """HF SigLIP key -> (our key, qkv slot or None), or None for a key we do not know."""
    for hf, ours in _SIGLIP_MAP:
        if key.startswith(hf):
            rest = key[len(hf):]
            if hf.endswith("layers."):  # "{i}.{block key}"
                i, _, sub = rest.partition(".")
                for hb, ob, slot in _BLOCK_MAP:
                    if sub.startswith(hb):
                        return f"{ours}{i}.{ob}{sub[len(hb):]}", slot
                return None
            return ours + rest, None
    return None


def ours_to_hf(state):
    """Our state dict -> HF SigLIP keys and layout (q/k/v split again)."""
    out = {}
    for key, t in state.items():
        for hf, ours in _SIGLIP_MAP:
            if key.startswith(ours):
                rest = key[len(ours):]
                if ours.endswith("blocks."):
                    i, _, sub = rest.partition(".")
                    for hb, ob, slot in _BLOCK_MAP:
                        if sub.startswith(ob) and (slot is None) == (ob != "attn.qkv."):
                            name = f"{hf}{i}.{hb}{sub[len(ob):]}"
                            out[name] = t if slot is None else t.chunk(3)[slot]
                else:
                    out[hf + rest] = t
                break
    return {k: v.contiguous() for k, v in out.items()}


def read_siglip_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: file not found (expected a HF SigLIP-2 snapshot folder)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    mt = cfg.get("model_type")
    if mt == "siglip2":
        raise ValueError(f"{cfg_path}: model_type 'siglip2' is a NaFlex checkpoint (variable resolution, linear "
                         "patch embedding), which is not supported yet; use a fixed-resolution SigLIP-2 "
                         "(model_type 'siglip', e.g. google/siglip2-so400m-patch14-224)")
    if mt != "siglip":
        raise ValueError(f"{cfg_path}: unknown model_type {mt!r}, expected 'siglip' (fixed-resolution SigLIP-2)")
    vision = {**VISION_DEFAULTS, **{k: v for k, v in cfg.get("vision_config", {}).items() if k in VISION_DEFAULTS}}
    text = {**TEXT_DEFAULTS, **{k: v for k, v in cfg.get("text_config", {}).items() if k in TEXT_DEFAULTS}}
    for name, sub in (("vision_config", vision), ("text_config", text)):
        if sub["hidden_act"] not in TANH_GELUS:
            raise ValueError(f"{cfg_path}: {name}.hidden_act {sub['hidden_act']!r} is not supported")
        if sub["hidden_size"] % sub["num_attention_heads"]:
            raise ValueError(f"{cfg_path}: {name}.hidden_size is not divisible by num_attention_heads")
    return vision, text


def load_siglip2(path, device=None, dtype=None, text=True):
    """A HF snapshot folder of a fixed-resolution SigLIP-2 -> SigLIP2 (eval, frozen) with `.tokenizer`.
    text=False skips the text tower (708M of so400m's 1.1B parameters) when only latents are needed."""
    vision_cfg, text_cfg = read_siglip_config(path)
    with torch.device("meta"):
        model = SigLIP2(vision_cfg, text_cfg if text else None)
    expected = {k: v for k, v in model.state_dict().items()}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a readable shard index, need key 'weight_map' ({type(e).__name__}: {e})") from None
    else:
        files = ["model.safetensors"]
    keep = lambda k: text or not k.startswith("text_model.")
    state, parts = {}, {}
    for name in files:
        file = os.path.join(path, name)
        for key, t in read_safetensors(file, keep).items():
            if key.endswith("position_ids"):  # non-persistent HF buffer, present in some old exports
                continue
            mapped = hf_to_ours(key)
            if mapped is None or mapped[0] not in expected:
                raise ValueError(f"{file}: unexpected key '{key}'")
            if not t.is_floating_point():
                raise ValueError(f"{file}: key '{key}' has dtype {t.dtype}, expected a floating-point tensor")
            ours, slot = mapped
            if slot is None:
                state[ours] = (t, file, key)
            else:
                parts.setdefault(ours, {})[slot] = (t, file, key)
    for ours, p in parts.items():
        file = next(iter(p.values()))[1]
        if len(p) != 3:
            missing = [n for i, n in enumerate(("q_proj", "k_proj", "v_proj")) if i not in p]
            raise ValueError(f"{file}: incomplete attention projections for '{ours}': missing {missing}")
        want = (expected[ours].shape[0] // 3, *expected[ours].shape[1:])
        for t, file, key in p.values():
            if t.shape != want:
                raise ValueError(f"{file}: key '{key}' has shape {tuple(t.shape)}, config.json implies {want}")
        state[ours] = (torch.cat([p[i][0] for i in range(3)]), p[0][1], p[0][2])
    if not text:  # a vision-only export has no logit scale/bias, and nothing without the text tower uses them
        for k in ("logit_scale", "logit_bias"):
            state.setdefault(k, (torch.zeros(1), "", k))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{os.path.join(path, files[0])}: missing key(s) for {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''} ({len(missing)} in all)")
    for ours, (t, file, key) in state.items():
        if t.shape != expected[ours].shape:
            raise ValueError(f"{file}: key '{key}' has shape {tuple(t.shape)}, config.json implies "
                             f"{tuple(expected[ours].shape)}")
    dtype = dtype or torch.float32
    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, (t, _, _) in state.items()}, assign=True)
    tok = os.path.join(path, "tokenizer.json")
    model.tokenizer = GemmaTokenizer(tok, max_len=text_cfg["max_position_embeddings"],
                                     vocab_size=text_cfg["vocab_size"]) if os.path.isfile(tok) else None
    return model.eval().requires_grad_(False)


def save_decoder(path, decoder: Decoder):
    """Decoder weights as safetensors with the DecoderConfig in the metadata (one self-describing file)."""
    save_safetensors(path, decoder.state_dict(), metadata={"decoder_config": json.dumps(asdict(decoder.cfg))})


# Released RAE decoders (official .pt state dicts and diffusers AutoencoderRAE files) -> our names.
_DECODER_IMPORT = [("decoder.", ""), ("decoder_embed.", "embed."), ("trainable_cls_token", "cls_token"),
                   ("decoder_norm.", "norm."), ("decoder_pred.", "pred."), ("decoder_layers.", "blocks."),
                   ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
                   ("attention.attention.query.", "attn.q."), ("attention.attention.key.", "attn.k."),
                   ("attention.attention.value.", "attn.v."), ("attention.output.dense.", "attn.proj."),
                   ("attention.to_q.", "attn.q."), ("attention.to_k.", "attn.k."), ("attention.to_v.", "attn.v."),
                   ("attention.to_out.0.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
                   ("output.dense.", "mlp.fc2.")]


def import_rae_decoder(state):
    """Official RAE / diffusers AutoencoderRAE decoder keys -> our Decoder state dict (q/k/v fused)."""
    out, parts = {}, {}
    for key, t in state.items():
        if key.endswith("decoder_pos_embed") or key.startswith("encoder"):
            continue  # fixed sin-cos table (we recompute it) and encoder weights (we load SigLIP separately)
        new = key[len("decoder."):] if key.startswith("decoder.") else key
        for a, b in _DECODER_IMPORT[1:]:
            new = new.replace(a, b)
        m = re.match(r"(.*)attn\.([qkv])\.(weight|bias)$", new)
        if m:
            parts.setdefault(f"{m[1]}attn.qkv.{m[3]}", {})["qkv".index(m[2])] = t
        else:
            out[new] = t
    out.update({k: torch.cat([p[i] for i in range(3)]) for k, p in parts.items()})
    return out


def config_from_metadata(path, meta, key, cls):
    """The dataclass `cls` from the JSON that an export keeps in its safetensors metadata under `key`. Every field
    of `cls` has a default, and must be there with the type of that default: a foreign, older or hand-edited file
    fails with one line naming the field instead of building a model of the wrong shape."""
    if key not in meta:
        raise ValueError(f"{path}: no '{key}' in the safetensors metadata (not an export of this project)")
    try:
        values = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata '{key}' is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: metadata '{key}' is a JSON {type(values).__name__}, expected an object")
    defaults = {f.name: f.default for f in fields(cls)}
    for name in sorted(set(defaults) | set(values)):
        if name not in defaults:
            raise ValueError(f"{path}: metadata '{key}' has unknown field '{name}'")
        if name not in values:
            raise ValueError(f"{path}: metadata '{key}' is missing field '{name}'")
        want = type(defaults[name])
        ok = isinstance(values[name], want) or (want is float and type(values[name]) is int)
        if not ok or (want is int and type(values[name]) is bool):
            raise ValueError(f"{path}: metadata '{key}' field '{name}' is {values[name]!r}, expected {want.__name__}")
    return cls(**values)


def load_decoder(path, device=None):
    """A decoder written by `save_decoder` (config in the metadata) -> Decoder (eval)."""
    cfg = config_from_metadata(path, read_metadata(path), "decoder_config", DecoderConfig)
    state = read_safetensors(path)
    with torch.device("meta"):
        try:
            dec = Decoder(cfg)
        except ValueError as e:  # a num_tokens that is not a square grid, heads that do not divide the width
            raise ValueError(f"{path}: metadata 'decoder_config': {e}") from None
    load_checked(dec, state, path)
    dec.pos_embed = dec.pos_table()  # was built on the meta device
    return dec.to(device).eval()


def load_checked(module, state, path):
    """load_state_dict(strict) with one-line errors that name the file and the key."""
    expected = module.state_dict()
    for k in state:
        if k not in expected:
            raise ValueError(f"{path}: unexpected key '{k}'")
    for k, v in expected.items():
        if k not in state:
            raise ValueError(f"{path}: missing key '{k}'")
        if state[k].shape != v.shape:
            raise ValueError(f"{path}: key '{k}' has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        if not state[k].is_floating_point():
            raise ValueError(f"{path}: key '{k}' has dtype {state[k].dtype}, expected a floating-point tensor")
    module.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return module


def read_checkpoint(path):
    """A dict written by torch.save, read with weights_only=True: tensors, containers and primitives only, so a
    foreign pickle is refused before any of its code runs. Every failure is one line naming the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, KeyError, EOFError, ... by what is wrong
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's messages run to paragraphs
        why = (f"it pickles {pickled[1]}, so it was refused unread (weights_only=True)" if pickled else
               f"truncated or not written by torch.save ({type(e).__name__}: {first})")
        raise ValueError(f"{path}: not a readable checkpoint: {why}") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a training checkpoint (it holds a {type(ck).__name__}, expected a dict)")
    return ck


def load_resume(path, expect):
    """A training script's ckpt.pt -> its dict, read by `read_checkpoint` and checked against this run, so that a
    truncated, foreign or other-config checkpoint fails with one line naming the file and the key before anything
    is loaded. `expect` names every key the file must hold, no more and no fewer, checked in its order:
      a type (int for counters, dict for args): a value of that type;
      a state dict of this run (name -> tensor): the same names, shapes and dtypes;
      an optimizer of this run: as many parameters per group, each moment of its parameter's shape and dtype;
      anything else (the model config dict): an equal value, else the first field that differs is named."""
    ck = read_checkpoint(path)
    for key in sorted(set(ck) | set(expect), key=str):
        if key not in expect or key not in ck:
            raise ValueError(f"{path}: {'unexpected' if key in ck else 'missing'} key '{key}' "
                             f"(a checkpoint of another script or version?)")
    for key, want in expect.items():
        got = ck[key]
        if isinstance(want, type):
            if not isinstance(got, want):
                raise ValueError(f"{path}: key '{key}' is a {type(got).__name__}, expected {want.__name__}")
        elif isinstance(want, torch.optim.Optimizer):
            _check_optimizer_state(path, key, got, want)
        elif isinstance(want, dict) and all(isinstance(v, torch.Tensor) for v in want.values()):
            _check_state(path, key, got, want)
        elif got != want:
            name = key
            if isinstance(got, dict) and isinstance(want, dict):  # name the first field that differs
                field = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
                name, got, want = f"{key}.{field}", got.get(field), want.get(field)
            raise ValueError(f"{path}: '{name}' is {got!r} in the checkpoint but {want!r} in this run "
                             f"(resume with the flags the run was started with, or use a new --out)")
    return ck


def _check_state(path, key, got, want):
    if not isinstance(got, dict):
        raise ValueError(f"{path}: key '{key}' is a {type(got).__name__}, expected a state dict")
    for name in sorted(set(got) | set(want), key=str):
        where = f"{path}: key '{key}.{name}'"
        if name not in want or name not in got:
            raise ValueError(f"{path}: {'unexpected' if name in got else 'missing'} key '{key}.{name}'")
        t, w = got[name], want[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where} is a {type(t).__name__}, expected a tensor")
        if t.shape != w.shape or t.dtype != w.dtype:
            raise ValueError(f"{where} is {t.dtype} {tuple(t.shape)}, this run has {w.dtype} {tuple(w.shape)}")


def _check_optimizer_state(path, key, got, opt):
    groups = got.get("param_groups") if isinstance(got, dict) else None
    if not (isinstance(groups, list) and isinstance(got.get("state"), dict) and
            all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise ValueError(f"{path}: key '{key}' is not an optimizer state (it needs 'state' and 'param_groups')")
    sizes, ours = [len(g["params"]) for g in groups], [len(g["params"]) for g in opt.param_groups]
    if sizes != ours:
        raise ValueError(f"{path}: key '{key}' has {sizes} parameters per group, this run's optimizer has {ours}")
    for saved, group in zip(groups, opt.param_groups):
        for pid, p in zip(saved["params"], group["params"]):  # ids or names, in the optimizer's parameter order
            for name, t in got["state"].get(pid, {}).items():
                # the moments have the parameter's shape; 'step' is a 0-d counter
                if isinstance(t, torch.Tensor) and t.ndim and (t.shape != p.shape or t.dtype != p.dtype):
                    raise ValueError(f"{path}: key '{key}.state.{pid}.{name}' is {t.dtype} {tuple(t.shape)}, its "
                                     f"parameter is {p.dtype} {tuple(p.shape)}")


# ----------------------------------------------------------------------------- writing a tiny checkpoint
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


def write_tiny_siglip2(path, words, vision=None, text=None, seed=0):
    """Write a random-weight SigLIP-2 snapshot in the real HF format: config.json, model.safetensors (HF key
    names and layouts) and a Gemma-format tokenizer.json over `words`. vision/text override config fields."""
    os.makedirs(path, exist_ok=True)
    tok = gemma_tokenizer_json(words)
    small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    vision_cfg = {**VISION_DEFAULTS, **small, "image_size": 224, "patch_size": 14, **(vision or {})}
    text_cfg = {**TEXT_DEFAULTS, **small, **(text or {}), "vocab_size": len(tok["model"]["vocab"])}
    g = torch.Generator().manual_seed(seed)
    model = SigLIP2(vision_cfg, text_cfg)
    for name, p in model.named_parameters():  # lecun-normal matrices, small random norms/biases
        with torch.no_grad():
            if p.ndim >= 2 and "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.logit_scale.data.fill_(math.log(10.0))
        model.logit_bias.data.fill_(-10.0)
    save_safetensors(os.path.join(path, "model.safetensors"), ours_to_hf(model.state_dict()), metadata={"format": "pt"})
    config = {"model_type": "siglip", "initializer_factor": 1.0,
              "vision_config": {"model_type": "siglip_vision_model", **vision_cfg},
              "text_config": {"model_type": "siglip_text_model", **text_cfg}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)


# ----------------------------------------------------------------------------- downloading a snapshot
def _request(url, token, start=0):
    req = urllib.request.Request(url, headers={"User-Agent": "rae-t2i"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if start:
        req.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(req, timeout=60)


def download_file(url, dest, token=None, chunk=1 << 20):
    """Resumable download to `dest`: bytes go to `dest.part` and only a complete, size-checked (and, when the
    hub sends a sha256 ETag, hash-checked) file is renamed to `dest`. Rerunning resumes from the .part."""
    from tqdm import tqdm
    part = dest + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        resp = _request(url, token, start)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the .part already holds every byte: nothing left to fetch
            resp = None
        else:
            raise
    sha = hashlib.sha256()
    if start and os.path.exists(part):  # the hash covers the bytes we already have
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                sha.update(block)
    if resp is None:
        total, etag = start, ""
    else:
        with resp:
            if resp.status == 200 and start:  # the server ignored Range: start over
                start, sha = 0, hashlib.sha256()
            length = int(resp.headers.get("Content-Length", -1))
            total = start + length if length >= 0 else None
            etag = (resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or "").strip('"')
            with open(part, "ab" if start else "wb") as f, tqdm(total=total, initial=start, unit="B",
                                                                unit_scale=True, desc=os.path.basename(dest)) as bar:
                while block := resp.read(chunk):
                    f.write(block)
                    sha.update(block)
                    bar.update(len(block))
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise IOError(f"{dest}: incomplete download ({got} of {total} bytes); run the command again to resume")
    if re.fullmatch(r"[0-9a-f]{64}", etag) and sha.hexdigest() != etag:
        os.remove(part)  # corrupt bytes cannot be resumed from
        raise IOError(f"{dest}: sha256 mismatch (got {sha.hexdigest()}, hub says {etag}); removed, run again")
    os.replace(part, dest)


def download(repo, out, revision="main", endpoint=None, token=None):
    """Fetch config.json, tokenizer.json and the weights (single file or shards) of a HF model repo."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = token or os.environ.get("HF_TOKEN")
    os.makedirs(out, exist_ok=True)
    url = lambda name: f"{endpoint}/{repo}/resolve/{revision}/{name}"
    def get(name):
        dest = os.path.join(out, name)
        if not os.path.exists(dest):
            download_file(url(name), dest, token)
        return dest
    get("config.json")
    read_siglip_config(out)  # fail early on a NaFlex or non-SigLIP repo, before gigabytes of weights
    get("tokenizer.json")
    try:
        get("model.safetensors")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        with open(get("model.safetensors.index.json")) as f:
            for shard in sorted(set(json.load(f)["weight_map"].values())):
                get(shard)
    return out


# ----------------------------------------------------------------------------- command line and smoke test
if __name__ == "__main__":
    if sys.argv[1:2] == ["download"]:
        p = argparse.ArgumentParser(description="Download a SigLIP-2 snapshot (config, tokenizer, weights).")
        p.add_argument("cmd", choices=["download"])
        p.add_argument("repo", help="HF model id, e.g. google/siglip2-so400m-patch14-224")
        p.add_argument("--out", required=True, help="destination folder")
        p.add_argument("--revision", default="main", help="branch, tag or commit")
        a = p.parse_args()
        try:
            print(download(a.repo, a.out, a.revision))
        except (urllib.error.URLError, IOError, ValueError) as e:
            sys.exit(f"download failed: {e}")
    else:  # smoke test: write a tiny snapshot, load it, encode, decode, score
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            write_tiny_siglip2(d, ["red", "circle", "blue", "square"])
            model = load_siglip2(d)
            img = torch.rand(2, 3, 224, 224) * 2 - 1
            rae = RAE(model.vision, Decoder(DecoderConfig(latent_dim=64, **DECODER_PRESETS["toy"])))
            z = rae.encode(img)
            print("z", tuple(z.shape), "decoded", tuple(rae.decode(z).shape))
            print("ids", model.tokenizer(["a red circle"])[0, :6].tolist())
            print("scores", model.score(img, ["a red circle", "a blue square"]).tolist())
