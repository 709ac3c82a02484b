"""DiT for flow matching in the latent space of a frozen encoder: a LightningDiT with per-token conditions, and the
loaders of our exports and of both papers' released DiTs. The loss and the sampler live in flow.py (re-exported here).

Papers: RAE, "Diffusion Transformers with Representation Autoencoders" (arXiv 2510.11690): a LightningDiT, optionally
with a wide "DDT" head (DiT-DH), trained on frozen-encoder tokens. Scale-RAE (arXiv 2601.16208): the same DiT scaled to
text-to-image, with one condition vector per latent token fed through adaLN (no cross-attention).
Tensors: latents z and noisy latents x are (B, N, C) tokens in raster order of a sqrt(N) x sqrt(N) grid (patch size 1).
Time t in [0, 1] with t = 0 data and t = 1 noise: x_t = (1 - t) z + t eps; the model predicts v = eps - z.
Condition: cfg.cond == "text": the text tower's token states (B, T, text_dim) float; "class": class ids (B,) long;
"tokens": per-token conditions (B, N, cond_dim) made outside (Scale-RAE's LLM queries).
`drop` (B,) bool swaps a sample's condition for the learned null condition (condition dropout, the CFG branch).
The released DiTs (load_rae_dit, load_scale_rae_dit) load through released.py's key maps into this same module.

    python dit.py                        # parameter count and training FLOPs of every preset, then a smoke test
    python -m pytest -q test_dit.py      # the tests (CPU, under a minute)
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import ckpt
# flow matching and the sampler live in flow.py (they work with any model); dit.* keeps their public names
from flow import flow_loss, loss_per_t_bin, official_schedule, sample, sample_t, shift_alpha, time_shift  # noqa: F401
from released import official_config, official_state


@dataclass
class DiTConfig:
    in_channels: int = 1152  # C: latent channels (SigLIP-2 So400M width)
    num_tokens: int = 256  # N: latent tokens, a sqrt(N) x sqrt(N) grid
    hidden_size: int = 1152  # D: trunk width
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 * mlp_ratio * D): the parameters of a GELU MLP of this ratio
    qk_norm: bool = False  # RMSNorm on q and k per head (off in both papers' released configs)
    cond: str = "text"  # "text": per-token condition from the connector; "class": one embedding per sample;
    # "tokens": per-token conditions (B, N, cond_dim) computed outside (Scale-RAE's LLM queries, dit.load_scale_rae_dit)
    cond_dim: int = 0  # width of the condition c = t_emb + y that drives adaLN; 0 = hidden_size (Scale-RAE: z_channels)
    cond_silu: bool = False  # c = silu(t_emb + y) before the blocks, as RAE's DiT^DH and Scale-RAE (their adaLN then
    # applies a second SiLU); False as RAE's LightningDiT and our own models
    text_dim: int = 1152  # width of the text tower's token states
    text_len: int = 64  # T: the connector reads the first text_len text states (the tower's 64 for real prompts)
    connector_depth: int = 2  # blocks over [text tokens ; N queries]; must be >= 1 in text mode
    num_classes: int = 1000
    ddt_depth: int = 0  # wide DDT head (RAE's DiT-DH) after the trunk: number of blocks, 0 = no head
    ddt_width: int = 2048
    ddt_heads: int = 16


# Parameter counts (python dit.py) with the defaults above, i.e. the 1152-channel SigLIP-2 latent. With RAE's
# 768-channel DINOv2-B latent the DiT-* presets count 33.6M / 131.7M / 459.7M / 677.0M and DiTDH-XL 838.4M, as in the
# RAE code. RAE notes the DiT width should be at least the latent width: DiT-S / DiT-B are narrower than 1152.
PRESETS = {
    # LightningDiT sizes, class-conditional as in RAE (ImageNet)
    "DiT-S": dict(hidden_size=384, depth=12, num_heads=6, cond="class"),  # 33.8M
    "DiT-B": dict(hidden_size=768, depth=12, num_heads=12, cond="class"),  # 132.3M
    "DiT-L": dict(hidden_size=1024, depth=24, num_heads=16, cond="class"),  # 460.4M
    "DiT-XL": dict(hidden_size=1152, depth=28, num_heads=16, cond="class"),  # 677.8M
    # RAE's DiT^DH-XL: the DiT-XL trunk + 2 blocks of width 2048 (840.4M)
    "DiTDH-XL": dict(hidden_size=1152, depth=28, num_heads=16, cond="class", ddt_depth=2, ddt_width=2048, ddt_heads=16),
    # Scale-RAE text-to-image DiTs. 2.4B: the released model (2.435B without our text connector, 2.546B with it).
    "T2I-2.4B": dict(hidden_size=2048, depth=32, num_heads=32, cond="text"),  # 2.546B
    # "9.8B": D 3072 / 48 layers / 48 heads as listed in the repo's training docs, but that counts 8.19B, not 9.8B
    # (about 58 layers would give 9.8B); the true config is unpublished, we keep the listed one.
    "T2I-9.8B": dict(hidden_size=3072, depth=48, num_heads=48, cond="text"),  # 8.43B
    # CPU demos: in_channels / num_tokens / text_dim must match the (toy) encoder; override them from it. text_len 24:
    # toy captions have at most 17 tokens, the rest of the tower's 64 are pads. Sized for the demo's budget: about 1.4
    # GFLOPs per training sample on the 8 x 8 x 128 toy latent.
    "toy": dict(in_channels=128, num_tokens=64, hidden_size=192, depth=4, num_heads=3, cond="text", text_dim=128,
                text_len=24, connector_depth=1),  # 3.5M
}


# ----------------------------------------------------------------------------- small stateless functions
def mlp_hidden(dim, mlp_ratio):
    """SwiGLU hidden width: 2/3 of the GELU MLP's, so both have the same parameters (5461 for D = 2048)."""
    return int(2 / 3 * int(mlp_ratio * dim))


def modulate(x, shift, scale):
    """adaLN: shift and scale broadcast from (B, 1, D) or per token (B, N, D)."""
    return x * (1 + scale) + shift


def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position table (grid*grid, dim): half the channels encode the row, half the column."""
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid * grid)
    angles = [(pos // grid)[:, None] * omega, (pos % grid)[:, None] * omega]  # row, column: 2 x (N, dim/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()  # (N, dim)


def rope_2d(grid, head_dim, theta=10000.0):
    """Axial 2-D RoPE table (2, N, head_dim) = (cos, sin). Channel pairs (i, i + head_dim/2) rotate together; the first
    head_dim/4 pairs by the token's row, the rest by its column, each with frequencies theta^(-k / (head_dim/4)).
    (The official code pairs neighbours (2i, 2i + 1): the same up to a fixed permutation of the q, k channels.)"""
    freqs = theta ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))  # (hd/4,)
    pos = torch.arange(grid * grid)
    angles = torch.cat([(pos // grid)[:, None] * freqs, (pos % grid)[:, None] * freqs], dim=1)  # (N, hd/2)
    angles = torch.cat([angles, angles], dim=1)  # (N, hd): the same angle for both members of a pair
    return torch.stack([angles.cos(), angles.sin()]).float()  # (2, N, hd)


def apply_rope(x, rope):
    """Rotate q or k (B, H, N, hd) by the table (2, N, hd); as a rotation it preserves norms, and q.k then depends
    only on the offset between the two tokens' grid positions."""
    cos, sin = rope.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, H, N, hd)


def fourier_freqs(n=256):
    """Frequencies of the Gaussian Fourier time embedding. The papers draw them from N(0, 1) once, with a fixed seed;
    we take n quantiles of |N(0, 1)| instead: the same spectrum, no random state (and sin(-w t) only repeats sin(w t))."""
    return torch.special.ndtri(0.5 + 0.5 * (torch.arange(n, dtype=torch.float64) + 0.5) / n).float()  # (n,)


# ----------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 even under bf16 autocast (as the official code)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        assert dim % num_heads == 0 and (dim // num_heads) % 4 == 0, "2-D RoPE needs head_dim divisible by 4"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v: one large matmul instead of three
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)  # gate and value in one matmul
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # 2 x (B, N, hidden)
        return self.w3(F.silu(x1) * x2)


class DiTBlock(nn.Module):
    """LightningDiT block with adaLN-Zero: x += g1 * Attn(modulate(norm(x))); x += g2 * MLP(modulate(norm(x))), where
    (shift, scale, gate) x 2 come from the condition c: (B, 1, D) shared by all tokens or (B, N, D) one per token."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm, cond_dim=None):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden(dim, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (B, 1|N, D)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TransformerBlock(nn.Module):
    """Plain pre-norm block for the text connector: the condition does not depend on t, so no adaLN. No RoPE either:
    the text tower already encodes word order, and each learnable query is its own position."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden(dim, mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """RMSNorm, adaLN shift and scale (no gate), Linear back to the latent channels."""

    def __init__(self, dim, out_channels, cond_dim=None):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, 1|N, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, C)


class TimestepEmbedder(nn.Module):
    """Gaussian Fourier features of the raw t in [0, 1] (no x1000), then an MLP (both papers)."""

    def __init__(self, dim, num_freqs=256):
        super().__init__()
        self.register_buffer("freqs", torch.empty(num_freqs))  # filled by DiT.init_weights
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        angles = 2 * math.pi * t.float()[:, None] * self.freqs  # (B, F)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, D)


# Parameter-name prefixes of the text connector (text_proj, queries, connector, text_norm, text_out, text_pool): for
# counting it apart from the trunk, or giving it its own learning rate.
CONNECTOR_PREFIXES = ("text_", "queries", "connector")


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, C, N = cfg.hidden_size, cfg.in_channels, cfg.num_tokens
        Dc = cfg.cond_dim or D  # the condition's width (= D except in Scale-RAE's released DiT)
        self.grid = math.isqrt(N)
        assert self.grid**2 == N, "num_tokens must be a square grid"
        assert Dc == D or (cfg.cond == "tokens" and not cfg.ddt_depth), "cond_dim != hidden_size needs cond 'tokens'"
        # patch size 1: each latent token is one DiT token, so the "patch embedding" (a 1x1 conv) is a Linear
        self.x_embedder = nn.Linear(C, D)
        self.t_embedder = TimestepEmbedder(Dc)
        if cfg.cond == "text":
            # The connector (our stand-in for Scale-RAE's LLM + 256 queries; README, "Differences from the papers"):
            # N learnable queries attend jointly with the projected text tokens; query k's output becomes the
            # condition of latent token k.
            assert cfg.connector_depth >= 1, "without a block the queries never see the text"
            self.text_proj = nn.Linear(cfg.text_dim, D)
            self.queries = nn.Parameter(torch.empty(N, D))
            self.connector = nn.ModuleList(
                TransformerBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.connector_depth))
            # Scale-RAE reads the LLM's final-normed states through a Linear (its diff_head_projector)
            self.text_norm = RMSNorm(D)
            self.text_out = nn.Linear(D, D)
            # Frozen text states are mostly the same in every prompt: what a prompt changes is a few percent of their
            # norm, and AdamW learns a direction of its input at a rate proportional to that direction's size. So the
            # text states are standardised per channel with statistics of the training captions (set_text_stats),
            # and their standardised mean over the T positions (a pooled vector, as SD3 and Imagen add one) reaches
            # every token's condition through text_pool (NOTES.md: how the colour gap was found and closed).
            self.text_pool = nn.Linear(cfg.text_dim, D)
            for name in ("text_mean", "text_std", "pool_mean", "pool_std"):  # (text_dim,) each; saved with the model
                self.register_buffer(name, torch.empty(cfg.text_dim))
        elif cfg.cond == "class":
            self.class_embedder = nn.Embedding(cfg.num_classes, D)
        elif cfg.cond != "tokens":
            raise ValueError(f"cond must be 'text', 'class' or 'tokens', got {cfg.cond!r}")
        # One learned vector replaces a dropped condition, broadcast over tokens (Scale-RAE's dropout_embedding)
        self.null_cond = nn.Parameter(torch.empty(Dc))
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, Dc) for _ in range(cfg.depth))
        self.register_buffer("pos_embed", torch.empty(N, D))
        self.register_buffer("rope", torch.empty(2, N, D // cfg.num_heads))
        out_dim = D
        if cfg.ddt_depth:
            # RAE's DiT-DH: the trunk output, re-mixed with t, becomes the per-token condition s of a few wide blocks
            # that see x_t again through their own embedding.
            W = out_dim = cfg.ddt_width
            self.s_proj = nn.Linear(D, W)
            self.head_embedder = nn.Linear(C, W)
            self.register_buffer("head_rope", torch.empty(2, N, W // cfg.ddt_heads))
        self.head_blocks = nn.ModuleList(
            DiTBlock(out_dim, cfg.ddt_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.ddt_depth))
        self.final_layer = FinalLayer(out_dim, C, out_dim if cfg.ddt_depth else Dc)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every init decision in one place. Also fills the fixed tables (persistent buffers, so a checkpoint is
        self-contained and a model built on the meta device only needs load_state_dict(..., assign=True))."""
        cfg, D = self.cfg, self.cfg.hidden_size
        for m in self.modules():  # LightningDiT: xavier-uniform Linears, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if cfg.cond == "class":
            nn.init.normal_(self.class_embedder.weight, std=0.02)
        elif cfg.cond == "text":
            nn.init.normal_(self.queries, std=D**-0.5)  # Scale-RAE: randn(N, H) / sqrt(H)
            for buf, value in ((self.text_mean, 0), (self.text_std, 1), (self.pool_mean, 0), (self.pool_std, 1)):
                buf.fill_(value)  # the identity until set_text_stats
        nn.init.zeros_(self.null_cond)  # Scale-RAE: zero-init null condition
        # adaLN-Zero: zero gates make every block the identity, and the zero final layer makes the model output 0
        for block in [*self.blocks, *self.head_blocks]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.t_embedder.freqs.copy_(fourier_freqs(self.t_embedder.freqs.numel()))
        self.pos_embed.copy_(sincos_2d(self.grid, D))
        self.rope.copy_(rope_2d(self.grid, D // cfg.num_heads))
        if cfg.ddt_depth:
            self.head_rope.copy_(rope_2d(self.grid, cfg.ddt_width // cfg.ddt_heads))

    def embed_condition(self, cond, drop=None):
        """cond -> y: (B, 1, D) for a class, (B, N, D) for text or tokens; dropped samples get the null condition."""
        if self.cfg.cond == "class":
            y = self.class_embedder(cond)[:, None]  # (B, 1, D)
        elif self.cfg.cond == "tokens":
            y = cond  # (B, N, Dc): already one condition per latent token
        else:
            cond = cond[:, : self.cfg.text_len]  # (B, T, Dt): a tower padding to more positions adds only pads
            cond = (cond - self.text_mean) / self.text_std  # per channel ~N(0, 1) over training captions
            pooled = (cond.mean(1) - self.pool_mean) / self.pool_std  # (B, Dt), likewise
            queries = self.queries.expand(cond.shape[0], -1, -1)  # (B, N, D)
            h = torch.cat([self.text_proj(cond), queries], dim=1)  # (B, T + N, D)
            for block in self.connector:
                h = block(h)
            y = self.text_out(self.text_norm(h[:, -self.cfg.num_tokens:]))  # (B, N, D): the query states
            y = y + self.text_pool(pooled)[:, None]  # the pooled vector, the same for every token
        if drop is not None:
            # after the connector, as Scale-RAE drops after its LLM: the null is one vector for every token
            y = torch.where(drop[:, None, None], self.null_cond, y)
        return y

    @torch.no_grad()
    def set_text_stats(self, states, all_reduce=None):
        """Fix the text standardisation from training captions; call once before training (train_dit.py does), and
        the statistics travel in state_dict(). states: (K, T, text_dim) text states of this process's K captions.
        all_reduce: sums a tensor over processes in place (torch.distributed.all_reduce), so every rank gets the
        statistics of all their captions together."""
        def mean_std(x):  # (M, Dt) -> per-channel mean and std over the M rows of every process
            m = torch.stack([torch.full_like(x[0], len(x)), x.sum(0), (x * x).sum(0)])  # (3, Dt): n, sum, squares
            if all_reduce is not None:
                all_reduce(m)
            n, total, squares = m
            mean = total / n
            var = (squares / n - mean**2).clamp_min(0) * n / (n - 1).clamp_min(1)
            # floor 1e-3: a channel that no caption moves (or one caption) is not blown up at sampling time
            return mean, var.sqrt().clamp_min(1e-3)

        states = states[:, : self.cfg.text_len].to(self.text_mean.device, torch.float64)  # fp64: squares of ~1e6 values
        text_mean, text_std = mean_std(states.flatten(0, 1))
        pool_mean, pool_std = mean_std(((states - text_mean) / text_std).mean(1))
        for buf, value in ((self.text_mean, text_mean), (self.text_std, text_std), (self.pool_mean, pool_mean),
                           (self.pool_std, pool_std)):
            buf.copy_(value)

    def forward(self, x, t, cond, drop=None):
        """x (B, N, C) noisy latents, t (B,) in [0, 1], cond: text states (B, T, text_dim) or class ids (B,),
        drop (B,) bool or None -> velocity v (B, N, C)."""
        t_emb = self.t_embedder(t)[:, None]  # (B, 1, D)
        c = t_emb + self.embed_condition(cond, drop)  # (B, 1|N, Dc): c_k = t_emb + y_k
        if self.cfg.cond_silu:
            c = F.silu(c)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            h = block(h, c, self.rope)
        if self.cfg.ddt_depth:
            c = self.s_proj(F.silu(t_emb + h))  # (B, N, W): per-token condition of the head
            h = self.head_embedder(x)  # (B, N, W): no absolute positions in the head (as RAE); RoPE only
            for block in self.head_blocks:
                h = block(h, c, self.head_rope)
        return self.final_layer(h, c)  # (B, N, C)


# ----------------------------------------------------------------------------- analytic FLOPs
def flops(cfg, training=True):
    """Analytic FLOPs per sample: every matmul (2 * tokens * fan_in * fan_out) plus attention (QK^T and AV:
    4 * tokens^2 * width per layer); norms and other elementwise ops are not counted. Training = 3 x forward."""
    D, N, C, T = cfg.hidden_size, cfg.num_tokens, cfg.in_channels, cfg.text_len
    n_cond = 1 if cfg.cond == "class" else N  # tokens that carry their own condition (and adaLN matmul)

    def block(n, d, n_mod):  # one block over n tokens of width d, with adaLN on n_mod condition vectors
        return 2 * n * (4 * d * d + 3 * d * mlp_hidden(d, cfg.mlp_ratio)) + 4 * n * n * d + 2 * n_mod * 6 * d * d

    f = 2 * N * C * D + 2 * (512 * D + D * D)  # x_embedder, t_embedder (256 Fourier frequencies -> 512 features)
    if cfg.cond == "text":
        f += 2 * T * cfg.text_dim * D + cfg.connector_depth * block(T + N, D, 0) + 2 * N * D * D + 2 * cfg.text_dim * D
    f += cfg.depth * block(N, D, n_cond)
    d_out = D
    if cfg.ddt_depth:
        d_out, n_cond = cfg.ddt_width, N
        f += 2 * N * D * d_out + 2 * N * C * d_out + cfg.ddt_depth * block(N, d_out, N)
    f += 2 * n_cond * 2 * d_out * d_out + 2 * N * d_out * C  # final adaLN and linear
    return 3 * f if training else f


# ----------------------------------------------------------------------------- loading an export
def load_dit(path, device=None):
    """A train_dit.py export (dit.safetensors, or the run folder that holds it: EMA weights, with the DiTConfig, the
    time shift and the latent's description in the metadata) -> (DiT in eval mode, metadata dict)."""
    if os.path.isdir(path):
        path = os.path.join(path, "dit.safetensors")
    meta = ckpt.read_metadata(path)
    cfg = ckpt.config_from_metadata(path, meta, "dit_config", DiTConfig)
    try:
        alpha = float(meta.get("alpha", ""))
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{path}: metadata 'alpha' is {meta.get('alpha')!r}, expected a positive number (the time shift)")
    if meta.get("latent", "rae") not in ("rae", "vae"):
        raise ValueError(f"{path}: metadata 'latent' is {meta['latent']!r}, expected 'rae' or 'vae'")
    with torch.device("meta"):
        try:
            model = DiT(cfg)
        except (AssertionError, ValueError) as e:  # what the blocks need: a square grid, head sizes that divide
            raise ValueError(f"{path}: metadata 'dit_config': {e}") from None
    ckpt.load_checked(model, ckpt.read_safetensors(path), path)
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- the released checkpoints of both papers
def load_official(state, kind, path, num_heads=None, device=None, dtype=torch.float32, head_depth=None):
    """Build (on the meta device) and load a DiT from an official state dict; `path` names it in errors."""
    try:
        cfg = DiTConfig(**official_config(state, kind, num_heads, head_depth))
        ours = official_state(state, cfg, kind)
    except KeyError as e:
        raise ValueError(f"{path}: not an official {kind} DiT: no key {e}") from None
    with torch.device("meta"):
        model = DiT(cfg)
    ckpt.load_checked(model, {k: v.to(dtype) for k, v in ours.items()}, path)
    return model.to(device).eval()


def load_rae_dit(path, device=None, dtype=torch.float32, head_depth=None):
    """RAE's released stage2_model.pt (DiT^DH or LightningDiT, any size; a plain state dict or {"ema": ...}) -> DiT.
    model(x (B, N, C), t (B,), y (B,) long, drop (B,) bool) = the official model(x as (B, C, h, w), t,
    where(drop, num_classes, y)), tokens in raster order."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("ema", state.get("model", state))  # a training checkpoint: its EMA weights
    return load_official(state, "rae", path, device=device, dtype=dtype, head_depth=head_depth)


def load_scale_rae_dit(state, num_heads=None, device=None, dtype=torch.float32, path="Scale-RAE DiT"):
    """Scale-RAE's released DiT (its snapshot's diff_head.model.* tensors; the prefix may stay) -> DiT with cond
    "tokens": model(x (B, 256, C), t (B,), y (B, 256, Dy), drop (B,) bool) = the official LightningDiT
    forward(x as (B, C, 16, 16), t, where(drop, dropout_embedding, y))."""
    prefix = "diff_head.model."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    return load_official(state, "scale-rae", path, num_heads, device, dtype)


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":
    print(f"{'preset':10s} {'params':>10s} {'connector':>10s} {'train GFLOPs/sample':>20s}")
    for name, preset in PRESETS.items():
        cfg = DiTConfig(**preset)
        with torch.device("meta"):  # shapes only, no memory
            model = DiT(cfg)
        n = sum(p.numel() for p in model.parameters())
        n_conn = sum(p.numel() for k, p in model.named_parameters() if k.startswith(CONNECTOR_PREFIXES))
        print(f"{name:10s} {n / 1e6:9.1f}M {n_conn / 1e6:9.1f}M {flops(cfg) / 1e9:20.1f}")
    torch.manual_seed(0)
    cfg = DiTConfig(**PRESETS["toy"])
    model = DiT(cfg)
    z = torch.randn(2, cfg.num_tokens, cfg.in_channels)
    text = torch.randn(2, cfg.text_len, cfg.text_dim)
    loss, _, _ = flow_loss(model, z, text, shift_alpha(cfg.num_tokens, cfg.in_channels))
    loss.backward()
    out = sample(model, torch.randn_like(z), text, alpha=2.0, steps=4, method="heun", guidance=2.0)
    print(f"toy: loss {loss.item():.3f} (about 2 at init: the model outputs 0 and E|eps - z|^2 = 2), "
          f"sample {tuple(out.shape)}")
