"""Representation Autoencoder (RAE): a frozen encoder's latent, the ViT decoder, latent statistics, released files.

The RAE of arXiv 2510.11690, as RAE's ImageNet models and Scale-RAE (arXiv 2601.16208, text-to-image) use it:
  - encoder (encoders.py): SigLIP-2 or DINOv2 [with registers], frozen, loaded from a HF snapshot;
  - latent: z = parameter-free LayerNorm of the encoder's last block output over the patch tokens, (B, N, C)
    [-> per-channel or per-element statistics];
  - decoder: a ViT-MAE-style transformer that maps z back to pixels (trained by train_decoder.py, or a released one:
    RAE-collections and nyu-visionx/siglip2_decoder `model.pt`, a diffusers AutoencoderRAE file).
Conventions: pixels `img` (B, 3, H, W) in [-1, 1]; latents `z` (B, N, C), N tokens in row-major patch order. The
decoder outputs the encoder's normalised pixel space (SigLIP: [-1, 1] itself); RAE.decode maps it back to [-1, 1].
Imports only torch, safetensors and this project's ckpt.py and encoders.py; the public names of encoders.py are
re-exported here (rae.load_siglip2, rae.load_dinov2, rae.SigLIP2, ...).

    python rae.py                                   # smoke test: a tiny random SigLIP-2 encoder, encode, decode
    python rae.py download google/siglip2-so400m-patch14-224 --out ckpt/siglip2-so400m-patch14-224
"""
import glob
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from functools import reduce

import torch
import torch.nn as nn
import torch.nn.functional as F

import ckpt
from encoders import (DINO_DEFAULTS, DINO_KEYS, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_KEYS, TEXT_DEFAULTS,
                      VISION_DEFAULTS, Attention, Block, DINOv2, MAPHead, MLP, SigLIP2, TextTower, VisionTower,
                      attention, check_image, fuse_qkv, hf_to_ours, load_dinov2, load_siglip2, ours_to_hf,
                      read_dinov2_config, read_siglip_config, save_siglip2, snapshot_files)

# the encoders' names, re-exported so that callers keep one module to import (rae.load_siglip2, rae.SigLIP2, ...)
__all__ = ["DINO_DEFAULTS", "DINO_KEYS", "IMAGENET_MEAN", "IMAGENET_STD", "SIGLIP_KEYS", "TEXT_DEFAULTS",
           "VISION_DEFAULTS", "Attention", "Block", "DINOv2", "MAPHead", "MLP", "SigLIP2", "TextTower", "VisionTower",
           "attention", "check_image", "fuse_qkv", "hf_to_ours", "load_dinov2", "load_siglip2", "ours_to_hf",
           "read_dinov2_config", "read_siglip_config", "save_siglip2", "snapshot_files",
           "DecoderConfig", "DECODER_PRESETS", "Decoder", "RAE", "sincos_2d", "unpatchify", "check_pixels",
           "compute_latent_stats", "save_latent_stats", "load_latent_stats", "save_decoder", "load_decoder",
           "import_rae_decoder", "DECODER_KEYS"]

# ----------------------------------------------------------------------------- configs

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


def check_pixels(img, where="images"):
    """Reject pixels outside [-1, 1] (a [0, 255] or [0, 1] image encodes to a plausible but wrong latent). It reads
    the values (a device sync), so it runs once where images enter a program, not in a forward."""
    lo, hi = torch.aminmax(img.detach())
    if not (lo >= -1.001 and hi <= 1.001):  # written so that NaN, which fails every comparison, is refused too
        raise ValueError(f"{where}: pixels must be in [-1, 1] (got min {lo.item():.3g}, max {hi.item():.3g}); "
                         "map [0, 255] images with img / 127.5 - 1")
    return img


# ----------------------------------------------------------------------------- the RAE
def decoder_pos_table(grid, dim):
    """(1 + grid*grid, dim): a zero row for the cls slot, then the MAE sin-cos grid (unscaled, as RAE's decoder)."""
    return torch.cat([torch.zeros(1, dim), sincos_2d(grid, dim)])


class Decoder(nn.Module):
    """ViT-MAE-style decoder of RAE (the official GeneralDecoder): Linear in, trainable cls token, fixed 2-D sin-cos
    positions, pre-LN blocks (LN eps 1e-12, exact GELU), LayerNorm, Linear to patch pixels, unpatchify.
    drop_first_token: Scale-RAE's decoder embeds (B, 1 + N, C) and drops token 0 (its caller prepends a zero token).
    The embedding is per token, so this is exactly decoding the N other tokens: a flag for callers that hold the
    1 + N layout; decoding z (B, N, C) with the flag off is the same map."""
    def __init__(self, cfg: DecoderConfig, drop_first_token=False):
        super().__init__()
        self.cfg, self.drop_first_token = cfg, drop_first_token
        D, g = cfg.hidden_size, math.isqrt(cfg.num_tokens)
        if g * g != cfg.num_tokens:
            raise ValueError(f"decoder num_tokens must be a square grid, got {cfg.num_tokens}")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"decoder hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.embed = nn.Linear(cfg.latent_dim, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))  # zero-init, as in RAE
        # fixed: rebuilt by our loader, taken from a released file that stores one (see load_decoder)
        self.register_buffer("pos_embed", self.pos_table(), persistent=False)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_dim, 1e-12, "none") for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-12)
        self.pred = nn.Linear(D, cfg.patch_size ** 2 * 3)

    def pos_table(self):  # (1 + N, D)
        return decoder_pos_table(math.isqrt(self.cfg.num_tokens), self.cfg.hidden_size).to(self.embed.weight.device)

    def forward(self, z):  # (B, [1 +] N, C) -> (B, 3, H, W) in the encoder's normalised pixel space (not clamped)
        n = self.cfg.num_tokens + (1 if self.drop_first_token else 0)
        if z.ndim != 3 or z.shape[1:] != (n, self.cfg.latent_dim):
            raise ValueError(f"decoder expects latents (B, {n}, {self.cfg.latent_dim}), got {tuple(z.shape)}")
        x = self.embed(z[:, 1:] if self.drop_first_token else z)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        for block in self.blocks:
            x = block(x)
        x = self.pred(self.norm(x))[:, 1:]  # drop cls: (B, N, p*p*3)
        return unpatchify(x, self.cfg.patch_size)


class RAE(nn.Module):
    """encode: img in [-1, 1] -> the encoder's input -> patch tokens of its last block -> parameter-free LayerNorm
    [-> standardization] = z (B, N, C). decode: [undo standardization ->] decoder -> img in [-1, 1] (not clamped).
    `stats` = {"mean", "var"} of shape (C,) or (N, C) (load_latent_stats). The encoder's input, as the official RAE
    builds it: [0, 1] pixels, resized to `input_size` (bicubic, align_corners=False, no antialias; only when the size
    differs; e.g. 224 for RAE's 256-px DINOv2 models), normalised by `pixel_mean` / `pixel_std` (default: the
    encoder's, ImageNet for DINOv2, 0.5 for SigLIP, whose input is then img itself).
    SigLIP-2: the official latent is post_layernorm with its affine removed, over all tokens; that LayerNorm of the
    last block output (eps from config.json, 1e-6) is exactly ours. DINOv2: the final layernorm without affine, CLS
    and registers dropped (that LayerNorm is per token, so dropping them first gives the same numbers).
    encoder None: a decode-only RAE (sampling needs no encoder), whose pixel stats must then be given."""
    def __init__(self, encoder, decoder: Decoder | None = None, stats=None, eps=1e-5, input_size=None,
                 pixel_mean=None, pixel_std=None):
        super().__init__()
        self.encoder = encoder and encoder.eval().requires_grad_(False)
        self.decoder = decoder
        self.eps, self.input_size = eps, input_size
        self.pixel_mean = tuple(pixel_mean or encoder.pixel_mean)
        self.pixel_std = tuple(pixel_std or encoder.pixel_std)
        self.register_buffer("mean", None if stats is None else stats["mean"].float(), persistent=False)
        self.register_buffer("var", None if stats is None else stats["var"].float(), persistent=False)

    def pixels(self, img):
        """img (B, 3, H, W) in [-1, 1] -> the encoder's input pixels (see the class docstring)."""
        size = self.input_size
        resize = size is not None and tuple(img.shape[-2:]) != (size, size)
        if not resize and self.signed_pixels():
            return img  # (img + 1) / 2 normalised by 0.5 / 0.5 is img: skip the two roundings
        x = (img + 1) / 2  # [0, 1]
        if resize:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        mean, std = self.pixel_stats(x)
        return (x - mean) / std

    def signed_pixels(self):
        """Whether the encoder's normalised pixels are img itself: mean = std = 0.5 (SigLIP)."""
        return self.pixel_mean == self.pixel_std == (0.5, 0.5, 0.5)

    def pixel_stats(self, x):
        """The encoder's pixel mean and std as (1, 3, 1, 1) tensors of x's dtype and device."""
        return (torch.tensor(s, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for s in (self.pixel_mean, self.pixel_std))

    def tokens(self, img):
        """img in [-1, 1] -> (B, N, C) the encoder's last block output over the patch tokens (before any norm)."""
        return self.encoder.patch_tokens(self.pixels(img))

    @torch.no_grad()
    def encode(self, img):
        """img (B, 3, H, W) in [-1, 1] -> z (B, N, C)."""
        h = self.tokens(img)  # (B, N, C)
        z = F.layer_norm(h.float(), h.shape[-1:], eps=self.encoder.latent_eps)  # per token, no affine
        if self.mean is not None:
            z = (z - self.mean) / torch.sqrt(self.var + self.eps)
        return z

    def decode(self, z):
        """z (B, N, C) -> img (B, 3, H, W), about [-1, 1] (not clamped)."""
        x = self.decoder(self.unnormalize(z))  # the encoder's normalised pixel space
        if self.signed_pixels():
            return x  # x * 0.5 + 0.5 is [0, 1], so x is [-1, 1] already
        mean, std = self.pixel_stats(x)
        return (x * std + mean) * 2 - 1

    def unnormalize(self, z):
        """Latent back to the LayerNorm space (what the decoder reads; what the SigLIP head's `vision.pool` expects)."""
        return z if self.mean is None else z * torch.sqrt(self.var + self.eps) + self.mean


# ----------------------------------------------------------------------------- latent statistics
@torch.no_grad()
def compute_latent_stats(rae, images, per="channel"):
    """Exact dataset mean/var of the (un-standardized) latents over an iterable of image batches.
    per="channel" -> (C,), per="element" -> (N, C). Accumulates in float64 (not RAE's EMA of batch stats)."""
    n, s, s2 = 0, 0.0, 0.0
    for img in images:
        h = rae.tokens(img)  # (B, N, C)
        z = F.layer_norm(h.double(), h.shape[-1:], eps=rae.encoder.latent_eps)  # (B, N, C)
        z = z.reshape(-1, z.shape[-1]) if per == "channel" else z
        n, s, s2 = n + z.shape[0], s + z.sum(0), s2 + (z * z).sum(0)
    if n == 0:
        raise ValueError("compute_latent_stats: the image iterator yielded no batch")
    mean = s / n
    return {"mean": mean.float(), "var": (s2 / n - mean * mean).clamp_min(0).float()}


def save_latent_stats(path, stats):
    ckpt.save_safetensors(path, stats)


def is_torch_file(path):
    """A torch.save file (a zip archive, or a legacy pickle) rather than safetensors, told by its first bytes (a
    safetensors file starts with 8 bytes of header length, then the JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{")


def as_tokens(t):
    """An official per-position statistic (C, H, W) -> (H*W, C) in the latent's raster order; (C, 1, 1) -> (C,)."""
    if not (torch.is_tensor(t) and t.ndim == 3):
        return t
    t = t.reshape(t.shape[0], -1).T  # (H*W, C): token n = row * W + col
    return t[0] if t.shape[0] == 1 else t.contiguous()


def read_stats_file(path):
    """A statistics file -> (its tensors, as stored; the names of mean and var in it; its kind: "ours", "official"
    or "diffusers"). diffusers' std is turned into var here. The formats: see load_latent_stats."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    if is_torch_file(path):  # the official stat.pt: {"var"} or {"mean", "var"}, (C, H, W) as it was computed
        return ckpt.read_checkpoint(path), ("mean", "var"), "official"
    raw = ckpt.read_safetensors(path, keep=lambda k: not k.startswith(("encoder.", "decoder.")))
    if "_latents_mean" not in raw and "_latents_std" not in raw:
        return raw, ("mean", "var"), "ours"
    raw.pop("encoder_mean", None), raw.pop("encoder_std", None)  # the pixel stats of its encoder, not the latent's
    std = raw.get("_latents_std")
    if torch.is_tensor(std) and std.is_floating_point():  # it standardizes (z - mean) / (std + 1e-5): the exact var
        raw["_latents_std"] = (std.double() + 1e-5) ** 2 - 1e-5
    return raw, ("_latents_mean", "_latents_std"), "diffusers"


def load_latent_stats(path, channels=None, tokens=None):
    """Latent statistics -> {"mean", "var"}, each (C,) or (N, C), checked against the latent (N = tokens,
    C = channels) it will standardize: a stats file of another encoder or resolution fails here, in one line naming
    the file and every problem, not as a broadcast error mid-run. RAE standardizes z = (z - mean) / sqrt(var + 1e-5),
    the official formula. Reads
      - ours (`save_latent_stats`, safetensors): "mean" and "var", (C,) or (N, C);
      - RAE's official stat.pt (torch.save, read weights-only): "var" [and "mean"], (C, H, W), (C, 1, 1), (C,) or
        (H*W, C). Without a mean there is no centring (mean = 0): RAE-collections' DINOv2-B 256 file has only "var";
      - a diffusers AutoencoderRAE safetensors file: its _latents_mean / _latents_std buffers (std = sqrt(var + 1e-5)
        as its converter writes it; var is recovered so that the standardization is the one diffusers applies)."""
    stats, names, kind = read_stats_file(path)
    c, n = channels or "C", tokens or "N"
    shapes = f"({c},) or ({n}, {c})" if kind == "ours" else f"({c}, H, W), ({c}, 1, 1), ({c},) or ({n}, {c})"
    problems = [f"unexpected key '{k}' (expected '{names[0]}' and '{names[1]}')" for k in sorted(set(stats) - set(names))]
    problems += [f"missing key '{k}'" for k in names if k not in stats and (kind, k) != ("official", "mean")]
    out = {}
    for key, name in zip(("mean", "var"), names):
        t = stats.get(name)
        if t is None:
            continue
        if not torch.is_tensor(t):
            problems.append(f"key '{name}' is a {type(t).__name__}, expected a tensor")
            continue
        tok = t if kind == "ours" else as_tokens(t)  # (C,) or (N, C)
        if kind == "diffusers" and t.shape == (1,):  # its default buffers: one value for every channel
            tok = t.expand(channels) if channels else t
        elif t.ndim not in ((1, 2) if kind == "ours" else (1, 2, 3)) or (channels and tok.shape[-1] != channels) or (
                tok.ndim == 2 and tokens and tok.shape[0] != tokens):
            problems.append(f"key '{name}' has shape {tuple(t.shape)}, expected {shapes}")
            continue
        if not t.is_floating_point():
            problems.append(f"key '{name}' has dtype {t.dtype}, expected a floating-point tensor")
        elif not torch.isfinite(t).all() or (key == "var" and (t < (-1e-5 if kind == "diffusers" else 0)).any()):
            problems.append(f"key '{name}' has {'negative' if torch.isfinite(t).all() else 'non-finite'} entries")
        else:
            out[key] = tok.float().contiguous()
    if not problems and "mean" in out and out["mean"].shape != out["var"].shape:
        problems.append(f"key '{names[0]}' has shape {tuple(out['mean'].shape)} but '{names[1]}' has "
                        f"{tuple(out['var'].shape)}")
    ckpt.report(path, problems)
    return {"mean": out.get("mean", torch.zeros_like(out["var"])), "var": out["var"]}


# ----------------------------------------------------------------------------- decoder files
def save_decoder(path, decoder: Decoder):
    """Decoder weights as safetensors with the DecoderConfig in the metadata (one self-describing file)."""
    ckpt.save_safetensors(path, decoder.state_dict(), metadata={"decoder_config": json.dumps(asdict(decoder.cfg))})


# The official GeneralDecoder's names (RAE-collections and nyu-visionx/siglip2_decoder model.pt) -> ours, in this order
# (backwards: ours -> official). diffusers' AutoencoderRAE prefixes them with "decoder." and renames the attention.
DECODER_KEYS = [("decoder_embed.", "embed."), ("trainable_cls_token", "cls_token"), ("decoder_norm.", "norm."),
                ("decoder_pred.", "pred."), ("decoder_layers.", "blocks."), ("layernorm_before.", "norm1."),
                ("layernorm_after.", "norm2."), ("attention.attention.query.", "attn.q."),
                ("attention.attention.key.", "attn.k."), ("attention.attention.value.", "attn.v."),
                ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
                ("output.dense.", "mlp.fc2.")]
DIFFUSERS_KEYS = [("attention.to_q.", "attention.attention.query."), ("attention.to_k.", "attention.attention.key."),
                  ("attention.to_v.", "attention.attention.value."), ("attention.to_out.0.", "attention.output.dense.")]
# HF ViTMAEConfig's decoder defaults (the same as diffusers AutoencoderRAE's), for a config.json that omits a field;
# without a config.json, RAE's ViT-XL (the official code reads configs/decoder/ViTXL/config.json from its repository).
VITMAE_DECODER = dict(decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                      decoder_intermediate_size=2048, layer_norm_eps=1e-12, hidden_act="gelu")
VITXL_DECODER = dict(VITMAE_DECODER, decoder_hidden_size=1152, decoder_num_hidden_layers=28, decoder_intermediate_size=4096)


def import_rae_decoder(state):
    """Official RAE / diffusers AutoencoderRAE decoder keys -> our Decoder state dict (q/k/v fused). Drops what is
    not decoder weights: the stored sin-cos table, the encoder, and diffusers' pixel and latent statistics."""
    out = {}
    for key, t in state.items():
        if key.endswith("decoder_pos_embed") or key.startswith(("encoder", "_latents")):
            continue
        key = key.removeprefix("decoder.")
        for theirs, ours in DIFFUSERS_KEYS + DECODER_KEYS:
            key = key.replace(theirs, ours)
        out[key] = t
    return fuse_qkv(out)


def decoder_file(path):
    """A decoder path -> its file: the path itself, or in a folder model.pt, decoder.safetensors (train_decoder.py),
    diffusion_pytorch_model.safetensors (diffusers), else the folder's only *.pt (e.g. dinov2_decoder.pt)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: file not found")
        return path
    for name in ("model.pt", "decoder.safetensors", "diffusion_pytorch_model.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    pts = sorted(glob.glob(os.path.join(path, "*.pt")))
    if len(pts) != 1:
        raise ValueError(f"{path}: no decoder file (model.pt, decoder.safetensors, diffusion_pytorch_model.safetensors"
                         f" or one *.pt)" + (f"; several *.pt: {', '.join(map(os.path.basename, pts))}" if pts else ""))
    return pts[0]


def released_config(state, cfg_json, diffusers):
    """DecoderConfig of a released decoder, from its tensors (C from decoder_embed, N from decoder_pos_embed, p from
    decoder_pred) and its config.json (widths, depth, heads; ViT-XL without one) -> (config, problems)."""
    c = {**(VITXL_DECODER if cfg_json is None else VITMAE_DECODER),
         **{k: v for k, v in (cfg_json or {}).items() if k in VITMAE_DECODER}}
    cfg_json, problems = cfg_json or {}, []
    if c["layer_norm_eps"] != 1e-12 or c["hidden_act"] != "gelu":
        problems.append(f"config.json layer_norm_eps {c['layer_norm_eps']} / hidden_act {c['hidden_act']!r}: only "
                        "1e-12 / 'gelu' (the RAE decoder's) are supported")
    shape = lambda k, i: state[k].shape[i] if torch.is_tensor(state.get(k)) and state[k].ndim > i else None
    patch, image = cfg_json.get("patch_size"), cfg_json.get("image_size")
    rows = shape("decoder_pred.weight", 0)  # p * p * 3
    p = math.isqrt(rows // 3) if rows else (patch if isinstance(patch, int) else 16)
    if isinstance(patch, int) and patch != p:
        problems.append(f"config.json patch_size {patch}, but decoder_pred.weight has {rows} rows (patch {p})")
    if shape("decoder_pos_embed", 1):
        n = shape("decoder_pos_embed", 1) - 1
    elif isinstance(image, int) and isinstance(patch, int):  # ViTMAEConfig: image_size is the decoder's output side
        n = (image // patch) ** 2
    elif diffusers:  # AutoencoderRAE: N = (encoder_input_size / encoder_patch_size)^2, defaults 224 / 14
        n = (cfg_json.get("encoder_input_size", 224) // cfg_json.get("encoder_patch_size", 14)) ** 2
    else:
        n = 256  # RAE's 256-px models; a 512-px decoder stores its decoder_pos_embed (1025 rows)
    cfg = DecoderConfig(latent_dim=shape("decoder_embed.weight", 1) or 768, num_tokens=n,  # config.json's is stale
                        patch_size=p, hidden_size=c["decoder_hidden_size"], depth=c["decoder_num_hidden_layers"],
                        num_heads=c["decoder_num_attention_heads"], mlp_dim=c["decoder_intermediate_size"])
    return cfg, problems


def load_released_decoder(file, state, diffusers, drop_first_token=False):
    """An official GeneralDecoder state dict (or diffusers' AutoencoderRAE one) -> Decoder, all problems in one line.
    Missing trainable_cls_token: zeros (the official strict=False load keeps its zero init); missing
    decoder_pos_embed: the unscaled MAE table; a stored one is used as it is."""
    beside = os.path.join(os.path.dirname(file), "config.json")
    cfg_json = ckpt.read_json(beside, "a decoder config") if os.path.isfile(beside) else None
    names = DIFFUSERS_KEYS if diffusers else []  # checked in the file's own names, loaded in the official ones
    rename = lambda k: "decoder." + reduce(lambda k, m: k.replace(m[1], m[0]), names, k) if diffusers else k
    state = {reduce(lambda k, m: k.replace(*m), names, k.removeprefix("decoder.")): v for k, v in state.items()}
    cfg, problems = released_config(state, cfg_json, diffusers)
    try:
        with torch.device("meta"):
            dec = Decoder(cfg, drop_first_token)
    except ValueError as e:
        ckpt.report(file, problems + [str(e)])
    D, g = cfg.hidden_size, math.isqrt(cfg.num_tokens)
    expected = ours_to_hf(dec.state_dict(), DECODER_KEYS)  # official names
    expected["decoder_pos_embed"] = torch.empty(1, 1 + cfg.num_tokens, D, device="meta")
    state.setdefault("trainable_cls_token", torch.zeros(1, 1, D))
    state.setdefault("decoder_pos_embed", decoder_pos_table(g, D)[None])
    problems += ckpt.state_problems({rename(k): v for k, v in state.items()}, {rename(k): v for k, v in expected.items()})
    ckpt.report(file, problems, "" if cfg_json is None else f" (with {beside})")
    pos = state.pop("decoder_pos_embed")[0].float()
    dec.load_state_dict({k: v.float() for k, v in import_rae_decoder(state).items()}, assign=True)
    dec.pos_embed = pos
    return dec


def load_decoder(path, device=None, drop_first_token=False):
    """A decoder file or folder -> Decoder (eval). `dec(z)`: z (B, N, C) -> (B, 3, H, W) in the encoder's normalised
    pixel space (the official GeneralDecoder's unpatchified output; RAE.decode maps it to [-1, 1]). Reads
      - ours (`save_decoder`): safetensors with the DecoderConfig in its metadata;
      - an official decoder `model.pt` (RAE-collections, nyu-visionx/siglip2_decoder; torch.load weights-only), with
        the HF ViTMAEConfig-style config.json beside it when there is one, else ViT-XL; C, N, p from the tensors;
      - a diffusers AutoencoderRAE file (its decoder.* tensors; the config.json beside it when there is one).
    drop_first_token: Scale-RAE's decoder, which takes (B, 1 + N, C) and ignores token 0 (see Decoder)."""
    file = decoder_file(path)
    if is_torch_file(file):
        dec = load_released_decoder(file, ckpt.read_checkpoint(file), False, drop_first_token)
        return dec.to(device).eval()
    meta = ckpt.read_metadata(file)
    diffusers = {} if "decoder_config" in meta else ckpt.read_safetensors(file, lambda k: k.startswith("decoder."))
    if diffusers:
        return load_released_decoder(file, diffusers, True, drop_first_token).to(device).eval()
    cfg = ckpt.config_from_metadata(file, meta, "decoder_config", DecoderConfig)
    with torch.device("meta"):
        try:
            dec = Decoder(cfg, drop_first_token)
        except ValueError as e:  # a num_tokens that is not a square grid, heads that do not divide the width
            raise ValueError(f"{file}: metadata 'decoder_config': {e}") from None
    ckpt.load_checked(dec, ckpt.read_safetensors(file), file)
    dec.pos_embed = dec.pos_table()  # a fixed table, not in the file: rebuild it off the meta device
    return dec.to(device).eval()


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
