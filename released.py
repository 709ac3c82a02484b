"""The released DiTs of RAE (arXiv 2510.11690: DiT^DH and LightningDiT, stage2_model.pt) and Scale-RAE (arXiv 2601.16208:
the diff_head of its text-to-image snapshot) in the names and layouts of dit.py's DiT, both ways.

Their DiTs compute what ours computes, with other names and three layout choices: a 1x1 conv for the patch embedding,
the null class as row num_classes of the label table, and RoPE rotating neighbouring channels (2i, 2i + 1) where
ours rotates (i, i + hd/2). The first two are reshapes; the last is a fixed permutation of each head's q and k
channels (q.k is unchanged when both are permuted alike, and v is untouched). Every fixed table (positions, RoPE,
time frequencies) is taken from the file, never regenerated, except Scale-RAE's time frequencies, which it does
not store. The conversion goes both ways (official_state), so a test can round-trip every key and shape.
A config here is the dict of DiTConfig fields; dit.load_rae_dit and dit.load_scale_rae_dit build the model from it.
Read from the official code: bytetriper/RAE a4d18c4 (src/stage2/models/DDT.py, lightningDiT.py, model_utils.py) and
ZitengWangNYU/Scale-RAE dab3800 (scale_rae/model/diffusion_loss/models/). The parity tests compare our models, loaded
through these maps, with outputs of the official modules (fixtures/, written by make_fixtures.py).

    python -m pytest -q test_dit.py -k official
"""
import torch


def rope_order(head_dim):
    """Our q/k channel j is their channel order[j]: our pair (j, j + hd/2) is their pair (2j, 2j + 1)."""
    half = torch.arange(head_dim // 2)
    return torch.cat([2 * half, 2 * half + 1])  # (hd,)


def permute_qk(w, heads, order):
    """Reorder the q and k rows of a fused qkv weight (3D, D) or bias (3D,) within each head; v rows stay."""
    w3 = w.reshape(3, heads, -1, *w.shape[1:])  # (3, H, hd, ...)
    return torch.cat([w3[:2, :, order], w3[2:]]).reshape(w.shape)


def official_names(cfg, kind):
    """(our name, their name) of every Linear and norm of a DiT with cfg, for kind "rae" (RAE's DiT^DH or LightningDiT)
    or "scale-rae" (Scale-RAE's LightningDiT with per-token conditions); the rest is converted in official_state."""
    ddt = cfg.ddt_depth > 0
    names = [("x_embedder", "s_embedder.proj" if ddt else "x_embedder.proj"), ("t_embedder.mlp.0",) * 2,
             ("t_embedder.mlp.2",) * 2, ("final_layer.norm", "final_layer.norm_final"),
             ("final_layer.linear",) * 2, ("final_layer.adaLN_modulation.1",) * 2]
    if ddt:
        names += [("head_embedder", "x_embedder.proj"), ("s_proj", "s_projector")]
    blocks = "dit_blocks" if kind == "scale-rae" else "blocks"
    ours = [f"blocks.{i}" for i in range(cfg.depth)] + [f"head_blocks.{i}" for i in range(cfg.ddt_depth)]
    parts = ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.w12", "mlp.w3", "adaLN_modulation.1")
    return names + [(f"{o}.{p}", f"{blocks}.{i}.{p}") for i, o in enumerate(ours) for p in parts]


def official_config(state, kind, num_heads=None, head_depth=None):
    """The DiTConfig fields (a dict) of an official state dict, from its shapes. Heads are not in any weight shape: they come from
    the RoPE table's width (the head size), or from num_heads (a Scale-RAE snapshot's config.json) without one. A DiT^DH
    whose trunk is as wide as its head needs head_depth: its blocks are then all alike."""
    ddt = "s_embedder.proj.weight" in state
    D, C = state["s_embedder.proj.weight" if ddt else "x_embedder.proj.weight"].shape[:2]  # (D, C, 1, 1)
    blocks = "dit_blocks." if kind == "scale-rae" else "blocks."
    n = len({k.split(".")[1] for k in state if k.startswith(blocks)})
    widths = [state[f"{blocks}{i}.norm1.weight"].numel() for i in range(n)]
    table = state.get("enc_feat_rope.freqs_cos" if ddt else "feat_rope.freqs_cos")  # (N, head_dim)
    heads = D // table.shape[1] if table is not None else num_heads
    if heads is None:
        raise ValueError("no RoPE table to read the number of heads from: pass num_heads")
    Dc = state["t_embedder.mlp.0.weight"].shape[0]  # the condition's width (Scale-RAE's z_channels)
    depth = sum(w == D for w in widths) if ddt else n  # the trunk's blocks have its width, the head's are wider
    if ddt and depth == n:
        if head_depth is None:
            raise ValueError(f"trunk and head are both {D} wide: pass the number of head blocks (head_depth)")
        depth = n - head_depth
    w12 = state[f"{blocks}0.mlp.w12.weight"].shape[0] // 2  # SwiGLU hidden = int(2/3 * int(r * D))
    ratio = next((r for r in (4.0, 2.0, 3.0, 6.0, 8.0) if int(2 / 3 * int(r * D)) == w12), w12 * 1.5 / D)
    cfg = dict(in_channels=C, num_tokens=state["pos_embed"].shape[1], hidden_size=D, depth=depth, num_heads=heads,
               mlp_ratio=ratio, cond="tokens" if kind == "scale-rae" else "class", cond_dim=Dc if Dc != D else 0,
               cond_silu=ddt or kind == "scale-rae", connector_depth=0)
    if ddt:
        W = state["x_embedder.proj.weight"].shape[0]
        cfg.update(ddt_depth=n - depth, ddt_width=W, ddt_heads=W // state["dec_feat_rope.freqs_cos"].shape[1])
    if kind == "rae":
        cfg["num_classes"] = state["y_embedder.embedding_table.weight"].shape[0] - 1  # the last row: the null class
    return cfg


def scale_rae_freqs(n=256):
    """Scale-RAE's time-embedding frequencies: not in its files, drawn at construction from a fixed seed."""
    return torch.normal(0.0, 1.0, (n,), generator=torch.Generator().manual_seed(114514)).float()


def official_state(state, cfg, kind, to_ours=True):
    """Convert a state dict from the official names and layouts to ours (to_ours=False: ours to theirs)."""
    pairs = [(o, t) if to_ours else (t, o) for o, t in official_names(cfg, kind)]  # (destination, source)
    out = {f"{d}.{p}": state[f"{s}.{p}"] for d, s in pairs for p in ("weight", "bias") if f"{s}.{p}" in state}
    C, ddt = cfg.in_channels, cfg.ddt_depth > 0
    # 1x1 convs (D, C, 1, 1) <-> Linears (D, C)
    for o, t in [("x_embedder", "s_embedder" if ddt else "x_embedder")] + [("head_embedder", "x_embedder")] * ddt:
        if to_ours:
            out[f"{o}.weight"] = out[f"{o}.weight"].flatten(1)
        else:
            out[f"{t}.proj.weight"] = out[f"{t}.proj.weight"][:, :, None, None]
    if to_ours:
        if ddt and "s_projector.weight" not in state:  # a trunk as wide as the head: nn.Identity in the official code
            out["s_proj.weight"], out["s_proj.bias"] = torch.eye(cfg.ddt_width), torch.zeros(cfg.ddt_width)
        for p in ("weight", "bias"):  # learn-sigma files predict 2C channels: the velocity is the first C
            out[f"final_layer.linear.{p}"] = out[f"final_layer.linear.{p}"][:C]
    # RoPE: every block's q, k rows and the tables' columns in the other channel order
    ropes = [("blocks.", "rope", "enc_feat_rope" if ddt else "feat_rope", cfg.num_heads, cfg.hidden_size)]
    ropes += [("head_blocks.", "head_rope", "dec_feat_rope", cfg.ddt_heads, cfg.ddt_width)] * ddt
    for prefix, ours, theirs, heads, width in ropes:
        order = rope_order(width // heads) if to_ours else torch.argsort(rope_order(width // heads))
        if to_ours and f"{theirs}.freqs_cos" in state:
            out[ours] = torch.stack([state[f"{theirs}.freqs_{f}"][:, order] for f in ("cos", "sin")])  # (2, N, hd)
        elif not to_ours:
            out[f"{theirs}.freqs_cos"], out[f"{theirs}.freqs_sin"] = state[ours][:, :, order]  # (N, hd) each
        for o, t in official_names(cfg, kind):
            if o.startswith(prefix) and o.endswith("attn.qkv"):
                for p in ("weight", "bias"):
                    d = f"{o}.{p}" if to_ours else f"{t}.{p}"
                    out[d] = permute_qk(out[d], heads, order)
    # positions, time frequencies, the label table and the null condition
    if to_ours:
        out["pos_embed"] = state["pos_embed"][0]  # (N, D)
        out["t_embedder.freqs"] = scale_rae_freqs() if kind == "scale-rae" else state["t_embedder.W"]
        if kind == "rae":
            table = state["y_embedder.embedding_table.weight"]  # (num_classes + 1, D)
            out["class_embedder.weight"], out["null_cond"] = table[:-1], table[-1]
        else:
            out["null_cond"] = state["y_embedder.dropout_embedding"]
        return out
    out["pos_embed"] = state["pos_embed"][None]  # (1, N, D)
    if kind == "rae":
        out["t_embedder.W"] = state["t_embedder.freqs"]
        out["y_embedder.embedding_table.weight"] = torch.cat([state["class_embedder.weight"], state["null_cond"][None]])
    else:
        out["y_embedder.dropout_embedding"] = state["null_cond"]
    return out


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":  # a tiny DiT^DH to the official layout and back: the same tensors
    import dit
    cfg = dit.DiTConfig(in_channels=8, num_tokens=16, hidden_size=32, depth=2, num_heads=4, cond="class", num_classes=10,
                        ddt_depth=1, ddt_width=64, ddt_heads=4, cond_silu=True, connector_depth=0)
    ours = dit.DiT(cfg).state_dict()
    theirs = official_state(ours, cfg, "rae", to_ours=False)
    back = official_state(theirs, cfg, "rae")
    print(f"{len(theirs)} official tensors, config read back equal: {dit.DiTConfig(**official_config(theirs, 'rae')) == cfg}"
          f", round trip exact: {all(torch.equal(ours[k], back[k]) for k in ours)}")
