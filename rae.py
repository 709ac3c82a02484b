"""Representation Autoencoder (RAE) on a frozen SigLIP-2: the encoder towers, the ViT decoder, and the latent.

The RAE of arXiv 2510.11690, as Scale-RAE (arXiv 2601.16208) uses it for text-to-image:
  - encoder: the fixed-resolution SigLIP-2 vision tower, frozen, numerically equal to transformers' SiglipModel and
    loaded from a HF snapshot (`load_siglip2`: config.json + model.safetensors [+ shards] + tokenizer.json); the text
    tower of the same checkpoint conditions the DiT;
  - latent: z = parameter-free LayerNorm of the last block output, (B, N, C) [-> optional per-channel statistics];
  - decoder: a ViT-MAE-style transformer that maps z back to pixels (trained by train_decoder.py).
Conventions: pixels `img` (B, 3, H, W) in [-1, 1] (SigLIP's mean = std = 0.5 normalization); latents `z` (B, N, C),
N tokens in row-major patch order. Imports only torch, safetensors and this project's ckpt.py and tokenizer.py.

    python rae.py                                   # smoke test: a tiny random SigLIP-2 encoder, encode, decode
    python rae.py download google/siglip2-so400m-patch14-224 --out ckpt/siglip2-so400m-patch14-224
"""
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import ckpt
from tokenizer import GemmaTokenizer

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


def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos table (grid*grid, dim) in MAE's layout: the first half encodes the column, the second the
    row, each as [sin | cos]. (dit.py's table puts the row first: each file keeps the layout of its reference.)"""
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


def check_image(img, patch):
    """Reject a layout the towers would silently mis-read: not (B, 3, H, W) float, or sides not multiples of the
    patch. Python checks only, no device sync: it runs on every forward."""
    if not torch.is_tensor(img) or img.ndim != 4 or img.shape[1] != 3 or not img.is_floating_point():
        shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
        raise ValueError(f"expected a float image tensor (B, 3, H, W), got {shape}")
    if img.shape[2] % patch or img.shape[3] % patch:
        raise ValueError(f"image size {tuple(img.shape[2:])} is not a multiple of the patch size {patch}")


def check_pixels(img, where="images"):
    """Reject pixels outside [-1, 1] (a [0, 255] or [0, 1] image encodes to a plausible but wrong latent). It reads
    the values (a device sync), so it runs once where images enter a program, not in a forward."""
    lo, hi = torch.aminmax(img.detach())
    if not (lo >= -1.001 and hi <= 1.001):  # written so that NaN, which fails every comparison, is refused too
        raise ValueError(f"{where}: pixels must be in [-1, 1] (got min {lo.item():.3g}, max {hi.item():.3g}); "
                         "map [0, 255] images with img / 127.5 - 1")
    return img


# ----------------------------------------------------------------------------- blocks and towers
class Attention(nn.Module):
    # One fused (D -> 3D) qkv matmul instead of three: HF's q/k/v_proj are concatenated at load time (fuse_qkv).
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, D)
        return self.proj(attention(q, k, v, self.heads))


class MLP(nn.Module):  # approximate: "tanh" (SigLIP's gelu_pytorch_tanh) or "none" (exact, the ViT-MAE decoder)
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
        self.cfg = cfg  # the HF config fields, as save_siglip2 writes them back
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
        check_image(img, self.patch)  # layout and size only: no device sync
        x = self.patch_embed(img.to(self.pos_embed.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.pos_for(*x.shape[2:])  # (B, N, D)
        out = []
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            x = block(x)
            if i in layers:
                out.append(x)
        return out

    def pool(self, h):
        """(B, N, D) block output -> (B, D) = HF pooler_output (post_layernorm, then MAP head). Also works on an RAE
        latent z = LayerNorm(h) without affine: LayerNorm is idempotent, so post_norm(z) == post_norm(h) up to eps.
        This is how generated latents are scored without decoding."""
        if self.head is None:
            raise ValueError("this checkpoint has vision_use_head=false: there is no pooled vision embedding")
        return self.head(self.post_norm(h))


class TextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
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
        self.logit_scale, self.logit_bias = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.tokenizer = None

    def logits(self, img_emb, txt_emb):
        """(Bi, P) and (Bt, P) pooled embeddings -> (Bi, Bt) logits; sigmoid(logit) is the match probability."""
        cosine = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T  # (Bi, Bt)
        return cosine * self.logit_scale.exp() + self.logit_bias

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
        return torch.cat([torch.zeros(1, D), sincos_2d(g, D)]).to(self.embed.weight.device)

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
        """img (B, 3, H, W) in [-1, 1] -> z (B, N, C)."""
        h = self.encoder(img)  # (B, N, C), last block output
        z = F.layer_norm(h.float(), h.shape[-1:], eps=1e-6)  # per-token, no affine (Scale-RAE)
        if self.mean is not None:
            z = (z - self.mean) / torch.sqrt(self.var + self.eps)
        return z

    def decode(self, z):
        """z (B, N, C) -> img (B, 3, H, W), about [-1, 1] (not clamped)."""
        return self.decoder(self.unnormalize(z))

    def unnormalize(self, z):
        """Latent back to the LayerNorm space the SigLIP head expects (for `vision.pool` on generated z)."""
        return z if self.mean is None else z * torch.sqrt(self.var + self.eps) + self.mean


# ----------------------------------------------------------------------------- latent statistics
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
    ckpt.save_safetensors(path, stats)


def load_latent_stats(path, channels, tokens=None):
    """{"mean", "var"} written by `save_latent_stats`, checked against the latent (N = tokens, C = channels) it will
    standardize: a stats file of another encoder or resolution fails here, not as a broadcast error mid-run."""
    stats = ckpt.read_safetensors(path)
    shapes = f"({channels},) or ({tokens or 'N'}, {channels})"
    problems = [f"{'unexpected' if k in stats else 'missing'} key '{k}' (expected 'mean' and 'var')"
                for k in sorted(set(stats) ^ {"mean", "var"})]
    for key, t in sorted(stats.items()):
        if t.ndim not in (1, 2) or t.shape[-1] != channels or (t.ndim == 2 and tokens and t.shape[0] != tokens):
            problems.append(f"key '{key}' has shape {tuple(t.shape)}, expected {shapes}")
        elif not t.is_floating_point():
            problems.append(f"key '{key}' has dtype {t.dtype}, expected a floating-point tensor")
        elif not torch.isfinite(t).all() or (key == "var" and (t < 0).any()):
            problems.append(f"key '{key}' has {'negative' if torch.isfinite(t).all() else 'non-finite'} entries")
    if not problems and stats["mean"].shape != stats["var"].shape:
        problems.append(f"key 'mean' has shape {tuple(stats['mean'].shape)} but 'var' has {tuple(stats['var'].shape)}")
    ckpt.report(path, problems)
    return stats


# ----------------------------------------------------------------------------- loading SigLIP-2 from a HF snapshot
# HF SigLIP key fragments -> ours, replaced in this order (ours_to_hf runs it backwards). Our attention fuses HF's
# q_proj / k_proj / v_proj into one `attn.qkv` (one matmul instead of three): see fuse_qkv.
SIGLIP_KEYS = [("embeddings.patch_embedding.", "patch_embed."), ("embeddings.position_embedding.weight", "pos_embed"),
               ("embeddings.token_embedding.", "token_embed."), ("vision_model.", "vision."), ("text_model.", "text."),
               ("encoder.layers.", "blocks."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
               ("self_attn.out_proj.", "attn.proj."), ("self_attn.q_proj.", "attn.q."), ("self_attn.k_proj.", "attn.k."),
               ("self_attn.v_proj.", "attn.v."), ("post_layernorm.", "post_norm."), ("final_layer_norm.", "final_norm."),
               ("head.attention.in_proj_", "head.attn_in."), ("head.attention.out_proj.", "head.attn_out."),
               ("head.layernorm.", "head.norm.")]


def fuse_qkv(state):
    """'...attn.q.weight', '...attn.k.weight', '...attn.v.weight' (and biases) -> one '...attn.qkv.weight', rows
    q | k | v, as our Attention's fused Linear holds them."""
    out, parts = {}, {}
    for key, t in state.items():
        m = re.fullmatch(r"(.*)attn\.([qkv])\.(weight|bias)", key)
        if m:
            parts.setdefault(f"{m[1]}attn.qkv.{m[3]}", [None] * 3)["qkv".index(m[2])] = t
        else:
            out[key] = t
    return {**out, **{k: torch.cat(p) for k, p in parts.items()}}


def hf_to_ours(key):
    for hf, ours in SIGLIP_KEYS:
        key = key.replace(hf, ours)
    return key


def ours_to_hf(state):
    """Our state dict -> HF SigLIP key names and layout (q, k, v split again)."""
    out = {}
    for key, t in state.items():
        split = zip("qkv", t.chunk(3)) if ".attn.qkv." in key else [(None, t)]
        for n, part in split:
            name = key.replace("attn.qkv.", f"attn.{n}.") if n else key
            for hf, ours in reversed(SIGLIP_KEYS):
                name = name.replace(ours, hf)
            out[name] = part.contiguous()
    return out


def read_siglip_config(path):
    """A snapshot folder's config.json -> (vision config, text config), with transformers' defaults filled in."""
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


def snapshot_files(path):
    """The weight files of a snapshot: model.safetensors, or the shards its model.safetensors.index.json lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return [os.path.join(path, "model.safetensors")]
    try:
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a readable shard index, need key 'weight_map' ({type(e).__name__}: {e})") from None


def load_siglip2(path, device=None, dtype=None, text=True):
    """A HF snapshot folder of a fixed-resolution SigLIP-2 -> SigLIP2 (eval, frozen) with `.tokenizer`.
    text=False skips the text tower (708M of so400m's 1.1B parameters) when only latents are needed.
    The files are checked against config.json in HF's own key names; a bad snapshot fails with one message that
    names the file and every bad key."""
    vision_cfg, text_cfg = read_siglip_config(path)
    with torch.device("meta"):
        model = SigLIP2(vision_cfg, text_cfg if text else None)
    # Without the text tower nothing uses the logit scale and bias, and a vision-only export has none.
    needed = lambda k: text or not k.startswith(("text_model.", "logit_"))
    expected = {k: v for k, v in ours_to_hf(model.state_dict()).items() if needed(k)}  # HF names, meta tensors
    files = snapshot_files(path)
    hf = {k: t for file in files for k, t in ckpt.read_safetensors(file, needed).items()
          if not k.endswith("position_ids")}  # a non-persistent HF buffer that some old exports hold
    where = files[0] if len(files) == 1 else os.path.join(path, "model.safetensors.index.json")
    ckpt.report(where, ckpt.state_problems(hf, expected), " (config.json sets the expected shapes)")
    state = fuse_qkv({hf_to_ours(k): t for k, t in hf.items()})
    if not text:
        state.update(logit_scale=torch.zeros(1), logit_bias=torch.zeros(1))
    dtype = dtype or torch.float32
    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()}, assign=True)
    tok = os.path.join(path, "tokenizer.json")
    model.tokenizer = GemmaTokenizer(tok, max_len=text_cfg["max_position_embeddings"],
                                     vocab_size=text_cfg["vocab_size"]) if os.path.isfile(tok) else None
    return model.eval().requires_grad_(False)


def save_siglip2(path, model, tokenizer_json=None, config=None):
    """Write `model` as a HF snapshot: model.safetensors in HF key names, config.json (+ the fields of `config`),
    [tokenizer.json]."""
    os.makedirs(path, exist_ok=True)
    text = model.text is not None  # a vision-only model (load_siglip2(text=False)) saves a vision-only snapshot
    state = {k: t for k, t in model.state_dict().items() if text or not k.startswith("logit_")}
    ckpt.save_safetensors(os.path.join(path, "model.safetensors"), ours_to_hf(state), metadata={"format": "pt"})
    config = {"model_type": "siglip", "initializer_factor": 1.0,
              "vision_config": {"model_type": "siglip_vision_model", **model.vision.cfg},
              **({"text_config": {"model_type": "siglip_text_model", **model.text.cfg}} if text else {}),
              **(config or {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_json is not None:
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_json, f, ensure_ascii=False)


# ----------------------------------------------------------------------------- decoder files
def save_decoder(path, decoder: Decoder):
    """Decoder weights as safetensors with the DecoderConfig in the metadata (one self-describing file)."""
    ckpt.save_safetensors(path, decoder.state_dict(), metadata={"decoder_config": json.dumps(asdict(decoder.cfg))})


def load_decoder(path, device=None):
    """A decoder written by `save_decoder` (config in the metadata) -> Decoder (eval)."""
    cfg = ckpt.config_from_metadata(path, ckpt.read_metadata(path), "decoder_config", DecoderConfig)
    with torch.device("meta"):
        try:
            dec = Decoder(cfg)
        except ValueError as e:  # a num_tokens that is not a square grid, heads that do not divide the width
            raise ValueError(f"{path}: metadata 'decoder_config': {e}") from None
    ckpt.load_checked(dec, ckpt.read_safetensors(path), path)
    dec.pos_embed = dec.pos_table()  # a fixed table, not in the file: rebuild it off the meta device
    return dec.to(device).eval()


# Released RAE decoders (official .pt state dicts and diffusers AutoencoderRAE files) -> our names, in this order.
DECODER_KEYS = [("decoder_embed.", "embed."), ("trainable_cls_token", "cls_token"), ("decoder_norm.", "norm."),
                ("decoder_pred.", "pred."), ("decoder_layers.", "blocks."), ("layernorm_before.", "norm1."),
                ("layernorm_after.", "norm2."), ("attention.attention.query.", "attn.q."),
                ("attention.attention.key.", "attn.k."), ("attention.attention.value.", "attn.v."),
                ("attention.output.dense.", "attn.proj."), ("attention.to_q.", "attn.q."), ("attention.to_k.", "attn.k."),
                ("attention.to_v.", "attn.v."), ("attention.to_out.0.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
                ("output.dense.", "mlp.fc2.")]


def import_rae_decoder(state):
    """Official RAE / diffusers AutoencoderRAE decoder keys -> our Decoder state dict (q/k/v fused)."""
    out = {}
    for key, t in state.items():
        if key.endswith("decoder_pos_embed") or key.startswith("encoder"):
            continue  # fixed sin-cos table (we recompute it) and encoder weights (we load SigLIP separately)
        key = key.removeprefix("decoder.")
        for theirs, ours in DECODER_KEYS:
            key = key.replace(theirs, ours)
        out[key] = t
    return fuse_qkv(out)


# ----------------------------------------------------------------------------- command line and smoke test
if __name__ == "__main__":
    if sys.argv[1:2] == ["download"]:  # the command line lives in hub.py; no model code needs it
        import hub
        hub.main(sys.argv[2:], check=read_siglip_config)
    else:  # smoke test: a tiny random SigLIP-2 vision tower, encode, decode
        small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
        rae = RAE(VisionTower({**VISION_DEFAULTS, **small}), Decoder(DecoderConfig(latent_dim=64, **DECODER_PRESETS["toy"])))
        z = rae.encode(torch.rand(2, 3, 224, 224) * 2 - 1)  # (B, N, C) = (2, 256, 64)
        print("z", tuple(z.shape), "decoded", tuple(rae.decode(z).shape))
