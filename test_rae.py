"""Tests of rae.py against transformers / diffusers built from the same configs (CPU, fp32, tiny).
(The tokenizer is tested in test_tokenizer.py, downloads in test_hub.py.)

    python -m pytest -q test_rae.py            # the fast suite
    python -m pytest -q test_rae.py -m slow    # so400m-patch14-224 shapes vs transformers (minutes, ~14 GB RAM)
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import ckpt
import rae
import tokenizer
import toy
from conftest import one_line_naming


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Every test here is inference; scoped to this module (a bare set_grad_enabled(False) at import time would leak
    into every other test file pytest collects after it)."""
    with torch.no_grad():
        yield


TINY_VISION = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   image_size=56, patch_size=14)
TINY_TEXT = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, projection_size=64)


def hf_siglip(folder, vision=TINY_VISION, text=TINY_TEXT, seed=0, **save_kw):
    """A transformers SiglipModel with random weights (LayerNorms perturbed too), saved with save_pretrained."""
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config={**text})).eval()
    for name, p in model.named_parameters():  # HF inits LayerNorms to (1, 0): perturb so affine is tested
        if "norm" in name or "logit" in name:
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kw)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("siglip"))
    return hf_siglip(folder), rae.load_siglip2(folder), folder


def maxdiff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- numerical equality
def test_towers_match_transformers(pair):
    hf, ours, _ = pair
    img = torch.rand(3, 3, 56, 56) * 2 - 1
    ids = torch.randint(0, 300, (3, 64))
    out = hf(input_ids=ids, pixel_values=img, output_hidden_states=True)
    h = ours.vision(img)
    assert maxdiff(h, out.vision_model_output.hidden_states[-1]) < 1e-4
    assert maxdiff(ours.vision.pool(h), out.vision_model_output.pooler_output) < 1e-4
    t = ours.text(ids)
    assert maxdiff(t, out.text_model_output.last_hidden_state) < 1e-4
    assert maxdiff(ours.text.pool(t), out.text_model_output.pooler_output) < 1e-4
    logits = ours.logits(ours.vision.pool(h), ours.text.pool(t))
    assert maxdiff(logits, out.logits_per_image) < 1e-4


def test_position_interpolation_matches_transformers(pair):
    hf, ours, _ = pair
    img = torch.rand(2, 3, 84, 70) * 2 - 1  # 6 x 5 patches from a 4 x 4 learned grid, bicubic
    ref = hf.vision_model(img, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-1]
    assert maxdiff(ours.vision(img), ref) < 1e-4


def test_sharded_checkpoint_and_minimal_config(tmp_path):
    hf = hf_siglip(str(tmp_path), max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    # hub config.json files keep only the fields that differ from the defaults: drop the ones equal to them
    cfg = json.load(open(tmp_path / "config.json"))
    for sub, defaults in (("vision_config", rae.VISION_DEFAULTS), ("text_config", rae.TEXT_DEFAULTS)):
        cfg[sub] = {k: v for k, v in cfg[sub].items() if k not in defaults or defaults[k] != v}
    json.dump({"model_type": "siglip", "vision_config": cfg["vision_config"], "text_config": cfg["text_config"]},
              open(tmp_path / "config.json", "w"))
    ours = rae.load_siglip2(str(tmp_path))
    img = torch.rand(1, 3, 56, 56) * 2 - 1
    assert maxdiff(ours.vision(img), hf.vision_model(img, output_hidden_states=True).hidden_states[-1]) < 1e-4


def test_vision_only_load_and_dtype(pair):
    _, ours, folder = pair
    v = rae.load_siglip2(folder, text=False, dtype=torch.bfloat16)
    assert v.text is None and v.vision.pos_embed.dtype == torch.bfloat16
    img = torch.rand(1, 3, 56, 56) * 2 - 1
    assert maxdiff(v.vision(img).float(), ours.vision(img)) < 0.1 * ours.vision(img).abs().max().item()


def test_written_checkpoint_is_real_hf_format(tmp_path):
    """toy.write_tiny_siglip2's files (written by rae.save_siglip2) load in transformers and give the same numbers
    as ours."""
    from tokenizers import Tokenizer
    from transformers import SiglipModel
    toy.write_tiny_siglip2(str(tmp_path), ["red", "circle", "cat"], vision=dict(image_size=56), seed=1)
    hf = SiglipModel.from_pretrained(str(tmp_path)).eval()
    ours = rae.load_siglip2(str(tmp_path))
    ids = ours.tokenizer(["A red circle", "the word \"cat\""])
    assert ids.tolist() == [e.ids for e in Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
                            .encode_batch(["a red circle", "the word \"cat\""])]
    img = torch.rand(2, 3, 56, 56) * 2 - 1
    out = hf(input_ids=ids, pixel_values=img)
    assert maxdiff(ours.score(img, ["A red circle", "the word \"cat\""]), out.logits_per_image) < 1e-4


def test_rae_latent_is_parameter_free_layernorm(pair, tmp_path):
    hf, ours, _ = pair
    img = torch.rand(4, 3, 56, 56) * 2 - 1
    h = hf.vision_model(img, output_hidden_states=True).hidden_states[-1]
    model = rae.RAE(ours.vision)
    z = model.encode(img)
    assert maxdiff(z, F.layer_norm(h, (64,), eps=1e-6)) < 1e-4
    assert maxdiff(z.mean(-1), torch.zeros(4, 16)) < 1e-5 and maxdiff(z.var(-1, unbiased=False), torch.ones(4, 16)) < 1e-3
    # a generated latent is scored without decoding: pool(z) == pool(h)
    assert maxdiff(ours.vision.pool(z), ours.vision.pool(ours.vision(img))) < 1e-3
    # exact stats over batches, saved and loaded, standardize the latents to mean 0 / var 1 per channel
    batches = [torch.rand(3, 3, 56, 56) * 2 - 1 for _ in range(3)]
    stats = rae.compute_latent_stats(model, batches)
    allz = torch.cat([model.encode(b) for b in batches]).reshape(-1, 64)
    assert maxdiff(stats["mean"], allz.mean(0)) < 1e-5 and maxdiff(stats["var"], allz.var(0, unbiased=False)) < 1e-4
    rae.save_latent_stats(str(tmp_path / "stats.safetensors"), stats)
    normed = rae.RAE(ours.vision, stats=rae.load_latent_stats(str(tmp_path / "stats.safetensors"), 64))
    zn = torch.cat([normed.encode(b) for b in batches]).reshape(-1, 64)
    assert maxdiff(zn.mean(0), torch.zeros(64)) < 1e-4 and maxdiff(zn.var(0, unbiased=False), torch.ones(64)) < 1e-3
    assert maxdiff(normed.unnormalize(normed.encode(batches[0])), model.encode(batches[0])) < 1e-4


def test_noise_augment_sigma_per_sample():
    z = torch.zeros(2000, 64, 64)  # 4096 values per sample: its std estimates sigma to ~1%
    noisy = rae.noise_augment(z, 0.8, generator=torch.Generator().manual_seed(0))
    sigma = noisy.std(dim=(1, 2))  # each sample's own sigma ~ U(0, 0.8)
    assert sigma.max() < 0.84 and sigma.min() < 0.01
    assert abs(sigma.mean().item() - 0.4) < 0.02 and abs(sigma.var().item() - 0.64 / 12) < 0.005
    assert rae.noise_augment(z, 0.0) is z


# ----------------------------------------------------------------------------- decoder
def test_decoder_matches_diffusers_rae_decoder(tmp_path):
    from diffusers.models.autoencoders.autoencoder_rae import RAEDecoder
    torch.manual_seed(0)
    ref = RAEDecoder(hidden_size=32, decoder_hidden_size=48, decoder_num_hidden_layers=2,
                     decoder_num_attention_heads=4, decoder_intermediate_size=96, num_patches=256,
                     patch_size=2, image_size=32).eval()
    for name, p in ref.named_parameters():
        p.add_(0.2 * torch.randn_like(p))  # cls token and LayerNorms away from their init
    cfg = rae.DecoderConfig(latent_dim=32, num_tokens=256, patch_size=2, hidden_size=48, depth=2, num_heads=4,
                            mlp_dim=96)
    dec = rae.Decoder(cfg).eval()
    ckpt.load_checked(dec, rae.import_rae_decoder({"decoder." + k: v for k, v in ref.state_dict().items()}), "ref")
    z = torch.randn(2, 256, 32)
    expected = ref.unpatchify(ref(z, return_dict=True).logits)  # (B, 3, 32, 32)
    assert maxdiff(dec(z), expected) < 1e-4
    # the export round trip: weights + config in one safetensors file
    rae.save_decoder(str(tmp_path / "dec.safetensors"), dec)
    assert maxdiff(rae.load_decoder(str(tmp_path / "dec.safetensors"))(z), expected) < 1e-4


def test_decoder_presets_and_unpatchify():
    xl = rae.DecoderConfig(**rae.DECODER_PRESETS["XL"], latent_dim=768, patch_size=16)
    with torch.device("meta"):
        n = sum(p.numel() for p in rae.Decoder(xl).parameters())
    assert n == 415_352_704 - 257 * 1152  # the released ViT-XL count minus its stored (fixed) pos table
    x = torch.arange(2 * 4 * 12).float().view(2, 4, 12)  # 2x2 tokens of 2x2 pixels x 3 channels
    img = rae.unpatchify(x, 2)
    assert img.shape == (2, 3, 4, 4) and img[0, 1, 0, 3].item() == x[0, 1, (0 * 2 + 1) * 3 + 1].item()  # token 1, (py, px, c) = (0, 1, 1)


# ----------------------------------------------------------------------------- clear errors
def corrupt_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(str(dst))
    return str(dst)


def rewrite_weights(fn):
    def edit(d):
        path = os.path.join(d, "model.safetensors")
        state = load_file(path)
        fn(state)
        save_file(state, path)
    return edit


def truncate(d):
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def set_model_type(t):
    def edit(d):
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["model_type"] = t
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return edit


K = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
BAD_SNAPSHOTS = {
    "missing config": (lambda d: os.remove(os.path.join(d, "config.json")), r"config\.json: file not found"),
    "missing weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), r"model\.safetensors: file not found"),
    "missing key": (rewrite_weights(lambda s: s.pop(K)), r"incomplete attention.*q_proj"),
    "missing tensor": (rewrite_weights(lambda s: s.pop("text_model.head.bias")), r"missing key.*text\.head\.bias"),
    "unexpected key": (rewrite_weights(lambda s: s.update(extra=torch.zeros(1))), r"unexpected key 'extra'"),
    "wrong shape": (rewrite_weights(lambda s: s.update({K: torch.zeros(64, 63)})), r"'.*q_proj.weight' has shape \(64, 63\)"),
    "wrong dtype": (rewrite_weights(lambda s: s.update({K: s[K].long()})), r"'.*q_proj.weight' has dtype torch.int64"),
    "truncated": (truncate, r"model\.safetensors: (truncated|not a safetensors)"),
    "not safetensors": (lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"x" * 100), r"not a safetensors"),
    "unknown model_type": (set_model_type("clip"), r"unknown model_type 'clip'"),
    "naflex": (set_model_type("siglip2"), r"NaFlex.*not supported yet"),
}


@pytest.mark.parametrize("case", BAD_SNAPSHOTS)
def test_bad_snapshot_errors(case, pair, tmp_path):
    edit, pattern = BAD_SNAPSHOTS[case]
    folder = corrupt_copy(pair[2], tmp_path / "snap", edit)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern) as e:
        rae.load_siglip2(folder)
    assert "\n" not in str(e.value) and folder in str(e.value)


@pytest.mark.parametrize("img,pattern", [
    (torch.rand(1, 3, 56, 56) * 255, r"pixels must be in \[-1, 1\]"),
    (torch.rand(3, 56, 56), r"expected a float image tensor \(B, 3, H, W\)"),
    (torch.rand(1, 4, 56, 56), r"expected a float image tensor"),
    (torch.rand(1, 3, 50, 56), r"not a multiple of the patch size 14"),
])
def test_bad_image_errors(pair, img, pattern):
    with pytest.raises(ValueError, match=pattern):
        pair[1].vision(img)


def test_bad_decoder_and_stats_files(tmp_path):
    save_file({"mean": torch.zeros(3)}, str(tmp_path / "stats.safetensors"))
    with pytest.raises(ValueError, match=r"stats\.safetensors: missing key 'var'"):
        rae.load_latent_stats(str(tmp_path / "stats.safetensors"), 3)
    save_file({"w": torch.zeros(3)}, str(tmp_path / "dec.safetensors"))
    with pytest.raises(ValueError, match=r"dec\.safetensors: no 'decoder_config'"):
        rae.load_decoder(str(tmp_path / "dec.safetensors"))
    dec = rae.Decoder(rae.DecoderConfig(latent_dim=8, num_tokens=4, patch_size=2, hidden_size=16, depth=1,
                                        num_heads=2, mlp_dim=32))
    rae.save_decoder(str(tmp_path / "d.safetensors"), dec)
    with pytest.raises(ValueError, match=r"decoder expects latents \(B, 4, 8\)"):
        dec(torch.zeros(1, 4, 9))


# ----------------------------------------------------------------------------- real shapes (slow)
@pytest.mark.slow
def test_so400m_patch14_224_matches_transformers(tmp_path):
    """The real google/siglip2-so400m-patch14-224 shapes (1.1B parameters), random weights."""
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=224, patch_size=14)
    text = dict(vocab_size=256000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                num_attention_heads=16)
    hf = hf_siglip(str(tmp_path), vision, text)
    ours = rae.load_siglip2(str(tmp_path))
    img, ids = torch.rand(2, 3, 224, 224) * 2 - 1, torch.randint(0, 256000, (2, 64))
    out = hf(input_ids=ids, pixel_values=img, output_hidden_states=True)
    h, t = ours.vision(img), ours.text(ids)
    diffs = {"vision": maxdiff(h, out.vision_model_output.hidden_states[-1]),
             "vision_pool": maxdiff(ours.vision.pool(h), out.vision_model_output.pooler_output),
             "text": maxdiff(t, out.text_model_output.last_hidden_state),
             "text_pool": maxdiff(ours.text.pool(t), out.text_model_output.pooler_output),
             "logits": maxdiff(ours.logits(ours.vision.pool(h), ours.text.pool(t)), out.logits_per_image)}
    print(diffs)
    assert max(diffs.values()) < 1e-4, diffs
