"""Tests of encoders.py's DINOv2 against transformers (CPU, fp32, tiny random snapshots in the real HF format, written
by save_pretrained), and of the real configs' sizes on the meta device. SigLIP-2 is tested in test_rae.py.

    python -m pytest -q test_encoders.py
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import encoders
import rae
from conftest import one_line_naming

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    with torch.no_grad():
        yield


def hf_dinov2(folder, registers=True, seed=0, **cfg):
    """A transformers Dinov2WithRegistersModel (2 registers) or Dinov2Model with random weights (LayerNorms,
    LayerScale, CLS and registers perturbed too), saved with save_pretrained."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=2, **cfg))
    else:
        model = Dinov2Model(Dinov2Config(**TINY, **cfg))
    for p in model.parameters():
        p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module", params=["registers", "plain"])
def pair(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    return hf_dinov2(folder, registers=request.param == "registers"), rae.load_dinov2(folder), folder


def maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", [(56, 56), (28, 28), (42, 42), (70, 70), (42, 70), (84, 56)])
def test_dinov2_matches_transformers(pair, size):
    """last_hidden_state at the native grid (4 x 4) and at other sides, square or not: the position table is resized
    as transformers does (antialiased bicubic for the registers model, plain bicubic for Dinov2Model)."""
    hf, ours, _ = pair
    x = torch.randn(2, 3, *size)
    out = ours(x)
    ref = hf(pixel_values=x).last_hidden_state
    assert out.shape == ref.shape == (2, ours.num_prefix + size[0] * size[1] // 196, 32)
    assert maxdiff(out, ref) < 1e-4
    assert torch.equal(ours.patch_tokens(x), ours.hidden(x)[:, ours.num_prefix:])


def test_the_two_resizes_differ(pair):
    """The registers model's antialiased resize is not the plain one (downsampling 4 x 4 -> 2 x 2): a check that the
    test above can tell them apart."""
    _, ours, _ = pair
    plain = torch.nn.functional.interpolate(ours.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2),
                                            size=(2, 2), mode="bicubic", align_corners=False)
    got = ours.pos_for(2, 2)[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    assert (maxdiff(got, plain) > 1e-3) == ours.registered


def test_dinov2_dtype_and_device_args(pair):
    _, ours, folder = pair
    half = rae.load_dinov2(folder, device="cpu", dtype=torch.bfloat16)
    assert half.pos_embed.dtype == torch.bfloat16 and not any(p.requires_grad for p in half.parameters())
    x = torch.randn(1, 3, 56, 56)
    assert maxdiff(half(x).float(), ours(x)) < 0.1 * ours(x).abs().max().item()


def test_minimal_config_takes_transformers_defaults(tmp_path):
    """A config.json that omits fields equal to the defaults of its model_type loads the same model."""
    hf = hf_dinov2(str(tmp_path), registers=True, mlp_ratio=4, layer_norm_eps=1e-6)
    cfg = json.load(open(tmp_path / "config.json"))
    keep = {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
            "num_register_tokens"}
    json.dump({k: v for k, v in cfg.items() if k in keep}, open(tmp_path / "config.json", "w"))
    x = torch.randn(1, 3, 42, 42)
    assert maxdiff(rae.load_dinov2(str(tmp_path))(x), hf(pixel_values=x).last_hidden_state) < 1e-4


def test_bad_dinov2_snapshot_reports_every_key(pair, tmp_path):
    _, _, folder = pair
    for name in os.listdir(folder):
        os.link(os.path.join(folder, name), tmp_path / name)
    path = str(tmp_path / "model.safetensors")
    state = load_file(path)
    k, k2 = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.1.mlp.fc1.weight"
    state.pop(k)
    state[k2] = torch.zeros(128, 31)
    state["encoder.layer.0.layer_scale1.lambda1"] = state["encoder.layer.0.layer_scale1.lambda1"].long()
    state["extra"] = torch.zeros(1)
    os.remove(path)
    save_file(state, path)
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(str(tmp_path))
    one_line_naming(e, path, f"missing key '{k}'", f"key '{k2}' has shape (128, 31), expected (128, 32)",
                    "key 'encoder.layer.0.layer_scale1.lambda1' has dtype torch.int64", "unexpected key 'extra'")


@pytest.mark.parametrize("edit,needles", [
    ({"use_swiglu_ffn": True}, ["use_swiglu_ffn True is not supported"]),
    ({"hidden_act": "silu", "qkv_bias": False}, ["hidden_act 'silu' is not supported", "qkv_bias False"]),
    ({"model_type": "vit"}, ["unknown model_type 'vit'"]),
])
def test_bad_dinov2_config(tmp_path, edit, needles):
    cfg = {"model_type": "dinov2", **TINY, **edit}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(str(tmp_path))
    one_line_naming(e, str(tmp_path / "config.json"), *needles)


def count(state):
    return len(state), sum(t.numel() for t in state.values())


def test_real_sizes_on_meta(tmp_path):
    """facebook/dinov2-with-registers-base: 224 hub tensors, 86,583,552 parameters (one of them the unused
    mask_token [1, 768], which we do not keep); google/siglip2-base-patch16-256 (RAE's SigLIP2-B encoder) through
    read_siglip_config: its vision tower has 92,930,304 parameters and 16 x 16 tokens of 768."""
    json.dump({"model_type": "dinov2_with_registers", "image_size": 518, "patch_size": 14}, open(tmp_path / "config.json", "w"))
    cfg = encoders.read_dinov2_config(str(tmp_path))
    with torch.device("meta"):
        model = encoders.DINOv2(cfg)
        assert model(torch.empty(1, 3, 224, 224)).shape == (1, 261, 768)  # CLS + 4 registers + 16 x 16
    n, params = count(encoders.ours_to_hf(model.state_dict(), encoders.DINO_KEYS))
    assert (n + 1, params + 768) == (224, 86_583_552)
    json.dump({"model_type": "siglip", "vision_config": {"image_size": 256}, "text_config": {"vocab_size": 256000}},
              open(tmp_path / "config.json", "w"))
    vision, text = rae.read_siglip_config(str(tmp_path))
    with torch.device("meta"):
        siglip = rae.SigLIP2(vision, text)
        assert siglip.vision(torch.empty(1, 3, 256, 256)).shape == (1, 256, 768)
    assert sum(p.numel() for p in siglip.vision.parameters()) == 92_930_304
