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
from conftest import assert_same, one_line_naming


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


def test_save_siglip2_round_trip(pair, tmp_path):
    """save_siglip2 writes a real HF snapshot: load_siglip2 gives back the very same model, and transformers'
    SiglipModel loads the folder with exactly the weights and config of the model it came from."""
    from transformers import SiglipModel
    hf, ours, _ = pair
    spec = tokenizer.gemma_tokenizer_json(["cat", "red"])
    rae.save_siglip2(str(tmp_path), ours, tokenizer_json=spec, config={"toy_text_window": [2, 5]})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.load(open(tmp_path / "config.json"))["toy_text_window"] == [2, 5]  # extra fields are kept
    again = rae.load_siglip2(str(tmp_path))
    assert_same(again.state_dict(), ours.state_dict())
    img, ids = torch.rand(2, 3, 56, 56) * 2 - 1, torch.randint(0, 300, (2, 64))
    h, t = again.vision(img), again.text(ids)
    assert torch.equal(h, ours.vision(img)) and torch.equal(t, ours.text(ids))
    assert torch.equal(again.logits(again.vision.pool(h), again.text.pool(t)),
                       ours.logits(ours.vision.pool(h), ours.text.pool(t)))
    assert again.tokenizer.encode("a red cat") == tokenizer.GemmaTokenizer(spec).encode("a red cat")
    ref = SiglipModel.from_pretrained(str(tmp_path)).eval()
    assert_same(dict(ref.named_parameters()), dict(hf.named_parameters()))
    for sub, defaults in (("vision_config", rae.VISION_DEFAULTS), ("text_config", rae.TEXT_DEFAULTS)):
        got, want = getattr(ref.config, sub), getattr(hf.config, sub)
        assert {k: getattr(got, k) for k in defaults} == {k: getattr(want, k) for k in defaults}, sub


def test_save_siglip2_creates_its_folder(pair, tmp_path):
    """Like save_pretrained, save_siglip2 writes into a folder that does not exist yet."""
    folder = str(tmp_path / "new" / "snap")
    rae.save_siglip2(folder, pair[1])
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert_same(rae.load_siglip2(folder).state_dict(), pair[1].state_dict())


def test_save_siglip2_vision_only(pair, tmp_path):
    """A vision-only model (load_siglip2(text=False)) saves as a vision-only snapshot: it loads back with text=False
    and gives the same latents; with the text tower it fails in one line naming the missing text keys."""
    v = rae.load_siglip2(pair[2], text=False)
    rae.save_siglip2(str(tmp_path), v)
    again = rae.load_siglip2(str(tmp_path), text=False)
    img = torch.rand(2, 3, 56, 56) * 2 - 1
    assert torch.equal(again.vision(img), v.vision(img))
    with pytest.raises(ValueError) as e:
        rae.load_siglip2(str(tmp_path))
    one_line_naming(e, os.path.join(str(tmp_path), "model.safetensors"), "missing key 'text_model.")


def test_sincos_2d_layout():
    """rae.sincos_2d(grid, dim) (the argument order of dit.sincos_2d): MAE's layout, column half first."""
    table = rae.sincos_2d(3, 8)
    assert table.shape == (9, 8)
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    def code(p):
        return torch.cat([(p * omega).sin(), (p * omega).cos()])
    assert torch.allclose(table[1 * 3 + 2], torch.cat([code(2.0), code(1.0)]), atol=1e-6)  # row 1, column 2


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


def rewrite_weights(fn, file="model.safetensors"):
    def edit(d):
        path = os.path.join(d, file)
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
K2 = "text_model.encoder.layers.1.mlp.fc2.weight"
BAD_SNAPSHOTS = {  # name: (edit of the folder, the file the line names, what else it says)
    "missing config": (lambda d: os.remove(os.path.join(d, "config.json")), "config.json", r"config\.json: file not found"),
    "missing weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), "model.safetensors",
                        r"model\.safetensors: file not found"),
    "missing key": (rewrite_weights(lambda s: s.pop(K)), "model.safetensors", rf"missing key '{K}'"),
    "missing tensor": (rewrite_weights(lambda s: s.pop("text_model.head.bias")), "model.safetensors",
                       r"missing key 'text_model\.head\.bias'"),
    "unexpected key": (rewrite_weights(lambda s: s.update(extra=torch.zeros(1))), "model.safetensors",
                       r"unexpected key 'extra'"),
    "wrong shape": (rewrite_weights(lambda s: s.update({K: torch.zeros(64, 63)})), "model.safetensors",
                    rf"'{K}' has shape \(64, 63\), expected \(64, 64\)"),
    "wrong dtype": (rewrite_weights(lambda s: s.update({K: s[K].long()})), "model.safetensors",
                    rf"'{K}' has dtype torch.int64"),
    "truncated": (truncate, "model.safetensors", r"model\.safetensors: (truncated|not a safetensors)"),
    "not safetensors": (lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"x" * 100),
                        "model.safetensors", r"not a safetensors"),
    "unknown model_type": (set_model_type("clip"), "config.json", r"unknown model_type 'clip'"),
    "naflex": (set_model_type("siglip2"), "config.json", r"NaFlex.*not supported yet"),
}


@pytest.mark.parametrize("case", BAD_SNAPSHOTS)
def test_bad_snapshot_errors(case, pair, tmp_path):
    edit, file, pattern = BAD_SNAPSHOTS[case]
    folder = corrupt_copy(pair[2], tmp_path / "snap", edit)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern) as e:
        rae.load_siglip2(folder)
    one_line_naming(e, os.path.join(folder, file))


def test_bad_snapshot_reports_every_key(pair, tmp_path):
    """Several bad keys at once: ONE one-line error that names model.safetensors and each key, in HF's names."""
    def edit(s):
        s.pop(K)
        s[K2] = torch.zeros(48, 95)
        s["vision_model.head.extra"] = torch.zeros(1)
        s["logit_bias"] = s["logit_bias"].long()
    folder = corrupt_copy(pair[2], tmp_path / "snap", rewrite_weights(edit))
    with pytest.raises(ValueError) as e:
        rae.load_siglip2(folder)
    one_line_naming(e, os.path.join(folder, "model.safetensors"), f"missing key '{K}'",
                    f"key '{K2}' has shape (48, 95), expected (48, 96)", "unexpected key 'vision_model.head.extra'",
                    "key 'logit_bias' has dtype torch.int64")
    # text=False does not read the text tower: its bad key is no longer reported, the vision ones still are
    with pytest.raises(ValueError) as e:
        rae.load_siglip2(folder, text=False)
    one_line_naming(e, os.path.join(folder, "model.safetensors"), f"missing key '{K}'",
                    "unexpected key 'vision_model.head.extra'")
    assert K2 not in str(e.value) and "logit_bias" not in str(e.value)


def test_bad_sharded_snapshot_names_the_index(tmp_path):
    """In a sharded snapshot the keys of all shards are checked together; the line names the index file."""
    folder = str(tmp_path / "sharded")
    hf_siglip(folder, max_shard_size="100KB")
    index = os.path.join(folder, "model.safetensors.index.json")
    weight_map = json.load(open(index))["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    gone = min(k for k, f in weight_map.items() if f == shards[0])
    rewrite_weights(lambda s: s.pop(gone), shards[0])(folder)
    rewrite_weights(lambda s: s.update(extra=torch.zeros(1)), shards[-1])(folder)
    with pytest.raises(ValueError) as e:
        rae.load_siglip2(folder)
    one_line_naming(e, index, f"missing key '{gone}'", "unexpected key 'extra'")


@pytest.mark.parametrize("img,pattern", [
    (torch.rand(3, 56, 56), r"expected a float image tensor \(B, 3, H, W\)"),
    (torch.rand(1, 4, 56, 56), r"expected a float image tensor"),
    ((torch.rand(1, 3, 56, 56) * 255).to(torch.uint8), r"expected a float image tensor"),
    (torch.rand(1, 3, 50, 56), r"not a multiple of the patch size 14"),
])
def test_bad_image_errors(pair, img, pattern):
    with pytest.raises(ValueError, match=pattern):
        pair[1].vision(img)


@pytest.mark.parametrize("img", [torch.rand(2, 3, 8, 8) * 255, (torch.rand(2, 3, 8, 8) * 255).to(torch.uint8),
                                 torch.full((1, 3, 8, 8), -1.5), torch.full((1, 3, 8, 8), float("nan"))],
                         ids=["0-255", "uint8", "below -1", "nan"])
def test_check_pixels_refuses_values_outside_the_range(img):
    with pytest.raises(ValueError, match=r"pixels must be in \[-1, 1\]") as e:
        rae.check_pixels(img, where="train batch 0")
    one_line_naming(e, "train batch 0")
    good = torch.rand(2, 3, 8, 8) * 2 - 1
    assert rae.check_pixels(good) is good and rae.check_pixels(torch.ones(1, 3, 2, 2)) is not None


def test_forward_does_not_read_pixel_values(pair, monkeypatch):
    """The range check left the forward (it synced the device on every call): the vision tower, its features and
    RAE.encode run without torch.aminmax and on the meta device (where any read of a value fails), and accept a
    [0, 255] image (check_pixels, run once where images enter a program, refuses it). Layout is still checked."""
    def no_sync(*a, **k):
        raise AssertionError("torch.aminmax called in a forward")
    monkeypatch.setattr(torch, "aminmax", no_sync)
    img = torch.rand(2, 3, 56, 56) * 255
    assert pair[1].vision(img).shape == (2, 16, 64)
    assert rae.RAE(pair[1].vision).encode(img).shape == (2, 16, 64)
    assert [f.shape for f in pair[1].vision.features(img, [0, 1])] == [(2, 16, 64)] * 2
    with torch.device("meta"):
        meta = rae.SigLIP2(pair[1].vision.cfg)
    assert meta.vision(torch.empty(2, 3, 56, 56, device="meta")).shape == (2, 16, 64)
    assert meta.vision(torch.empty(1, 3, 84, 70, device="meta")).shape == (1, 30, 64)  # interpolated positions
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        meta.vision(torch.empty(1, 3, 50, 56, device="meta"))


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


@pytest.mark.parametrize("state,needles", [
    ({"mean": torch.zeros(5)}, ["missing key 'var'", "key 'mean' has shape (5,), expected (3,) or (4, 3)"]),
    ({"mean": torch.zeros(()), "var": torch.full((3,), float("nan"))},
     ["key 'mean' has shape ()", "key 'var' has non-finite entries"]),
    ({"mean": torch.zeros(3), "var": -torch.ones(3), "x": torch.zeros(3)},
     ["unexpected key 'x'", "key 'var' has negative entries"]),
], ids=["missing + shape", "scalar + nan", "unexpected + negative"])
def test_latent_stats_report_every_problem(tmp_path, state, needles):
    path = str(tmp_path / "stats.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError) as e:
        rae.load_latent_stats(path, 3, tokens=4)
    one_line_naming(e, path, *needles)


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


# ----------------------------------------------------------------------------- released RAE files
# diffusers' RAEDecoder (the oracle) has the official GeneralDecoder's math and names, with the attention renamed.
DECODER_CONFIG = {"model_type": "vit_mae", "hidden_size": 1152, "decoder_hidden_size": 48, "decoder_num_hidden_layers": 2,
                  "decoder_num_attention_heads": 4, "decoder_intermediate_size": 96, "patch_size": 2, "image_size": 32,
                  "layer_norm_eps": 1e-12, "hidden_act": "gelu"}  # hidden_size: stale, the official code overwrites it


def diffusers_decoder(seed=0):
    from diffusers.models.autoencoders.autoencoder_rae import RAEDecoder
    torch.manual_seed(seed)
    ref = RAEDecoder(hidden_size=32, decoder_hidden_size=48, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                     decoder_intermediate_size=96, num_patches=256, patch_size=2, image_size=32).eval()
    for p in ref.parameters():
        p.add_(0.2 * torch.randn_like(p))
    return ref


def official_state(ref):
    """The oracle's weights under the official GeneralDecoder names, decoder_pos_embed included (as model.pt holds)."""
    out = {"decoder_pos_embed": ref.decoder_pos_embed.clone()}
    for k, v in ref.state_dict().items():
        for theirs, official in rae.DIFFUSERS_KEYS:
            k = k.replace(theirs, official)
        out[k] = v.clone()
    return out


def expected_image(ref, z, **kw):
    return ref.unpatchify(ref(z, return_dict=True, **kw).logits)


@pytest.mark.parametrize("case", ["config", "no config (ViT-XL)", "no cls token, no pos table", "stored pos table",
                                  "dinov2_decoder.pt"])
def test_official_decoder_matches_diffusers(tmp_path, monkeypatch, case):
    ref = diffusers_decoder()
    state = official_state(ref)
    if case != "no config (ViT-XL)":
        json.dump(DECODER_CONFIG, open(tmp_path / "config.json", "w"))
    else:  # the ViT-XL the loader assumes without a config.json, shrunk to the oracle's size
        monkeypatch.setattr(rae, "VITXL_DECODER", {k: DECODER_CONFIG.get(k, v) for k, v in rae.VITXL_DECODER.items()})
        del state["decoder_pos_embed"]  # recomputed: the unscaled MAE table, diffusers' own at a 16 x 16 grid
    if case == "no cls token, no pos table":
        del state["trainable_cls_token"], state["decoder_pos_embed"]
        ref.trainable_cls_token.zero_()  # the official strict=False load keeps its zero init
    if case == "stored pos table":  # used as stored, not recomputed
        ref.decoder_pos_embed = torch.randn_like(ref.decoder_pos_embed)
        state["decoder_pos_embed"] = ref.decoder_pos_embed.clone()
    name = "dinov2_decoder.pt" if case == "dinov2_decoder.pt" else "model.pt"
    torch.save(state, tmp_path / name)
    dec = rae.load_decoder(str(tmp_path if case == "dinov2_decoder.pt" else tmp_path / name))
    assert dec.cfg == rae.DecoderConfig(latent_dim=32, num_tokens=256, patch_size=2, hidden_size=48, depth=2,
                                        num_heads=4, mlp_dim=96)
    z = torch.randn(2, 256, 32)
    assert maxdiff(dec(z), expected_image(ref, z)) < 1e-5


def test_scale_rae_decoder_drops_the_first_token(tmp_path):
    """nyu-visionx/siglip2_decoder always drops input token 0 (its caller prepends a zero token): drop_first_token
    reproduces it on (B, 1 + N, C), and equals decoding the N other tokens without the flag."""
    ref = diffusers_decoder()
    torch.save(official_state(ref), tmp_path / "model.pt")
    json.dump(DECODER_CONFIG, open(tmp_path / "config.json", "w"))
    dec = rae.load_decoder(str(tmp_path), drop_first_token=True)
    z = torch.cat([torch.zeros(2, 1, 32), torch.randn(2, 256, 32)], dim=1)  # (B, 1 + N, C)
    out = dec(z)
    assert maxdiff(out, expected_image(ref, z, drop_cls_token=True)) < 1e-5
    assert maxdiff(out, rae.load_decoder(str(tmp_path))(z[:, 1:])) < 1e-6
    with pytest.raises(ValueError, match=r"decoder expects latents \(B, 257, 32\)"):
        dec(z[:, 1:])


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__file__), "fixtures", "rae_decoder.pt")),
                    reason="fixtures/rae_decoder.pt (made from the official code) is not here")
def test_official_decoder_fixture(tmp_path):
    """fixtures/rae_decoder.pt: the official GeneralDecoder (bytetriper/RAE), tiny, random weights, its outputs for
    RAE's call (drop_cls_token=False) and Scale-RAE's (token 0 dropped)."""
    fx = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "rae_decoder.pt"), weights_only=True)
    torch.save(fx["state"], tmp_path / "model.pt")
    json.dump({k: v for k, v in fx["config"].items() if k != "num_patches"}, open(tmp_path / "config.json", "w"))
    assert maxdiff(rae.load_decoder(str(tmp_path))(fx["z"]), fx["out"]) < 1e-5
    assert maxdiff(rae.load_decoder(str(tmp_path), drop_first_token=True)(fx["z_drop"]), fx["out_drop"]) < 1e-5


def hf_dinov2_snapshot(folder, state=None, seed=0, **cfg):
    """A transformers Dinov2WithRegistersModel saved with save_pretrained (weights `state` where given, the final
    LayerNorm perturbed: RAE must not use its affine)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(seed)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**cfg)).eval()
    for p in model.parameters():
        p.add_(0.2 * torch.randn_like(p))
    if state is not None:
        model.load_state_dict(state, strict=False)
    model.save_pretrained(folder)
    return model


def test_dinov2_rae_latent_is_the_official_one(tmp_path):
    """RAE on DINOv2 (a 64-px image into a 56-px encoder, as 256 into 224): the official path by hand = [0, 1],
    bicubic resize without antialias, ImageNet normalisation, the HF model with its final LayerNorm's affine removed,
    CLS and registers dropped; then stat.pt with only var (no centring) and with a mean, in the (C, H, W) layout."""
    hf = hf_dinov2_snapshot(str(tmp_path), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                            patch_size=14, num_register_tokens=2)
    model = rae.RAE(rae.load_dinov2(str(tmp_path)), input_size=56)
    img = torch.rand(3, 3, 64, 64) * 2 - 1
    x = F.interpolate((img + 1) / 2, size=(56, 56), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(rae.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(rae.IMAGENET_STD).view(1, 3, 1, 1)
    hf.layernorm.weight.fill_(1.0), hf.layernorm.bias.zero_()  # the official encoder: elementwise_affine=False
    ref = hf(pixel_values=x).last_hidden_state[:, 3:]  # (B, 16, 32)
    z = model.encode(img)
    assert z.shape == (3, 16, 32) and maxdiff(z, ref) < 1e-4
    var, mean = torch.rand(32, 4, 4) + 0.5, torch.randn(32, 4, 4)
    grid = ref.transpose(1, 2).reshape(3, 32, 4, 4)  # the official (B, C, H, W) latent
    for stats, want in [({"var": var}, grid / torch.sqrt(var + 1e-5)),
                        ({"mean": mean, "var": var}, (grid - mean) / torch.sqrt(var + 1e-5))]:
        torch.save(stats, tmp_path / "stat.pt")
        normed = rae.RAE(model.encoder, stats=rae.load_latent_stats(str(tmp_path / "stat.pt"), 32, 16), input_size=56)
        assert maxdiff(normed.encode(img), want.flatten(2).transpose(1, 2)) < 1e-4
    assert torch.equal(rae.load_latent_stats(str(tmp_path / "stat.pt"))["var"], var.flatten(1).T)


@pytest.mark.parametrize("shape", [(8, 2, 2), (8, 1, 1), (8,), (4, 8)])
def test_official_stat_layouts(tmp_path, shape):
    """stat.pt tensors (C, H, W), (C, 1, 1), (C,) and (H*W, C) standardize as the official broadcast over
    (B, C, H, W) does ((H*W, C) read as its transpose)."""
    mean, var = torch.randn(shape), torch.rand(shape) + 0.1
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    stats = rae.load_latent_stats(str(tmp_path / "stat.pt"), 8, 4)
    grid = torch.randn(2, 8, 2, 2)  # (B, C, H, W)
    chw = (lambda t: t.T.reshape(8, 2, 2)) if shape == (4, 8) else (lambda t: t.view(8, 1, 1) if t.ndim == 1 else t)
    want = (grid - chw(mean)) / torch.sqrt(chw(var) + 1e-5)
    z = grid.flatten(2).transpose(1, 2)  # (B, N, C)
    got = (z - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5)
    assert maxdiff(got, want.flatten(2).transpose(1, 2)) < 1e-6


def test_diffusers_autoencoder_rae_file(tmp_path):
    """A whole diffusers AutoencoderRAE (DINOv2 encoder, stats, decoder) saved by save_pretrained: load_decoder reads
    its decoder, load_latent_stats its _latents_mean / _latents_std, load_dinov2 a snapshot of its encoder; RAE then
    encodes 256-px images and decodes latents as AutoencoderRAE does (its pixels are [0, 1], ours [-1, 1])."""
    from diffusers import AutoencoderRAE
    torch.manual_seed(0)
    ae = AutoencoderRAE(encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=14, encoder_num_hidden_layers=1,
                        decoder_hidden_size=48, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                        decoder_intermediate_size=96, patch_size=2, encoder_input_size=224,
                        latents_mean=torch.randn(64, 16, 16), latents_std=torch.rand(64, 16, 16) + 0.5).eval()
    for p in ae.parameters():
        p.add_(0.2 * torch.randn_like(p))
    ae.save_pretrained(str(tmp_path / "ae"))
    file = str(tmp_path / "ae" / "diffusion_pytorch_model.safetensors")
    hf_dinov2_snapshot(str(tmp_path / "enc"), ae.encoder.state_dict(), hidden_size=64, num_attention_heads=1,
                       num_hidden_layers=1, image_size=518, patch_size=14)
    model = rae.RAE(rae.load_dinov2(str(tmp_path / "enc")), rae.load_decoder(str(tmp_path / "ae")),
                    rae.load_latent_stats(file, 64, 256), input_size=224)
    img = torch.rand(2, 3, 256, 256) * 2 - 1
    ref = ae.encode((img + 1) / 2).latent  # (B, C, 16, 16)
    z = model.encode(img)
    assert maxdiff(z, ref.flatten(2).transpose(1, 2)) < 1e-4
    assert maxdiff(model.decode(z), ae.decode(ref).sample * 2 - 1) < 1e-4


def test_released_decoder_errors_name_every_key(tmp_path):
    ref = diffusers_decoder()
    state = official_state(ref)
    k, k2 = "decoder_layers.0.attention.attention.query.weight", "decoder_layers.1.output.dense.weight"
    del state[k]
    state[k2] = torch.zeros(48, 95)
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "model.pt")
    json.dump({**DECODER_CONFIG, "layer_norm_eps": 1e-6}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError) as e:
        rae.load_decoder(str(tmp_path))
    one_line_naming(e, str(tmp_path / "model.pt"), f"missing key '{k}'", f"key '{k2}' has shape (48, 95), expected "
                    "(48, 96)", "unexpected key 'extra'", "layer_norm_eps 1e-06", str(tmp_path / "config.json"))
    # a diffusers file: the same problems in its own names
    save_file({"decoder." + k.replace("attention.attention.", "attention.to_").replace("query", "q")
               .replace("key.", "k.").replace("value", "v").replace("attention.output.dense", "attention.to_out.0"): v
               for k, v in official_state(ref).items() if k not in ("decoder_pos_embed", "decoder_layers.0.intermediate.dense.bias")},
              str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError) as e:
        rae.load_decoder(str(tmp_path / "d.safetensors"))
    one_line_naming(e, "missing key 'decoder.decoder_layers.0.intermediate.dense.bias'")
    os.rename(tmp_path / "model.pt", tmp_path / "a.pt")  # no model.pt, two candidates: which one is not guessed
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(ValueError) as e:
        rae.load_decoder(str(tmp_path))
    one_line_naming(e, str(tmp_path), "several *.pt: a.pt, b.pt")


def test_official_stats_errors_name_every_key(tmp_path):
    torch.save({"mean": torch.zeros(5, 4, 4), "extra": torch.zeros(1)}, tmp_path / "stat.pt")
    with pytest.raises(ValueError) as e:
        rae.load_latent_stats(str(tmp_path / "stat.pt"), 8, 16)
    one_line_naming(e, str(tmp_path / "stat.pt"), "missing key 'var'", "unexpected key 'extra'",
                    "key 'mean' has shape (5, 4, 4), expected (8, H, W), (8, 1, 1), (8,) or (16, 8)")


def test_released_vit_xl_sizes_on_meta():
    """RAE-collections' ViT-XL decoder for a 768-wide encoder: 456 tensors, 415,352,704 parameters (its stored
    pos table included), every shape inferred from the tensors (C, N, p) or ViT-XL's (no config.json)."""
    with torch.device("meta"):
        xl = rae.Decoder(rae.DecoderConfig(**rae.DECODER_PRESETS["XL"], latent_dim=768, patch_size=16))
    state = rae.ours_to_hf(xl.state_dict(), rae.DECODER_KEYS)
    state["decoder_pos_embed"] = torch.empty(1, 257, 1152, device="meta")
    assert (len(state), sum(t.numel() for t in state.values())) == (456, 415_352_704)
    dec = rae.load_released_decoder("nowhere/model.pt", state, diffusers=False)
    assert dec.cfg == xl.cfg and dec.pos_embed.shape == (257, 1152)


def test_siglip_rae_feeds_and_returns_img_itself(pair):
    """SigLIP's input is (x - 0.5) / 0.5 of x in [0, 1], that is img in [-1, 1]: RAE hands img over untouched (no
    rounding on the way), and decode returns the decoder's output as it is (x * 0.5 + 0.5 is [0, 1])."""
    img = torch.rand(2, 3, 56, 56) * 2 - 1
    model = rae.RAE(pair[1].vision, lambda z: z + 1)
    assert model.pixels(img) is img and torch.equal(model.tokens(img), pair[1].vision(img))
    assert torch.equal(model.decode(torch.ones(2)), torch.full((2,), 2.0))
    resized = rae.RAE(pair[1].vision, input_size=28)  # a resize goes through [0, 1], as the official encode does
    want = F.interpolate((img + 1) / 2, size=(28, 28), mode="bicubic", align_corners=False) / 0.5 - 1
    assert maxdiff(resized.pixels(img), want) < 1e-6
