"""Tests for qwen.py against transformers' Qwen2ForCausalLM on tiny random weights written in the released layout
(config.json + model.safetensors, or shards + model.safetensors.index.json): logits and final-norm states, cached
decoding, the one-line reports of bad files, and Scale-RAE's conditioning path (greedy answer, <im_start>, 256 latent
queries, projector) against a cache-free reference written here from the official loop (Scale-RAE's greedy_decode).

`write_tiny_scale_rae(folder)` writes a whole tiny Scale-RAE snapshot (LLM, mm_projector, latent queries, projector,
the DiT's diff_head.model.* keys, tokenizer.json) for other tests to reuse.

    python -m pytest -q test_qwen.py
"""
import json
import os

import pytest
import torch

import ckpt
import qwen
import tokenizer
from conftest import one_line_naming, run

# a tiny Qwen2: GQA with 4 query heads over 2 k/v heads (head_dim 8), theta 1e4 so that short sequences rotate
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=128)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<im_start>", "<im_end>"]
DIT = dict(hidden=48, depth=2, heads=4, tokens=256)  # the tiny DiT of write_tiny_scale_rae (released: 2048, 32, 32)


@pytest.fixture(autouse=True)
def inference():
    """Tiny models: one thread is faster than two; everything here is inference."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- release-layout writers
def hf_model(state=None, tie=True, seed=0, std=0.2, **kw):
    """transformers' Qwen2ForCausalLM on TINY (+ kw), eager attention: random weights (std `std`, large enough
    that every term matters; embeddings std 1, norms 1 +- 0.1) or `state` (HF key names; a tied head may be absent)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**{**TINY, **kw}, tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    if state is None:
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else
                    torch.randn_like(p) * (1.0 if "embed" in name else std))
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set()), (missing, unexpected)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def hf_state(model):
    """The state dict as a release stores it: no lm_head.weight when it is tied."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def qwen2_config(tie=True, transformers5=False, **kw):
    """config.json of a Qwen2 snapshot as transformers 4 writes it (rope_theta), or 5 (rope_parameters)."""
    c = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **TINY, "hidden_act": "silu",
         "tie_word_embeddings": tie, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
         "rope_scaling": None, "torch_dtype": "float32", "bos_token_id": 151643, "eos_token_id": 151645, **kw}
    if transformers5:
        del c["rope_scaling"]
        c["rope_parameters"] = {"rope_theta": c.pop("rope_theta"), "rope_type": "default"}
    return c


def write_snapshot(folder, state, config, shards=1):
    """config.json and the weights: model.safetensors, or `shards` files model-0000k-of-0000n.safetensors and
    model.safetensors.index.json, as save_pretrained writes them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if shards == 1:
        return ckpt.save_safetensors(os.path.join(folder, "model.safetensors"), state, metadata={"format": "pt"})
    keys, weight_map = list(state), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        ckpt.save_safetensors(os.path.join(folder, name), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    size = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2)


class Tok:
    """What qwen.conditions needs from a tokenizer, on HF `tokenizers`."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def decode(self, ids):
        return self.tok.decode(ids)


def tiny_tokenizer():
    """A byte-level BPE set up as Qwen2's tokenizer.json (NFC, Split on its regex, ByteLevel): the 256 byte symbols,
    three merges, the five Scale-RAE special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("a", "s"), ("as", "s"), ("\u0120", "a")]  # "ass" of "assistant"; "\u0120" is the byte-level space
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def dit_shapes(hidden, depth, heads, tokens, channels, z):
    """The released diff_head.model.* keys (a LightningDiT, from the official module tree) at a given size."""
    mlp = int(2 / 3 * 4 * hidden)  # SwiGLU hidden: 5461 at 2048
    shapes = {"pos_embed": (1, tokens, hidden), "x_embedder.proj.weight": (hidden, channels, 1, 1),
              "x_embedder.proj.bias": (hidden,), "t_embedder.mlp.0.weight": (hidden, 512),
              "t_embedder.mlp.0.bias": (hidden,), "t_embedder.mlp.2.weight": (hidden, hidden),
              "t_embedder.mlp.2.bias": (hidden,),
              "y_embedder.dropout_embedding": (z,), "final_layer.norm_final.weight": (hidden,),
              "final_layer.linear.weight": (channels, hidden), "final_layer.linear.bias": (channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * hidden, z),
              "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
              "feat_rope.freqs_cos": (tokens, hidden // heads), "feat_rope.freqs_sin": (tokens, hidden // heads)}
    for i in range(depth):
        b = f"dit_blocks.{i}."
        shapes.update({b + "norm1.weight": (hidden,), b + "norm2.weight": (hidden,),
                       b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                       b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                       b + "mlp.w12.weight": (2 * mlp, hidden), b + "mlp.w12.bias": (2 * mlp,),
                       b + "mlp.w3.weight": (hidden, mlp), b + "mlp.w3.bias": (hidden,),
                       b + "adaLN_modulation.1.weight": (6 * hidden, z), b + "adaLN_modulation.1.bias": (6 * hidden,)})
    return shapes


def scale_rae_config(llm, channels=1152, dit=DIT):
    """config.json of a Scale-RAE snapshot: the fields the official constructor reads, around a Qwen2 config."""
    return {**{k: v for k, v in llm.items() if k not in ("architectures", "model_type")},
            "architectures": ["ScaleRAEQwenForCausalLM"], "model_type": "cambrian_qwen",
            "vision_loss": "diffusion-loss", "vision_loss_mode": "query", "vision_coef": 2.0,
            "diffusion_split_per_token": dit["tokens"], "diffusion_model_hidden_size": dit["hidden"],
            "diffusion_model_channels": channels, "diffusion_model_depth": dit["depth"],
            "diffusion_model_heads": dit["heads"], "diffusion_model_z_channels": dit["hidden"], "ddt_encoder_depth": 2,
            "diffusion_class_dropout_prob": 0.1, "dit_cls": "DiT", "diffusion_base_dim": None,
            "diffusion_norm_stats_path": None, "mm_vision_tower_aux_list": ["google/siglip2-so400m-patch14-224"],
            "mm_vision_tower_aux_token_len_list": [256], "vision_tower_aux_token_len_list": [256],
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1152, "mm_use_im_start_end": True,
            "mm_use_im_patch_token": False, "mm_vision_select_layer": -1, "generation_alignment_tower": None,
            "patch_size": 2}


def write_tiny_scale_rae(folder, answer="Hi!", end="<im_start>", shards=1, channels=1152, seed=0, overrides=None):
    """A tiny Scale-RAE snapshot in the released layout -> its tokenizer (a Tok): config.json (model_type
    cambrian_qwen), tokenizer.json, and weights with every released key: the tied Qwen2, model.mm_projector.*,
    model.latent_queries (256, 32), diff_head_projector (32 -> 48) and a DiT (diff_head.model.*, width 48, depth 2,
    4 heads, `channels` latent channels; random, the RoPE tables too). `overrides` (key -> tensor, or None to
    drop the key) edits the weights before they are written.
    Greedy decoding of any prompt answers `answer` (distinct single characters), then `end`: the embeddings of the
    last prompt token "\n", of the answer's characters and of `end` are basis vectors e_0, e_1, ...; the last
    layer's MLP maps e_k to a large e_{k+1}, so the tied head's argmax after token k of the chain is token k + 1.
    The other LLM weights are random with std 0.1: attention and MLPs then leak little of earlier tokens' directions
    into the current one (at std 0.2 the unit of the previous token fires too), yet the prefix still matters."""
    tok = tiny_tokenizer()
    chain = [tok.token_to_id(t) for t in ["\u010a", *answer, end]]  # "\u010a": the byte-level "\n"
    assert None not in chain and len(set(chain)) == len(chain), "answer: distinct characters other than a newline"
    model = hf_model(tie=True, seed=seed, std=0.1, vocab_size=tok.get_vocab_size())  # std: see the docstring
    state, g = hf_state(model), torch.Generator().manual_seed(seed)
    E, K, last = state["model.embed_tokens.weight"], len(chain), f"model.layers.{TINY['num_hidden_layers'] - 1}.mlp."
    E[:, :K] = 0  # no other token has a component along the chain's directions
    gate, up, down = (torch.zeros_like(state[last + n + "_proj.weight"]) for n in ("gate", "up", "down"))
    for k, t in enumerate(chain):
        E[t] = 0
        E[t, k] = 4.0
        if k + 1 < K:  # hidden unit k: about silu(4 x_k) * x_k, large when the token is chain[k], written to e_{k+1}
            gate[k, k], up[k, k], down[k + 1, k] = 4.0, 1.0, 4.0
    state.update({last + "gate_proj.weight": gate, last + "up_proj.weight": up, last + "down_proj.weight": down})
    D, shapes = TINY["hidden_size"], dit_shapes(**DIT, channels=channels, z=DIT["hidden"])
    extra = {"model.mm_projector.0.weight": (D, 1152), "model.mm_projector.0.bias": (D,),
             "model.mm_projector.2.weight": (D, D), "model.mm_projector.2.bias": (D,),
             "model.latent_queries": (DIT["tokens"], D), "diff_head_projector.weight": (DIT["hidden"], D),
             "diff_head_projector.bias": (DIT["hidden"],), **{"diff_head.model." + k: s for k, s in shapes.items()}}
    state.update({k: torch.randn(s, generator=g) * (1.0 if k == "model.latent_queries" else 0.1)
                  for k, s in extra.items()})
    for k, t in (overrides or {}).items():
        state.pop(k) if t is None else state.__setitem__(k, t)
    config = scale_rae_config(qwen2_config(vocab_size=tok.get_vocab_size()), channels)
    write_snapshot(str(folder), state, config, shards)
    tok.save(os.path.join(str(folder), "tokenizer.json"))
    return Tok(tok)


def written(folder):
    """Every tensor of a snapshot folder, all shards together."""
    from safetensors.torch import load_file
    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def llm_part(state):
    return {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.latent", "diff_head"))}


def reference_conditions(folder, tok, prompt, max_new_tokens=512):
    """Scale-RAE's greedy_decode without a cache (C5), on transformers' Qwen2: the whole sequence recomputed at each
    step; on <im_start>, its embedding and the 256 queries; final-norm states there -> diff_head_projector."""
    state = written(folder)
    hf = hf_model(llm_part(state), tie=True, vocab_size=tok.tok.get_vocab_size())
    ids, answer = tok.encode(qwen.chat_prompt(prompt)), []
    for _ in range(max_new_tokens):
        token = hf(inputs_embeds=hf.model.embed_tokens(torch.tensor([ids + answer]))).logits[0, -1].argmax().item()
        if token == tok.token_to_id("<im_start>"):
            break
        answer.append(token)
    embeds = hf.model.embed_tokens(torch.tensor([ids + answer + [token]]))  # (1, T, D)
    embeds = torch.cat([embeds, state["model.latent_queries"][None]], dim=1)  # (1, T + 256, D)
    h = hf.model(inputs_embeds=embeds).last_hidden_state[:, -256:]  # (1, 256, D)
    cond = h @ state["diff_head_projector.weight"].T + state["diff_head_projector.bias"]  # (1, 256, Dy)
    return cond, answer


# ----------------------------------------------------------------------------- the LLM
@pytest.mark.parametrize("tie,shards,transformers5", [(True, 1, False), (False, 3, True)])
def test_matches_transformers(tmp_path, tie, shards, transformers5):
    """Logits and final-norm states = Qwen2ForCausalLM's (from ids and from embeddings), batch 2; tied and untied
    heads, one file and shards, both config.json styles."""
    ref = hf_model(tie=tie)
    write_snapshot(tmp_path, hf_state(ref), qwen2_config(tie, transformers5), shards)
    model = qwen.load(str(tmp_path))
    assert (model.lm_head is None) == tie and model.cfg.rope_theta == 1e4 and model.cfg.num_key_value_heads == 2
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 9, TINY["vocab_size"])
    torch.testing.assert_close(logits, ref(ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.hidden(ids), ref.model(ids).last_hidden_state, atol=1e-4, rtol=0)
    embeds = torch.randn(2, 7, TINY["hidden_size"])
    torch.testing.assert_close(model.hidden(inputs_embeds=embeds), ref.model(inputs_embeds=embeds).last_hidden_state,
                               atol=1e-4, rtol=0)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin_snapshots_load_as_safetensors_ones(tmp_path, shards):
    """A snapshot whose weights are pytorch_model.bin (or its shards + pytorch_model.bin.index.json), as a HF release
    may ship them, gives the same model as the safetensors one."""
    ref = hf_model(tie=True)
    state = {k: v.contiguous() for k, v in hf_state(ref).items()}
    write_snapshot(tmp_path / "st", state, qwen2_config(True, False), shards)
    os.makedirs(tmp_path / "bin")
    os.rename(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    if shards == 1:
        torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    else:
        index = json.load(open(tmp_path / "st" / "model.safetensors.index.json"))
        files = {f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for f in index["weight_map"].values()}
        for f in files:
            torch.save({k: v for k, v in state.items() if index["weight_map"][k] == f.replace("pytorch_model-", "model-")
                        .replace(".bin", ".safetensors")}, tmp_path / "bin" / f)
        index["weight_map"] = {k: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                               for k, f in index["weight_map"].items()}
        json.dump(index, open(tmp_path / "bin" / "pytorch_model.bin.index.json", "w"))
    model = qwen.load(str(tmp_path / "bin"))
    ids = torch.randint(0, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_cache_equals_full_forward(tmp_path):
    """Prefill, single tokens, then a chunk of several at an offset (the causal mask shifted by the cache):
    the same states and logits as one cache-free forward, batch 2."""
    write_snapshot(tmp_path, hf_state(hf_model()), qwen2_config())
    model = qwen.load(str(tmp_path))
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    cache = qwen.KVCache()
    parts = [model.hidden(ids[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 7), (7, 12))]
    assert cache.pos == 12 and cache.layers[0][0].shape == (2, 2, 12, 8)  # (B, KV, S, hd)
    torch.testing.assert_close(torch.cat(parts, dim=1), model.hidden(ids), atol=1e-5, rtol=0)
    cache = qwen.KVCache()
    logits = [model(ids[:, :11], cache)[:, -1], model(ids[:, 11:], cache)[:, -1]]
    torch.testing.assert_close(logits[1], model(ids)[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shards", [1, 2])
def test_bad_keys_one_line(tmp_path, shards):
    state = hf_state(hf_model())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.norm.weight"] = torch.ones(31)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)  # Qwen2's o_proj has no bias
    write_snapshot(tmp_path, state, qwen2_config(), shards)
    with pytest.raises(ValueError) as e:
        qwen.load(str(tmp_path))
    where = "model.safetensors" if shards == 1 else "model.safetensors.index.json"
    one_line_naming(e, os.path.join(str(tmp_path), where), "missing key 'model.layers.1.mlp.up_proj.weight'",
                    "key 'model.norm.weight' has shape (31,), expected (32,)",
                    "unexpected key 'model.layers.0.self_attn.o_proj.bias'")


def test_config_refusals(tmp_path):
    write_snapshot(tmp_path, hf_state(hf_model()), qwen2_config(hidden_act="gelu", use_sliding_window=True,
                                                                rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError) as e:
        qwen.load(str(tmp_path))
    one_line_naming(e, os.path.join(str(tmp_path), "config.json"), "hidden_act 'gelu'", "use_sliding_window", "yarn")
    write_snapshot(tmp_path, {}, scale_rae_config(qwen2_config(), channels=768) | {"diffusion_split_per_token": 64})
    with pytest.raises(ValueError) as e:
        qwen.load_scale_rae(str(tmp_path))
    one_line_naming(e, "config.json", "field 'diffusion_split_per_token' is 64, this path supports 256",
                    "field 'diffusion_model_channels' is 768")
    write_snapshot(tmp_path, {}, {k: v for k, v in scale_rae_config(qwen2_config()).items() if k != "vision_loss_mode"})
    with pytest.raises(ValueError) as e:
        qwen.load_scale_rae(str(tmp_path))
    one_line_naming(e, "config.json", "field 'vision_loss_mode' is 'missing'")


# ----------------------------------------------------------------------------- Scale-RAE
@pytest.mark.parametrize("shards", [1, 2])
def test_scale_rae_conditions(tmp_path, shards):
    """Cached greedy decoding gives the official cache-free loop's answer and its 256 conditions."""
    tok = write_tiny_scale_rae(tmp_path, shards=shards)
    model = qwen.load_scale_rae(str(tmp_path))
    seen, prompt = [], "a red cube on a blue floor"
    cond, answer = qwen.conditions(model, tok, prompt, progress=lambda ids: seen.append(list(ids)))
    ref, ref_answer = reference_conditions(str(tmp_path), tok, prompt)
    assert answer == "Hi!" and [tok.decode(s) for s in seen] == ["H", "Hi", "Hi!"] and seen[-1] == ref_answer
    assert cond.shape == (1, 256, DIT["hidden"]) and cond.dtype == torch.float32
    torch.testing.assert_close(cond, ref, atol=1e-4, rtol=0)
    # the queries' states depend on the prefix (causal attention), so an answer skipped would change them
    skipped = model.hidden(inputs_embeds=torch.cat([model.model.embed_tokens(torch.tensor([tok.encode(
        qwen.chat_prompt(prompt) + "<im_start>")])), model.model.latent_queries[None]], 1))
    assert (model.diff_head_projector(skipped[:, -256:]) - cond).abs().max() > 1e-2


def test_scale_rae_snapshot_keys(tmp_path):
    """qwen.load reads the LLM of a Scale-RAE snapshot (its extra keys skipped); read_dit_state gives the DiT."""
    tok = write_tiny_scale_rae(tmp_path, shards=2)
    llm = qwen.load(str(tmp_path))
    ids = torch.tensor([tok.encode("<|im_start|>user\nhi<|im_end|>")])
    ref = hf_model(llm_part(written(tmp_path)), vocab_size=tok.tok.get_vocab_size())
    torch.testing.assert_close(llm(ids), ref(ids).logits, atol=1e-4, rtol=0)
    dit = qwen.read_dit_state(str(tmp_path))
    assert {k: tuple(v.shape) for k, v in dit.items()} == dit_shapes(**DIT, channels=1152, z=DIT["hidden"])
    assert torch.equal(dit["pos_embed"], written(tmp_path)["diff_head.model.pos_embed"])
    write_snapshot(tmp_path / "plain", hf_state(hf_model()), qwen2_config())
    with pytest.raises(ValueError) as e:
        qwen.read_dit_state(str(tmp_path / "plain"))
    one_line_naming(e, "model.safetensors", "no 'diff_head.model.*' keys")


def test_scale_rae_bad_keys(tmp_path):
    write_tiny_scale_rae(tmp_path, overrides={"model.latent_queries": None, "diff_head_projector.weight":
                                              torch.zeros(2048, TINY["hidden_size"])})
    with pytest.raises(ValueError) as e:
        qwen.load_scale_rae(str(tmp_path))
    one_line_naming(e, "model.safetensors", "missing key 'model.latent_queries'",
                    "key 'diff_head_projector.weight' has shape (2048, 32), expected (48, 32)")


def test_answer_without_image(tmp_path):
    """<|im_end|> before <im_start>, or no <im_start> within max_new_tokens: one line quoting the answer."""
    tok = write_tiny_scale_rae(tmp_path, end="<|im_end|>")
    model = qwen.load_scale_rae(str(tmp_path))
    with pytest.raises(ValueError) as e:
        qwen.conditions(model, tok, "a cat")
    one_line_naming(e, "<|im_end|> before <im_start>", "'Hi!'")
    with pytest.raises(ValueError) as e:
        qwen.conditions(model, tok, "a cat", max_new_tokens=2)
    one_line_naming(e, "max_new_tokens=2", "'Hi'")


# ----------------------------------------------------------------------------- the released 1.5B, on the meta device
def test_released_1p5b_shapes(tmp_path):
    """The C2 config builds exactly the C3 keys and shapes; the LLM counts 1,543,301,120 (tied head once)."""
    llm = qwen2_config(vocab_size=151667, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768)
    write_snapshot(tmp_path, {}, scale_rae_config(llm, dit=dict(hidden=2048, depth=32, heads=32, tokens=256)))
    cfg, n, z = qwen.read_scale_rae_config(str(tmp_path))
    with torch.device("meta"):
        model = qwen.ScaleRAEText(cfg, n, z)
    want = {"model.embed_tokens.weight": (151667, 1536), "model.norm.weight": (1536,),
            "model.latent_queries": (256, 1536), "diff_head_projector.weight": (2048, 1536),
            "diff_head_projector.bias": (2048,)}
    for i in range(28):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        want.update({a + "q_proj.weight": (1536, 1536), a + "q_proj.bias": (1536,), a + "k_proj.weight": (256, 1536),
                     a + "k_proj.bias": (256,), a + "v_proj.weight": (256, 1536), a + "v_proj.bias": (256,),
                     a + "o_proj.weight": (1536, 1536), m + "gate_proj.weight": (8960, 1536),
                     m + "up_proj.weight": (8960, 1536), m + "down_proj.weight": (1536, 8960),
                     f"model.layers.{i}.input_layernorm.weight": (1536,),
                     f"model.layers.{i}.post_attention_layernorm.weight": (1536,)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    count = lambda keep: sum(p.numel() for k, p in model.named_parameters() if keep(k))
    assert count(lambda k: not k.startswith(("model.latent", "diff_head"))) == 1_543_301_120
    assert count(lambda k: k.startswith(("model.latent", "diff_head"))) == 393_216 + 3_147_776


def test_smoke():
    out = run("qwen.py").stdout
    assert "1,543,301,120" in out and "7,615,616,512" in out and "max |diff|" in out
