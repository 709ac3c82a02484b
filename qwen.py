"""Qwen2.5, the decoder-only LLM of Scale-RAE, in plain PyTorch, and Scale-RAE's text-to-image conditioning path.

Qwen2 (arXiv 2407.10671; Qwen2.5: arXiv 2412.15115): pre-norm transformer with RMSNorm, grouped-query attention with
q/k/v biases, rotary positions (the "rotate half" form over non-interleaved halves), a SwiGLU MLP; the output head may
be tied to the token embedding. Weights and key names are exactly Hugging Face's (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, ..., `lm_head.weight`), read from a snapshot folder (config.json and
model.safetensors, or shards listed by model.safetensors.index.json). `model(ids)` = HF `Qwen2ForCausalLM(ids).logits`
(float32), `model.hidden(ids)` = its final-norm states. A KVCache makes greedy decoding incremental.
Scale-RAE (arXiv 2601.16208, `nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B`): the LLM answers a ChatML prompt greedily until
it emits `<im_start>`; then 256 learned queries are appended, and their final-norm states, through a Linear, are the
per-token conditions (1, 256, Dy) of the DiT (dit.py). `conditions` runs that path with the cache.
`qwen.Tokenizer(path)` is Qwen2's byte-level BPE (tokenizer.py's Qwen2Tokenizer), from tokenizer.json or the slow
vocab.json + merges.txt that Scale-RAE's snapshot ships. Imports only torch, safetensors and this project's ckpt.py and
tokenizer.py.

    python qwen.py                       # parameter counts of the 1.5B / 7B configs, then a tiny smoke test
    python -m pytest -q test_qwen.py     # parity with transformers' Qwen2ForCausalLM (CPU, seconds)
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import ckpt
from tokenizer import Qwen2Tokenizer as Tokenizer  # noqa: F401  (the public name qwen.Tokenizer)


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536  # D
    intermediate_size: int = 8960  # SwiGLU hidden width
    num_hidden_layers: int = 28
    num_attention_heads: int = 12  # H query heads, head_dim = D / H
    num_key_value_heads: int = 2  # grouped-query attention: each k/v head serves H / KV query heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True  # the output head is the embedding matrix (no lm_head.weight of its own)
    max_position_embeddings: int = 32768  # the trained context; positions beyond it are not refused, as in HF


# The Qwen2.5 Instruct configs (HF config.json). Scale-RAE's 1.5B has vocab_size 151667: the tokenizer's 151665 tokens
# plus its added <im_start>, <im_end> (the embedding was resized to len(tokenizer)).
PRESETS = {
    "1.5B": dict(),  # 1,543,714,304 params (tied head counted once)
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, tie_word_embeddings=False),  # 7,615,616,512 params
    "Scale-RAE-1.5B": dict(vocab_size=151667),  # 1,543,301,120 params
}
# Scale-RAE config.json fields that select the path implemented here, and the values it supports (the 7B and WebSSL
# releases differ in some of them).
SCALE_RAE_FIELDS = {"vision_loss": "diffusion-loss", "vision_loss_mode": "query", "diffusion_split_per_token": 256,
                    "diffusion_model_channels": 1152}
SYSTEM = "You are a helpful assistant."  # the system turn of Scale-RAE's "qwen_2" conversation template


# ----------------------------------------------------------------------------- small stateless functions
def rope(cfg, start, length, device=None):
    """Rotary table (2, T, head_dim) = (cos, sin) for positions start .. start + length - 1. Channel i pairs with
    i + head_dim/2, both rotated by the angle pos * theta^(-2i / head_dim). Computed in float32, as HF does."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)  # (hd/2,)
    pos = torch.arange(start, start + length, device=device).float()
    angles = pos[:, None] * inv_freq  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd): the same angle for both members of a pair
    return torch.stack([angles.cos(), angles.sin()])  # (2, T, hd)


def apply_rope(x, table):
    """Rotate q or k (B, heads, T, hd) by the table (2, T, hd) ("rotate half": (x1, x2) -> (-x2, x1))."""
    cos, sin = table.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, heads, T, hd)


def chat_prompt(prompt):
    """Scale-RAE's inference text for a user prompt: ChatML with its system turn, ending where the assistant speaks."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 whatever the dtype; the weight multiplies after the cast back (HF's order, so bf16 agrees)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention; q, k, v have biases, the output projection has none."""

    def __init__(self, cfg):
        super().__init__()
        D, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.heads, self.kv_heads, self.head_dim = H, KV, D // H
        self.q_proj = nn.Linear(D, H * self.head_dim)
        self.k_proj = nn.Linear(D, KV * self.head_dim)
        self.v_proj = nn.Linear(D, KV * self.head_dim)
        self.o_proj = nn.Linear(H * self.head_dim, D, bias=False)

    def forward(self, x, table, mask, past=None):
        """x (B, T, D); past: the (k, v) of earlier tokens or None. Returns the output and this layer's (k, v)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, table), apply_rope(k, table)  # k is cached rotated: its position never changes
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, KV, S, hd), S = past + T
        # enable_gqa: query head h reads k/v head h // (H / KV), as HF's repeat_kv, without copying k and v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k, v)  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    """Pre-norm: x += Attn(norm(x)); x += MLP(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, table, mask, past=None):
        a, kv = self.self_attn(self.input_layernorm(x), table, mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class KVCache:
    """The rotated keys and the values of every layer for the tokens seen so far; `pos` is how many there are (the
    position of the next token). Start a new one per sequence; batch rows advance together (no padding)."""

    def __init__(self):
        self.layers, self.pos = {}, 0


class QwenBody(nn.Module):
    """HF's `Qwen2Model` (the `model.` prefix of the keys): embedding, layers, final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen(nn.Module):
    """HF's `Qwen2ForCausalLM`: `model(ids)` -> logits (B, T, V) float32; `model.hidden(ids)` -> final-norm states."""

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        assert cfg.hidden_size % cfg.num_attention_heads == 0, "hidden_size must be a multiple of the heads"
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0, "query heads must be a multiple of k/v heads"
        self.cfg = cfg
        self.model = QwenBody(cfg)
        # tied: no module of its own, so the state dict has no lm_head.weight, as the released files
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def init_weights(self, std=0.02):
        """HF's init (initializer_range 0.02): normal weights and embedding, zero biases, unit norms. Only for
        models built from scratch; a loaded model overwrites all of it."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        return self

    def hidden(self, ids=None, cache=None, inputs_embeds=None):
        """Final-norm states (B, T, D) of token ids (B, T) or of their embeddings (B, T, D). With a KVCache the
        tokens continue the cached sequence (positions cache.pos ...), and the cache grows by them."""
        x = self.model.embed_tokens(ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        T, start = x.shape[1], cache.pos if cache is not None else 0
        table = rope(self.cfg, start, T, x.device)  # (2, T, hd)
        # causal over the whole sequence: the query at position start + i sees keys 0 .. start + i
        # (a single new token sees everything: no mask)
        mask = None if T == 1 else (torch.arange(start + T, device=x.device) <= torch.arange(
            start, start + T, device=x.device)[:, None])  # (T, S) bool
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, table, mask, cache.layers.get(i) if cache is not None else None)
            if cache is not None:
                cache.layers[i] = kv
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def logits(self, h):
        """Final-norm states (..., D) -> logits (..., V) in float32 (HF casts them too)."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w).float()

    def forward(self, ids=None, cache=None, inputs_embeds=None):
        return self.logits(self.hidden(ids, cache, inputs_embeds))


class ScaleRAEText(Qwen):
    """Scale-RAE's LLM side for text-to-image: the LLM plus its 256 latent queries and the projector to the DiT's
    condition width. Key names as in the release: `model.latent_queries`, `diff_head_projector.{weight,bias}`."""

    def __init__(self, cfg: QwenConfig, num_queries=256, cond_dim=2048):
        super().__init__(cfg)
        # on the body, where ScaleRAEQwenModel keeps it: the key is model.latent_queries
        self.model.latent_queries = nn.Parameter(torch.zeros(num_queries, cfg.hidden_size))
        self.diff_head_projector = nn.Linear(cfg.hidden_size, cond_dim)


# ----------------------------------------------------------------------------- Scale-RAE conditioning (C5)
@torch.no_grad()
def conditions(text_model, tokenizer, prompt, max_new_tokens=512, progress=None):
    """The DiT conditions of a prompt, as Scale-RAE's greedy_decode makes them -> (conditions (1, N, Dy), answer).

    The LLM reads the ChatML prompt and answers greedily (argmax, batch 1) until it emits <im_start>; answer is the
    text before it (e.g. "Here you go:\n"). Then the embedding of <im_start> and the N latent queries follow; the
    final-norm states at the N query positions, through diff_head_projector, are the conditions. The official loop
    recomputes the whole sequence at every step; the KV cache gives the same states. An answer that ends with
    <|im_end|> (no image) or runs past max_new_tokens raises one line quoting the answer.
    tokenizer: .encode(text) -> ids (special tokens in the text recognised, no BOS), .token_to_id(str), .decode(ids).
    progress: called with the answer's token ids after each new token (to show the text as it grows), or None."""
    im_start, im_end = tokenizer.token_to_id("<im_start>"), tokenizer.token_to_id("<|im_end|>")
    if im_start is None or im_end is None:
        raise ValueError("the tokenizer has no '<im_start>' or '<|im_end|>' token: not Scale-RAE's tokenizer")
    device = text_model.model.embed_tokens.weight.device
    cache, answer = KVCache(), []
    h = text_model.hidden(torch.tensor([tokenizer.encode(chat_prompt(prompt))], device=device), cache)  # (1, T, D)
    for _ in range(max_new_tokens):
        token = text_model.logits(h[:, -1]).argmax(-1).item()  # the first maximum on a tie, as torch.argmax in HF
        if token == im_start:
            break
        if token == im_end:
            raise ValueError(f"the model answered without an image (<|im_end|> before <im_start>): "
                             f"{tokenizer.decode(answer)!r}")
        answer.append(token)
        if progress is not None:
            progress(answer)
        h = text_model.hidden(torch.tensor([[token]], device=device), cache)  # (1, 1, D)
    else:
        raise ValueError(f"no <im_start> within max_new_tokens={max_new_tokens}: the answer so far is "
                         f"{tokenizer.decode(answer)!r}")
    start = text_model.model.embed_tokens(torch.tensor([[im_start]], device=device))  # (1, 1, D)
    queries = text_model.model.latent_queries[None].to(start.dtype)  # (1, N, D)
    h = text_model.hidden(inputs_embeds=torch.cat([start, queries], dim=1), cache=cache)  # (1, 1 + N, D)
    return text_model.diff_head_projector(h[:, 1:]), tokenizer.decode(answer)  # (1, N, Dy)


# ----------------------------------------------------------------------------- loading a snapshot
def read_config(path):
    """A snapshot folder's config.json (model_type "qwen2" or Scale-RAE's "cambrian_qwen") -> (QwenConfig, the raw
    dict). Defaults are HF Qwen2Config's; what this file does not implement is refused, every bad field named."""
    where = os.path.join(path, "config.json")
    raw = ckpt.read_json(where, "a HF snapshot folder")
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not a config (a JSON {type(raw).__name__})")
    problems = []
    if raw.get("model_type") not in ("qwen2", "cambrian_qwen"):
        problems.append(f"model_type {raw.get('model_type')!r}, expected 'qwen2' or 'cambrian_qwen'")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(raw.get(name), int):
            problems.append(f"field '{name}' is {raw.get(name)!r}, expected an int")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window true is not supported (Qwen2.5 leaves it off)")
    # transformers 4 writes rope_theta and rope_scaling; transformers 5 writes rope_parameters
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or ({} if params.get("rope_type", "default") == "default" else params)
    if scaling and raw.get("model_type") != "cambrian_qwen":  # Scale-RAE's constructor sets rope_scaling = None
        problems.append(f"rope scaling {scaling!r} is not supported (only the default RoPE)")
    heads = raw.get("num_attention_heads")
    if isinstance(heads, int) and "head_dim" in raw and raw["head_dim"] != raw.get("hidden_size", 0) // heads:
        problems.append(f"head_dim {raw['head_dim']} is not hidden_size / num_attention_heads")
    ckpt.report(where, problems)
    cfg = QwenConfig(
        **{k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads")},
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(raw.get("rope_theta", params.get("rope_theta", 1e4))),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        max_position_embeddings=raw.get("max_position_embeddings", 32768))
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{where}: hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_attention_heads} and "
                         f"num_key_value_heads {cfg.num_key_value_heads} do not divide")
    return cfg, raw


def read_weights(path, keep=None):
    """Tensors of a snapshot folder whose key passes `keep`, from model.safetensors or from every shard that
    model.safetensors.index.json lists; else the same in PyTorch's format (pytorch_model.bin [+ .index.json], read
    weights-only), which a snapshot may hold instead -> (dict, the file that errors should name)."""
    def read_bin(file, keep):  # mmap: tensors are paged in as they are used, not all read up front
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return {k: t for k, t in state.items() if keep is None or keep(k)}

    kinds = [("model.safetensors", ckpt.read_safetensors), ("pytorch_model.bin", read_bin)]
    for name, read in kinds:
        single, index = os.path.join(path, name), os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            weight_map = ckpt.read_json(index, "a shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: not a shard index (no 'weight_map' object)")
            files = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
            return {k: t for f in files for k, t in read(os.path.join(path, f), keep).items()}, index
        if os.path.isfile(single):
            return read(single, keep), single
    single = os.path.join(path, "model.safetensors")
    return ckpt.read_safetensors(single, keep), single  # neither kind: this read names the missing file


def load_weights(model, path, ignore=(), device=None, dtype=None):
    """Fill `model` (built on the meta device) from the snapshot's files, in HF key names. Keys starting with a
    prefix in `ignore` are skipped; every other missing, unexpected or mis-shaped key is named in one error."""
    state, where = read_weights(path, keep=lambda k: not k.startswith(tuple(ignore)))
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some exports store the tied head anyway; HF re-ties it to the embedding
    state = {k: t for k, t in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old exports' RoPE buffer
    ckpt.report(where, ckpt.state_problems(state, model.state_dict()), " (config.json sets the expected shapes)")
    dtype = dtype or torch.float32  # the official model runs in fp32 whatever the file's dtype (torch_dtype=None)
    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def load(path, device=None, dtype=None):
    """A HF snapshot folder of a Qwen2 / Qwen2.5 model (or a Scale-RAE snapshot: its extra keys are skipped) -> Qwen
    (eval, frozen), float32 unless `dtype`."""
    cfg, _ = read_config(path)
    with torch.device("meta"):  # no memory until the weights arrive
        model = Qwen(cfg)
    return load_weights(model, path, ("model.mm_projector.", "model.latent_queries", "diff_head"), device, dtype)


def read_scale_rae_config(path):
    """A Scale-RAE snapshot's config.json -> (QwenConfig, number of latent queries, condition width Dy). The fields
    that choose the conditioning path must have the values this file implements (SCALE_RAE_FIELDS)."""
    cfg, raw = read_config(path)
    where = os.path.join(path, "config.json")
    problems = [] if raw.get("model_type") == "cambrian_qwen" else [
        f"model_type {raw.get('model_type')!r}, expected 'cambrian_qwen' (a Scale-RAE snapshot)"]
    problems += [f"field '{k}' is {raw.get(k, 'missing')!r}, this path supports {v!r}"
                 for k, v in SCALE_RAE_FIELDS.items() if raw.get(k) != v]
    # the projector maps the LLM width to the DiT condition width z (diffusion_model_z_channels, equal to the DiT
    # width diffusion_model_hidden_size in both releases; z defaults to it)
    z = raw.get("diffusion_model_z_channels", raw.get("diffusion_model_hidden_size"))
    if not isinstance(z, int):
        problems.append(f"field 'diffusion_model_hidden_size' is {raw.get('diffusion_model_hidden_size', 'missing')!r}"
                        ", expected an int (the DiT width)")
    ckpt.report(where, problems)
    return cfg, raw["diffusion_split_per_token"], z


def load_scale_rae(path, device=None, dtype=None):
    """A Scale-RAE snapshot (`nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B`) -> ScaleRAEText (eval, frozen): the LLM, the
    latent queries and diff_head_projector. The understanding projector (model.mm_projector.*) is skipped, and so is
    the DiT (diff_head.model.*: read_dit_state gives it to dit.py)."""
    cfg, num_queries, cond_dim = read_scale_rae_config(path)
    with torch.device("meta"):
        model = ScaleRAEText(cfg, num_queries, cond_dim)
    return load_weights(model, path, ("model.mm_projector.", "diff_head."), device, dtype)


def read_dit_state(path):
    """The DiT of a Scale-RAE snapshot: its `diff_head.model.*` tensors with that prefix removed (as stored)."""
    prefix = "diff_head.model."
    state, where = read_weights(path, keep=lambda k: k.startswith(prefix))
    if not state:
        raise ValueError(f"{where}: no '{prefix}*' keys (not a Scale-RAE snapshot)")
    return {k[len(prefix):]: t for k, t in state.items()}


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":
    for name, preset in PRESETS.items():
        with torch.device("meta"):  # shapes only, no memory
            n = sum(p.numel() for p in Qwen(QwenConfig(**preset)).parameters())
        print(f"{name:15s} {n:>14,d} params")
    torch.manual_seed(0)
    cfg = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    model = Qwen(cfg).init_weights(std=0.2).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        steps = [model(ids[:, :8], cache)] + [model(ids[:, t:t + 1], cache) for t in range(8, 12)]
    err = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"tiny: logits {tuple(full.shape)}, cached decoding vs full forward: max |diff| {err:.2e}")
