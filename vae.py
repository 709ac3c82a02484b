"""The FLUX.1 autoencoder (black-forest-labs `ae.safetensors`) from scratch: the baseline latent space, `--latent vae`.

Scale-RAE (arXiv 2601.16208) compares a DiT trained on frozen SigLIP-2 features (RAE, arXiv 2510.11690) against
the same DiT trained on the latents of this VAE. Encoder: conv, ResnetBlocks with 3 stride-2 downsamples, one
single-head attention at the lowest resolution, then the mean and log-variance of a 16-channel latent at 1/8
resolution. The decoder mirrors it. GroupNorm (32 groups, eps 1e-6) and swish throughout. Module and tensor names
follow BFL's keys, so `ae.safetensors` loads with no renaming; diffusers' `vae/` folders load through a key map.
Conventions: `img` (B, 3, H, W) in [-1, 1] with H and W multiples of 8; latent z = 0.3611 * (mu - 0.1159),
(B, 16, H/8, W/8); `pack` packs 2x2 latent patches into DiT tokens (B, (H/16)(W/16), 64) exactly as FLUX does.

    python vae.py    # smoke test: write a tiny random checkpoint, load it, encode, decode, pack (CPU, seconds)
"""
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


# ----------------------------------------------------------------------------- config
@dataclass
class VAEConfig:
    ch: int = 128  # width of level 0; level L has ch * ch_mult[L] channels
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level: 3 downsamples, so /8
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more per level)
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32  # BFL hard-codes 32; diffusers' config calls it norm_num_groups
    # z = scale * (mu - shift) brings FLUX.1 latents to roughly zero mean and unit variance (BFL's AutoEncoderParams)
    scale: float = 0.3611
    shift: float = 0.1159


# ----------------------------------------------------------------------------- latent <-> DiT tokens
def pack(z):
    """(B, C, h, w) latent -> (B, (h/2)(w/2), 4C) tokens, row-major; feature c*4 + ph*2 + pw (the FLUX packing)."""
    if z.ndim != 4 or z.shape[2] % 2 or z.shape[3] % 2:
        raise ValueError(f"pack: expected a latent (B, C, h, w) with even h and w (image sides multiples of 16), "
                         f"got shape {tuple(z.shape)}")
    B, C, h, w = z.shape
    z = z.reshape(B, C, h // 2, 2, w // 2, 2)  # (B, C, h/2, ph, w/2, pw)
    z = z.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, ph, pw)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)  # (B, N, 4C)


def unpack(tokens, h, w):
    """Inverse of pack: (B, (h/2)(w/2), 4C) tokens -> (B, C, h, w) latent."""
    if tokens.ndim != 3 or h % 2 or w % 2 or tokens.shape[1] != (h // 2) * (w // 2) or tokens.shape[2] % 4:
        raise ValueError(f"unpack: expected tokens (B, {(h // 2) * (w // 2)}, 4C) for an even latent size "
                         f"h={h}, w={w}, got shape {tuple(tokens.shape)}")
    B, _, D = tokens.shape
    z = tokens.reshape(B, h // 2, w // 2, D // 4, 2, 2)  # (B, h/2, w/2, C, ph, pw)
    z = z.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, ph, w/2, pw)
    return z.reshape(B, D // 4, h, w)


# ----------------------------------------------------------------------------- blocks
def group_norm(groups, channels):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(swish(GN(conv(swish(GN(x)))))), with a 1x1 conv shortcut when the width changes. No time input."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # nn.Identity has no parameters, so equal widths produce no nin_shortcut keys, as in ae.safetensors
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections (BFL's layout) and a residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = group_norm(groups, c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        # one head of width C over the HW positions: (B, 1, HW, C) each
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(2, 3) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax scale 1/sqrt(C)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        # Zero-pad right and bottom only (the LDM/BFL choice): output i sees input rows 2i..2i+2. Symmetric
        # padding=1 would shift every tap by one pixel and the pretrained weights would give other latents.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """Res -> attention -> Res at the lowest resolution: the only place where distant pixels interact."""

    def __init__(self, c, groups):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for L, c in enumerate(widths):
            level = nn.Module()  # a bare container, so keys read encoder.down.{L}.block.{j} as in BFL's file
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c, c, g) for j in range(cfg.num_res_blocks))
            # the last level keeps its resolution; nn.Identity has no parameters, so no key for it either
            level.downsample = Downsample(c) if L < len(widths) - 1 else nn.Identity()
            self.down.append(level)
            c_in = c
        self.mid = Mid(c_in, g)
        self.norm_out = group_norm(g, c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, img):  # (B, 3, H, W) -> (B, 2 z_channels, H/8, W/8)
        h = self.conv_in(img)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in, g)
        # Built from the lowest resolution up, but indexed like the encoder (up.{L} has width widths[L]), which is
        # why BFL's decoder.up.{L} is diffusers' decoder.up_blocks.{levels - 1 - L}.
        up = []
        for L in reversed(range(len(widths))):
            c = widths[L]
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c, c, g) for j in range(cfg.num_res_blocks + 1))
            level.upsample = Upsample(c) if L > 0 else nn.Identity()
            up.insert(0, level)
            c_in = c
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(g, c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, 8h, 8w)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxVAE(nn.Module):
    """encoder + decoder with the scaled latent of FLUX.1. No init_weights: the model is meant to be loaded from a
    checkpoint, and random weights (tests, the toy checkpoint) are PyTorch's default init."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.factor = 2 ** (len(cfg.ch_mult) - 1)  # pixels per latent position along each side (8)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, img, sample=False, generator=None):
        """img (B, 3, H, W) in [-1, 1] -> z (B, 16, H/8, W/8) = scale * (mu - shift), mu the posterior mean.
        sample=True draws mu + exp(logvar / 2) * eps instead, as BFL's encode always does (no logvar clamp); the
        generator must live on the model's device."""
        c, f = self.cfg.in_channels, self.factor
        if img.ndim != 4 or img.shape[1] != c or img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"encode: expected img (B, {c}, H, W) with H and W multiples of {f}, "
                             f"got shape {tuple(img.shape)}")
        mu, logvar = self.encoder(img).chunk(2, dim=1)  # (B, 16, H/8, W/8) each
        if sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            mu = mu + torch.exp(0.5 * logvar) * eps
        return self.cfg.scale * (mu - self.cfg.shift)

    def decode(self, z):
        """z (B, 16, h, w) as returned by encode -> img (B, 3, 8h, 8w), about [-1, 1] but not clamped (clamp to
        save a picture; losses and metrics see the raw output)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.z_channels:
            raise ValueError(f"decode: expected z (B, {self.cfg.z_channels}, h, w), got shape {tuple(z.shape)}")
        return self.decoder(z / self.cfg.scale + self.cfg.shift)


# ----------------------------------------------------------------------------- weight loading
# Looked for, in this order, when load_flux_vae is given a folder: BFL's file (fp32, at the top of the FLUX.1 repos),
# then a diffusers AutoencoderKL folder, then the `vae/` folder of a diffusers pipeline repo.
WEIGHT_FILES = ("ae.safetensors", "diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")
FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors dtype names a checkpoint may use; all are cast to `dtype`

# BFL name piece -> diffusers AutoencoderKL name piece, applied in this order (the renames of diffusers'
# convert_ldm_vae_checkpoint, which test_vae.py checks key for key). Level indices are handled in diffusers_key.
DIFFUSERS_NAMES = [
    ("norm_out.", "conv_norm_out."),
    ("nin_shortcut.", "conv_shortcut."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
    ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
    ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
    ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
    ("downsample.conv.", "downsamplers.0.conv."),
    ("upsample.conv.", "upsamplers.0.conv."),
    (".block.", ".resnets."),
]


def diffusers_key(key, num_levels):
    """The diffusers name of BFL key `key`. diffusers numbers decoder levels in the order they run (lowest
    resolution first), BFL by resolution, so decoder.up.{L} becomes decoder.up_blocks.{num_levels - 1 - L}."""
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.", key)
    for bfl, diffusers in DIFFUSERS_NAMES:
        key = key.replace(bfl, diffusers)
    return key


def _find_weights(path):
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: none of {', '.join(WEIGHT_FILES)} in this folder (only safetensors are read)")


def _config_from_diffusers(path):
    """VAEConfig from a diffusers AutoencoderKL config.json; configs of other autoencoders are refused."""
    try:
        with open(path) as f:
            c = json.load(f)
        if c.get("use_quant_conv", True) or c.get("use_post_quant_conv", True):
            raise ValueError("use_quant_conv and use_post_quant_conv must be false: not a FLUX.1 autoencoder")
        if not c.get("mid_block_add_attention", True):
            raise ValueError("mid_block_add_attention is false: not a FLUX.1 autoencoder")
        widths = c["block_out_channels"]
        if any(w % widths[0] for w in widths):
            raise ValueError(f"block_out_channels {widths} are not multiples of the first")
        return VAEConfig(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                         num_res_blocks=c["layers_per_block"], z_channels=c["latent_channels"],
                         in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
                         norm_groups=c.get("norm_num_groups", 32),  # diffusers' defaults for the three
                         scale=float(c["scaling_factor"]), shift=float(c["shift_factor"]))
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from None
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError; null/garbage values are TypeErrors
        raise ValueError(f"{path}: {e}") from None


def _config_from_shapes(shapes, name, num_levels, path):
    """BFL files carry no config: read the widths off the tensor shapes. GroupNorm groups, scale and shift stay
    FLUX.1's (32, 0.3611, 0.1159). `name` maps a BFL key to the file's own key."""
    def shape(key):
        if name(key) not in shapes:
            raise ValueError(f"{path}: missing key {name(key)} (needed to infer the model size)")
        return shapes[name(key)]

    ch = shape("encoder.conv_in.weight")[0]
    num_res_blocks = 0
    while name(f"encoder.down.0.block.{num_res_blocks}.conv1.weight") in shapes:
        num_res_blocks += 1
    return VAEConfig(ch=ch, ch_mult=tuple(shape(f"encoder.down.{L}.block.0.conv1.weight")[0] // ch
                                          for L in range(num_levels)),
                     num_res_blocks=num_res_blocks, z_channels=shape("decoder.conv_in.weight")[1],
                     in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0])


def _listed(keys, n=5):
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_flux_vae(path, device=None, dtype=None):
    """FluxVAE from BFL's `ae.safetensors`, or from a diffusers AutoencoderKL folder / pipeline repo (config.json +
    diffusion_pytorch_model.safetensors, keys renamed through diffusers_key). The format is read from the keys.
    Strict: any missing, unexpected or mis-shaped tensor, non-float dtype or unreadable file raises one ValueError
    naming the file and the keys. Weights are cast to `dtype` (default float32, as BFL runs the AE); the model is
    returned frozen, in eval mode."""
    file = _find_weights(path)
    try:
        with safe_open(file, "pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    shapes = {k: shape for k, (_, shape) in header.items()}
    levels = {k.split(".")[2] for k in header if k.startswith(("encoder.down.", "encoder.down_blocks."))}
    if not levels:
        raise ValueError(f"{file}: no encoder.down.* or encoder.down_blocks.* keys: not a FLUX.1 autoencoder")
    is_diffusers = any(k.startswith("encoder.down_blocks.") for k in header)
    config_file = os.path.join(os.path.dirname(file), "config.json")
    if is_diffusers and os.path.isfile(config_file):
        cfg, source = _config_from_diffusers(config_file), f"the config in {config_file}"
    else:
        name = (lambda k: diffusers_key(k, len(levels))) if is_diffusers else (lambda k: k)
        cfg, source = _config_from_shapes(shapes, name, len(levels), file), "the widths inferred from its shapes"

    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = FluxVAE(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    to_bfl = {(diffusers_key(k, len(cfg.ch_mult)) if is_diffusers else k): k for k in expected}  # file key -> ours

    # Check everything before reading any tensor data; name keys as the file spells them.
    def file_shape(k):  # diffusers keeps the attention projections as Linear [C, C], BFL as 1x1 convs [C, C, 1, 1]
        return tuple(shapes[k]) + ((1, 1) if ".attn_1." in to_bfl[k] and len(shapes[k]) == 2 else ())

    missing = [k for k in to_bfl if k not in header]
    unexpected = [k for k in header if k not in to_bfl]
    misshaped = [f"{k} {list(shapes[k])} (expected {list(expected[to_bfl[k]])})"
                 for k in to_bfl if k in header and file_shape(k) != expected[to_bfl[k]]]
    bad_dtype = [f"{k} {dt}" for k, (dt, _) in header.items() if dt not in FLOAT_DTYPES]
    problems = [f"{what} ({len(keys)}): {_listed(keys)}" for what, keys in
                [("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped),
                 ("non-float dtypes (want F32, F16 or BF16)", bad_dtype)] if keys]
    if problems:
        raise ValueError(f"{file}: does not match {source} ({cfg}): " + "; ".join(problems))

    dtype = dtype or torch.float32
    with safe_open(file, "pt") as f:
        state = {bfl: f.get_tensor(k).to(dtype).reshape(expected[bfl]) for k, bfl in to_bfl.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def write_tiny_flux_vae(path, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, seed=0):
    """Write a random-weight FLUX.1-architecture AE in BFL format (1.5 MB at the defaults), so
    `--latent vae` runs with no download. ch must be a multiple of 32 (the group count a BFL file implies)."""
    if ch % 32:
        raise ValueError(f"write_tiny_flux_vae: ch={ch} must be a multiple of 32 (GroupNorm groups)")
    cfg = VAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG stream
        torch.manual_seed(seed)
        model = FluxVAE(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return cfg


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_tiny_flux_vae(os.path.join(tmp, "ae.safetensors"))
        vae = load_flux_vae(tmp)
    print(f"loaded {cfg}: {sum(p.numel() for p in vae.parameters()):,} params")
    img = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        z = vae.encode(img)  # (B, 16, 8, 12)
        tokens = pack(z)  # (B, 24, 64)
        rec = vae.decode(unpack(tokens, *z.shape[2:]))  # (B, 3, 64, 96)
    print(f"img {tuple(img.shape)} -> z {tuple(z.shape)} (std {z.std():.3f}) -> tokens {tuple(tokens.shape)} "
          f"-> img {tuple(rec.shape)}")
