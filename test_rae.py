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
