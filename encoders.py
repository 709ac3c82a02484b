"""The frozen encoders of RAE: the SigLIP-2 towers and DINOv2, numerically equal to transformers, from HF snapshots.

- SigLIP-2 (arXiv 2502.14786), fixed resolution: vision + text towers and the MAP head, equal to transformers'
  SiglipModel (`load_siglip2`: config.json + model.safetensors [+ shards] + tokenizer.json). Scale-RAE's encoder.
- DINOv2 (arXiv 2304.07193), with registers (arXiv 2309.16588) or plain: equal to transformers'
  Dinov2WithRegistersModel / Dinov2Model (`load_dinov2`). RAE's ImageNet encoder (dinov2-with-registers-base); plain
  DINOv2 ViT-L/14 is the FD-DINOv2 feature network.
Conventions: every tower takes the pixels it was trained on: SigLIP `img` (B, 3, H, W) in [-1, 1] (mean = std = 0.5),
DINOv2 ImageNet-normalised `pixel_values`. Tokens (B, N, D) in row-major patch order. `patch_tokens(x)` is what an
RAE latent is built from (the last block output of the patch tokens, before any final norm); `pixel_mean`,
`pixel_std` and `latent_eps` tell rae.RAE how to feed it and normalise it. Imports torch, safetensors, this project's
ckpt.py and tokenizer.py. Smoke test: python encoders.py
"""
import json
import os
import re

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
# transformers' Dinov2WithRegistersConfig / Dinov2Config defaults (note the registers class defaults to patch 16).
DINO_DEFAULTS = {
    "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                  hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3,
                                  qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=4),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                   layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                   layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=0),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- small stateless functions
def attention(q, k, v, heads):
    """Multi-head attention on (B, Nq, D) queries and (B, Nk, D) keys/values, no mask -> (B, Nq, D)."""
    B, Nq, D = q.shape
    q = q.view(B, Nq, heads, D // heads).transpose(1, 2)  # (B, H, Nq, Dh)
    k = k.view(B, k.shape[1], heads, D // heads).transpose(1, 2)  # (B, H, Nk, Dh)
    v = v.view(B, v.shape[1], heads, D // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v)  # scale Dh^-0.5, softmax in fp32 on every backend we use
    return o.transpose(1, 2).reshape(B, Nq, D)


def check_image(img, patch):
    """Reject a layout the towers would silently mis-read: not (B, 3, H, W) float, or sides not multiples of the
    patch. Python checks only, no device sync: it runs on every forward."""
    if not torch.is_tensor(img) or img.ndim != 4 or img.shape[1] != 3 or not img.is_floating_point():
        shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
        raise ValueError(f"expected a float image tensor (B, 3, H, W), got {shape}")
    if img.shape[2] % patch or img.shape[3] % patch:
        raise ValueError(f"image size {tuple(img.shape[2:])} is not a multiple of the patch size {patch}")


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


class MLP(nn.Module):  # approximate: "tanh" (SigLIP's gelu_pytorch_tanh) or "none" (exact: DINOv2, the decoder)
    def __init__(self, dim, hidden, approximate):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(dim, hidden), nn.Linear(hidden, dim), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LN ViT block. SigLIP: LN eps 1e-6 and tanh GELU; the ViT-MAE decoder: LN eps 1e-12 and exact GELU;
    DINOv2: LN eps 1e-6, exact GELU and LayerScale (a learned per-channel gain on each branch's output)."""
    def __init__(self, dim, heads, mlp_dim, eps, approximate, layerscale=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, approximate)
        self.ls1 = nn.Parameter(torch.ones(dim)) if layerscale else None  # HF layer_scale1.lambda1
        self.ls2 = nn.Parameter(torch.ones(dim)) if layerscale else None

    def forward(self, x):  # (B, N, D)
        if self.ls1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


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
    pixel_mean = pixel_std = (0.5, 0.5, 0.5)  # its input is [0, 1] pixels normalised by these: img in [-1, 1]

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

    def patch_tokens(self, img):  # what an RAE latent is made of: every token (SigLIP has no CLS)
        return self(img)

    @property
    def width(self):
        return self.cfg["hidden_size"]

    @property
    def latent_eps(self):  # the eps of post_layernorm, which the official RAE keeps with its affine removed
        return self.cfg["layer_norm_eps"]

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


class DINOv2(nn.Module):
    """DINOv2 ViT: patch conv, CLS token, learned positions, [register tokens], pre-LN blocks with LayerScale, final
    LayerNorm. `registers` in cfg: the with-registers model (transformers' Dinov2WithRegistersModel), else Dinov2Model;
    the two resize their position table differently (see pos_for)."""
    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, self.patch, R = cfg["hidden_size"], cfg["patch_size"], cfg["num_register_tokens"]
        self.grid = cfg["image_size"] // self.patch
        self.registered = cfg["model_type"] == "dinov2_with_registers"
        self.patch_embed = nn.Conv2d(cfg["num_channels"], D, self.patch, self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.registers = nn.Parameter(torch.zeros(1, R, D)) if self.registered else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, D))  # (1, 1 + g*g, D): CLS row, then the grid
        self.blocks = nn.ModuleList(Block(D, cfg["num_attention_heads"], int(D * cfg["mlp_ratio"]), cfg["layer_norm_eps"],
                                          "none", layerscale=True) for _ in range(cfg["num_hidden_layers"]))
        self.norm = nn.LayerNorm(D, eps=cfg["layer_norm_eps"])

    @property
    def width(self):
        return self.cfg["hidden_size"]

    @property
    def latent_eps(self):  # RAE keeps the final LayerNorm with its affine removed
        return self.cfg["layer_norm_eps"]

    @property
    def num_prefix(self):  # CLS + registers, before the patch tokens
        return 1 + (self.registers.shape[1] if self.registered else 0)

    def pos_for(self, h, w):
        """Position table (1, 1 + h*w, D) for an h x w patch grid, exactly as transformers resizes it: the grid part
        bicubic (align_corners=False) in float32, with antialias for the registers model (as the original
        dinov2_vitb14_reg) and without for the plain one; the CLS row unchanged; none at the native square grid."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False,
                             antialias=self.registered).to(self.pos_embed.dtype)  # (1, D, h, w)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def hidden(self, pixel_values):
        """(B, 3, H, W) ImageNet-normalised, sides multiples of the patch -> last block output (B, 1 + R + N, D)."""
        check_image(pixel_values, self.patch)  # layout and size only: no device sync
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # (B, D, H/p, W/p)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_for(h, w)  # (B, 1 + N, D)
        if self.registered:  # registers go in after the positions are added: they have none
            x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)  # (B, 1 + R + N, D)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, pixel_values):
        """-> (B, 1 + R + N, D) = HF last_hidden_state (final LayerNorm with its affine)."""
        return self.norm(self.hidden(pixel_values))

    def patch_tokens(self, pixel_values):
        """-> (B, N, D): the last block output of the patch tokens (CLS and registers dropped), before the norm."""
        return self.hidden(pixel_values)[:, self.num_prefix:]


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


def hf_to_ours(key, keys=SIGLIP_KEYS):
    for hf, ours in keys:
        key = key.replace(hf, ours)
    return key


def ours_to_hf(state, keys=SIGLIP_KEYS):
    """Our state dict -> HF key names (SIGLIP_KEYS, or another map such as DINO_KEYS) and layout (q, k, v split)."""
    out = {}
    for key, t in state.items():
        split = zip("qkv", t.chunk(3)) if ".attn.qkv." in key else [(None, t)]
        for n, part in split:
            name = key.replace("attn.qkv.", f"attn.{n}.") if n else key
            for hf, ours in reversed(keys):
                name = name.replace(ours, hf)
            out[name] = part.contiguous()
    return out


def read_siglip_config(path):
    """A snapshot folder's config.json -> (vision config, text config), with transformers' defaults filled in."""
    cfg_path = os.path.join(path, "config.json")
    cfg = ckpt.read_json(cfg_path, "a HF SigLIP-2 snapshot folder")
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


# ----------------------------------------------------------------------------- loading DINOv2 from a HF snapshot
# HF Dinov2(WithRegisters)Model key fragments -> ours, in this order (ours_to_hf(state, DINO_KEYS) runs it backwards).
DINO_KEYS = [("embeddings.patch_embeddings.projection.", "patch_embed."), ("embeddings.position_embeddings", "pos_embed"),
             ("embeddings.cls_token", "cls_token"), ("embeddings.register_tokens", "registers"),
             ("encoder.layer.", "blocks."), ("attention.attention.query.", "attn.q."),
             ("attention.attention.key.", "attn.k."), ("attention.attention.value.", "attn.v."),
             ("attention.output.dense.", "attn.proj."), ("layer_scale1.lambda1", "ls1"),
             ("layer_scale2.lambda1", "ls2"), ("layernorm.", "norm.")]


def read_dinov2_config(path):
    """A DINOv2 snapshot's config.json -> our config dict (transformers' defaults of its model_type filled in)."""
    cfg_path = os.path.join(path, "config.json")
    cfg = ckpt.read_json(cfg_path, "a HF DINOv2 snapshot folder")
    mt = cfg.get("model_type")
    if mt not in DINO_DEFAULTS:
        raise ValueError(f"{cfg_path}: unknown model_type {mt!r}, expected 'dinov2_with_registers' or 'dinov2'")
    out = {**DINO_DEFAULTS[mt], **{k: v for k, v in cfg.items() if k in DINO_DEFAULTS[mt]}, "model_type": mt}
    problems = [f"{k} {out[k]!r} is not supported ({why})" for k, ok, why in [
        ("use_swiglu_ffn", not out["use_swiglu_ffn"], "the SwiGLU FFN of ViT-g"),
        ("hidden_act", out["hidden_act"] == "gelu", "only exact 'gelu'"), ("qkv_bias", out["qkv_bias"], "need a bias"),
        ("image_size", isinstance(out["image_size"], int), "need a square int"),
        ("patch_size", isinstance(out["patch_size"], int), "need an int"),
        ("hidden_size", out["hidden_size"] % out["num_attention_heads"] == 0, "not divisible by the heads")] if not ok]
    ckpt.report(cfg_path, problems)
    return out


def load_dinov2(path, device=None, dtype=None):
    """A HF snapshot folder of DINOv2 (facebook/dinov2-with-registers-*, or plain facebook/dinov2-*) -> DINOv2
    (eval, frozen). `enc(pixel_values)` = HF last_hidden_state. A bad snapshot fails with one line naming the file
    and every bad key, in HF's names."""
    cfg = read_dinov2_config(path)
    with torch.device("meta"):
        model = DINOv2(cfg)
    expected = ours_to_hf(model.state_dict(), DINO_KEYS)  # HF names, meta tensors
    files = snapshot_files(path)
    # mask_token only serves masked pre-training (iBOT); position_ids is an old non-persistent HF buffer
    hf = {k: t for file in files for k, t in ckpt.read_safetensors(file).items()
          if k != "embeddings.mask_token" and not k.endswith("position_ids")}
    where = files[0] if len(files) == 1 else os.path.join(path, "model.safetensors.index.json")
    ckpt.report(where, ckpt.state_problems(hf, expected), " (config.json sets the expected shapes)")
    state = fuse_qkv({hf_to_ours(k, DINO_KEYS): t for k, t in hf.items()})
    model.load_state_dict({k: t.to(device=device, dtype=dtype or torch.float32) for k, t in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":
    small = dict(model_type="dinov2_with_registers", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=56, patch_size=14)
    enc = DINOv2({**DINO_DEFAULTS["dinov2_with_registers"], **small})
    print("DINOv2 last_hidden_state", tuple(enc(torch.randn(2, 3, 70, 42)).shape))  # (2, 1 + 4 + 15, 64)
