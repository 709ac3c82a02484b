"""Tests for vae.py against diffusers' AutoencoderKL built from the FLUX.1 config (random weights, fp32, CPU).

    python -m pytest -q test_vae.py
"""
import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from safetensors.torch import load_file, save_file

from vae import FluxVAE, VAEConfig, diffusers_key, load_flux_vae, pack, unpack, write_tiny_flux_vae

SMALL = (32, 64, 64, 64)  # reduced widths for the fast tests; GroupNorm keeps FLUX's 32 groups
FULL = (128, 256, 512, 512)
SCALE, SHIFT = 0.3611, 0.1159


def diffusers_config(widths):
    """diffusers' FLUX.1 vae/config.json, at the given block_out_channels."""
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=list(widths), layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=SCALE,
                shift_factor=SHIFT, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=False,
                use_post_quant_conv=False, mid_block_add_attention=True)


def randomize_norms(model, seed=0):
    """GroupNorm affine starts at weight 1, bias 0, which would hide a swapped or skipped norm: make it random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def reference_vae(widths, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(AutoencoderKL(**diffusers_config(widths)).eval(), seed)


def images(b=2, h=48, w=64, seed=0):
    """Non-square, so a swapped H/W would show."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_matches_reference(ours, ref, img, scale=SCALE, shift=SHIFT):
    """encode (mean) and decode of ours against diffusers plus the FLUX pipeline's scale and shift, within 1e-4."""
    with torch.no_grad():
        z_ref = scale * (ref.encode(img).latent_dist.mean - shift)
        z = ours.encode(img)
        rec_ref = ref.decode(z_ref / scale + shift).sample
        rec = ours.decode(z_ref)
    assert z.shape == (img.shape[0], 16, img.shape[2] // 8, img.shape[3] // 8)
    assert rec.shape == img.shape
    assert (z - z_ref).abs().max() < 1e-4, (z - z_ref).abs().max()
    assert (rec - rec_ref).abs().max() < 1e-4, (rec - rec_ref).abs().max()
    return (z - z_ref).abs().max().item(), (rec - rec_ref).abs().max().item()


@pytest.fixture(scope="module")
def small_ref():
    return reference_vae(SMALL)


@pytest.fixture(scope="module")
def small_repo(small_ref, tmp_path_factory):
    """A diffusers pipeline-style repo: repo/vae/{config.json, diffusion_pytorch_model.safetensors}."""
    repo = tmp_path_factory.mktemp("repo")
    small_ref.save_pretrained(repo / "vae")
    return repo


@pytest.fixture(scope="module")
def small_bfl(tmp_path_factory):
    """BFL ae.safetensors written from our module's state_dict (our names are BFL's), plus diffusers' model built
    from it with diffusers' own BFL -> diffusers converter, the trusted reference for BFL key semantics."""
    cfg = VAEConfig(ch=SMALL[0], ch_mult=tuple(w // SMALL[0] for w in SMALL))
    torch.manual_seed(1)
    state = randomize_norms(FluxVAE(cfg), seed=1).state_dict()
    path = tmp_path_factory.mktemp("bfl") / "ae.safetensors"
    save_file(state, path)
    ref = AutoencoderKL(**diffusers_config(SMALL)).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(load_file(path), diffusers_config(SMALL)), strict=True)
    return path, ref


# ----------------------------------------------------------------------------- both formats vs diffusers
@pytest.mark.parametrize("where", ["repo", "vae folder", "weights file", "weights file without config.json"])
def test_diffusers_format_matches_autoencoderkl(small_ref, small_repo, where, tmp_path):
    weights = small_repo / "vae" / "diffusion_pytorch_model.safetensors"
    if where == "weights file without config.json":
        weights = shutil.copy(weights, tmp_path)  # widths then come from the shapes, scale and shift are FLUX's
    path = {"repo": small_repo, "vae folder": small_repo / "vae"}.get(where, weights)
    ours = load_flux_vae(str(path))
    assert ours.cfg == VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert_matches_reference(ours, small_ref, images())


def test_diffusers_config_is_read(tmp_path):
    """Values that differ from FLUX's defaults: a loader that ignored config.json would get other numbers."""
    torch.manual_seed(3)
    config = {**diffusers_config(SMALL), "norm_num_groups": 16, "scaling_factor": 0.5, "shift_factor": -0.2}
    ref = randomize_norms(AutoencoderKL(**config).eval(), seed=3)
    ref.save_pretrained(tmp_path)
    ours = load_flux_vae(str(tmp_path))
    assert (ours.cfg.norm_groups, ours.cfg.scale, ours.cfg.shift) == (16, 0.5, -0.2)
    assert_matches_reference(ours, ref, images(), scale=0.5, shift=-0.2)


def test_bfl_format_matches_autoencoderkl(small_bfl):
    path, ref = small_bfl
    ours = load_flux_vae(str(path))
    assert ours.cfg == VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))  # inferred from shapes
    assert_matches_reference(ours, ref, images())


def test_full_width_both_formats(tmp_path):
    """The real FLUX.1 widths (83.8M params) once, at 64x64 so it stays a few seconds."""
    ref = reference_vae(FULL, seed=2)
    ref.save_pretrained(tmp_path / "diffusers")
    ours = load_flux_vae(str(tmp_path / "diffusers"))
    assert ours.cfg == VAEConfig()
    assert sum(p.numel() for p in ours.parameters()) == 83_819_683
    img = images(1, 64, 64)
    print("full width, diffusers keys: max |dz|, |dimg| = %.2e, %.2e" % assert_matches_reference(ours, ref, img))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "ae.safetensors")
    bfl = load_file(tmp_path / "ae.safetensors")
    assert len(bfl) == 244
    ref.load_state_dict(convert_ldm_vae_checkpoint(bfl, diffusers_config(FULL)), strict=True)
    ours = load_flux_vae(str(tmp_path / "ae.safetensors"))
    print("full width, BFL keys: max |dz|, |dimg| = %.2e, %.2e" % assert_matches_reference(ours, ref, img))


def test_key_map_matches_diffusers_converter(small_bfl):
    """Key for key: every BFL tensor lands under diffusers_key(k) in diffusers' own conversion, with its values."""
    path, _ = small_bfl
    bfl = load_file(path)
    converted = convert_ldm_vae_checkpoint(bfl, diffusers_config(SMALL))
    assert sorted(diffusers_key(k, 4) for k in bfl) == sorted(converted)
    for k, v in bfl.items():
        assert torch.equal(converted[diffusers_key(k, 4)].reshape(v.shape), v), k
    assert diffusers_key("decoder.up.0.block.2.nin_shortcut.bias", 4) == \
        "decoder.up_blocks.3.resnets.2.conv_shortcut.bias"


def test_low_precision_file_is_upcast(small_ref, tmp_path):
    """diffusers' FLUX vae/ weights ship in bf16: they load as fp32 by default, and as bf16 when asked."""
    AutoencoderKL(**diffusers_config(SMALL)).to(torch.bfloat16).save_pretrained(tmp_path)
    bf16 = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    ours = load_flux_vae(str(tmp_path))
    w = ours.decoder.up[0].block[0].conv1.weight
    assert w.dtype == torch.float32 and torch.equal(w, bf16["decoder.up_blocks.3.resnets.0.conv1.weight"].float())
    assert load_flux_vae(str(tmp_path), dtype=torch.bfloat16).encoder.conv_in.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- sampling
def test_sample_matches_mean_plus_std_eps(small_bfl):
    path, ref = small_bfl
    ours = load_flux_vae(str(path))
    img = images()
    with torch.no_grad():
        z = ours.encode(img, sample=True, generator=torch.Generator().manual_seed(7))
        post = ref.encode(img).latent_dist
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
        by_hand = SCALE * (post.mean + torch.exp(0.5 * post.logvar) * eps - SHIFT)
        by_diffusers = SCALE * (post.sample(generator=torch.Generator().manual_seed(7)) - SHIFT)
        other_seed = ours.encode(img, sample=True, generator=torch.Generator().manual_seed(8))
    assert (z - by_hand).abs().max() < 1e-4
    assert (z - by_diffusers).abs().max() < 1e-4
    assert (z - ours.encode(img)).abs().max() > 1e-3  # it did sample
    assert (z - other_seed).abs().max() > 1e-3


# ----------------------------------------------------------------------------- pack / unpack
def test_pack_matches_flux_packing():
    B, C, h, w = 2, 16, 6, 10
    z = torch.randn(B, C, h, w)
    tokens = pack(z)
    assert tokens.shape == (B, (h // 2) * (w // 2), 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, B, C, h, w))
    assert torch.equal(unpack(tokens, h, w), z)
    assert torch.equal(unpack(tokens, h, w), FluxPipeline._unpack_latents(tokens, 8 * h, 8 * w, 8))
    # the layout written out: token r * (w/2) + s, feature c*4 + ph*2 + pw holds z[b, c, 2r + ph, 2s + pw]
    b, c, r, s, ph, pw = 1, 5, 2, 3, 1, 0
    assert tokens[b, r * (w // 2) + s, c * 4 + ph * 2 + pw] == z[b, c, 2 * r + ph, 2 * s + pw]


# ----------------------------------------------------------------------------- inputs and files that are wrong
def test_bad_inputs():
    vae = FluxVAE(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    cases = [(vae.encode, (torch.zeros(1, 3, 60, 64),), "multiples of 8"),
             (vae.encode, (torch.zeros(1, 4, 64, 64),), r"\(B, 3, H, W\)"),
             (vae.encode, (torch.zeros(3, 64, 64),), "got shape"),
             (vae.decode, (torch.zeros(1, 4, 8, 8),), r"\(B, 16, h, w\)"),
             (pack, (torch.zeros(1, 16, 7, 8),), "even h and w"),
             (unpack, (torch.zeros(1, 12, 64), 8, 8), r"\(B, 16, 4C\)"),
             (unpack, (torch.zeros(1, 16, 64), 7, 8), "even"),
             (unpack, (torch.zeros(1, 16, 62), 8, 8), r"unpack: expected tokens \(B, 16, 4C\)")]
    for fn, fn_args, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(*fn_args)


def variant(src, dst, drop=(), put=None):
    """Copy safetensors file src to dst without the keys in drop and with the tensors in put added or replaced."""
    state = load_file(src)
    for k in drop:
        del state[k]
    state.update(put or {})
    save_file(state, dst)
    return dst


def test_bad_bfl_files(small_bfl, tmp_path):
    good, _ = small_bfl
    cases = {  # name: (path, error type, strings the one-line message must contain)
        "no such path": (tmp_path / "nope", FileNotFoundError, ["nope"]),
        "empty folder": (tmp_path / "empty", FileNotFoundError, ["empty", "ae.safetensors"]),
        "pickle only": (tmp_path / "pickled", FileNotFoundError, ["pickled", "only safetensors"]),
        "pickle named .safetensors": (tmp_path / "p.safetensors", ValueError, ["p.safetensors", "not a readable"]),
        "truncated": (tmp_path / "t.safetensors", ValueError, ["t.safetensors", "not a readable"]),
        "missing key": (variant(good, tmp_path / "m.safetensors", drop=["encoder.mid.attn_1.q.bias"]),
                        ValueError, ["m.safetensors", "missing keys (1): encoder.mid.attn_1.q.bias"]),
        "unexpected key": (variant(good, tmp_path / "u.safetensors", put={"encoder.extra": torch.zeros(1)}),
                           ValueError, ["u.safetensors", "unexpected keys (1): encoder.extra"]),
        "mis-shaped": (variant(good, tmp_path / "s.safetensors", put={"decoder.conv_out.bias": torch.zeros(4)}),
                       ValueError, ["s.safetensors", "decoder.conv_out.bias [4] (expected [3])"]),
        "int dtype": (variant(good, tmp_path / "d.safetensors",
                                  put={"encoder.conv_in.bias": torch.zeros(32, dtype=torch.int64)}),
                      ValueError, ["d.safetensors", "encoder.conv_in.bias I64"]),
        "not a VAE": (variant(good, tmp_path / "x.safetensors", drop=[k for k in load_file(good)
                                                                          if k.startswith("encoder.down.")]),
                      ValueError, ["x.safetensors", "no encoder.down"]),
        "no conv_in to infer from": (variant(good, tmp_path / "c.safetensors", drop=["encoder.conv_in.weight"]),
                                     ValueError, ["c.safetensors", "missing key encoder.conv_in.weight"]),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "pickled").mkdir()
    torch.save(load_file(good), tmp_path / "pickled" / "diffusion_pytorch_model.bin")
    torch.save(load_file(good), tmp_path / "p.safetensors")
    data = open(good, "rb").read()
    open(tmp_path / "t.safetensors", "wb").write(data[: len(data) - 1000])
    for name, (path, error, needles) in cases.items():
        with pytest.raises(error) as e:
            load_flux_vae(str(path))
        message = str(e.value)
        assert "\n" not in message, name
        for needle in needles:
            assert needle in message, (name, message)


def test_bad_diffusers_folders(small_repo, tmp_path):
    weights = small_repo / "vae" / "diffusion_pytorch_model.safetensors"
    config = json.loads((small_repo / "vae" / "config.json").read_text())

    def folder(name, config_text=None, **edits):
        d = tmp_path / name
        d.mkdir()
        variant(weights, d / "diffusion_pytorch_model.safetensors", **edits)
        (d / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
        return d

    q = "encoder.mid_block.attentions.0.to_q.weight"
    cases = {
        "missing key": (folder("m", drop=["decoder.up_blocks.3.resnets.2.conv2.bias"]),
                        ["m/diffusion_pytorch_model.safetensors", "missing keys (1): decoder.up_blocks.3.resnets.2"]),
        "mis-shaped attention": (folder("s", put={q: torch.zeros(64, 63)}),
                                 [f"{q} [64, 63] (expected [64, 64, 1, 1])"]),
        "BFL key in a diffusers file": (folder("u", put={"encoder.norm_out.weight": torch.zeros(64)}),
                                        ["unexpected keys (1): encoder.norm_out.weight"]),
        "config disagrees": (folder("w", json.dumps({**config, "block_out_channels": [32, 64, 128, 128]})),
                             ["w/config.json", "missing keys (4): encoder.down_blocks.2.resnets.0.conv_shortcut.weight",
                              "mis-shaped keys (144): encoder.down_blocks.2.resnets.0.conv1.weight [64, 64, 3, 3] "
                              "(expected [128, 64, 3, 3])"]),
        "broken json": (folder("j", "{not json"), ["j/config.json"]),
        "config of an SD VAE": (folder("q", json.dumps({**config, "use_quant_conv": True})),
                                ["q/config.json", "use_quant_conv"]),
        "config without a field": (folder("f", json.dumps({k: v for k, v in config.items() if k != "shift_factor"})),
                                   ["f/config.json", "shift_factor"]),
    }
    for name, (path, needles) in cases.items():
        with pytest.raises(ValueError) as e:
            load_flux_vae(str(path))
        message = str(e.value)
        assert "\n" not in message, name
        for needle in needles:
            assert needle in message, (name, message)


# ----------------------------------------------------------------------------- the tiny checkpoint for toy runs
def test_tiny_checkpoint(tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    cfg = write_tiny_flux_vae(a, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, seed=0)
    write_tiny_flux_vae(b, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, seed=0)
    write_tiny_flux_vae(c, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, seed=1)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert open(a, "rb").read() != open(c, "rb").read()
    vae = load_flux_vae(str(a))
    assert vae.cfg == cfg == dataclasses.replace(VAEConfig(), ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
    with torch.no_grad():
        z = vae.encode(images(1, 32, 48))
        assert z.shape == (1, 16, 4, 6) and vae.decode(z).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        write_tiny_flux_vae(tmp_path / "d.safetensors", ch=16)
